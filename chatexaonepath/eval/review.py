"""`eval review`: a page where a pathologist grades a run's answers blind to the judge.

One answer at a time — the question, the report and the model's answer, never the judge's verdict
or reasons — with pass/fail for each criterion and accept/reject; each grade is appended to the
run's `human.jsonl` in one write and fsynced (several reviewers, each with their own name, can
grade at once; a reload resumes at the first answer this reviewer has not graded). After each grade
a finished run's summary and report are rewritten with the judge–human agreement.

Served by the FastAPI/uvicorn that Gradio already brings (imported only by this command): 127.0.0.1 by default; another address
needs `--auth USER:PASSWORD` (HTTP Basic, compared in constant time, wrong passwords slowed per
client). Grades are accepted only as JSON, so another site's form cannot post one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from base64 import b64decode
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .agreement import HUMAN_FILE, answer_sha256, latest_grades
from .criteria import CriteriaSet, Criterion, EvalError, load_criteria
from .data import JsonlLog
from .judge import JudgeItem
from .review_page import PAGE
from .run import CONFIG_FILE, refresh_report, run_items

logger = logging.getLogger(__name__)

REVIEWER_NAME = re.compile(r"^[\w .@-]{1,64}$")
MAX_COMMENT = 4000
FAILED_LOGINS_ALLOWED = 5  # per client within FAILED_LOGIN_WINDOW s, then refused until the window passes
FAILED_LOGIN_WINDOW = 30.0


class ReviewSession:
    """What the page serves and records: the run's answers, its criteria, one reviewer's grades."""

    def __init__(self, run_dir: str | Path, reviewer: str) -> None:
        self.run_dir = Path(run_dir)
        if not REVIEWER_NAME.match(reviewer or ""):
            raise EvalError(f"--reviewer {reviewer!r} must be 1–64 letters, digits, spaces or . _ @ -.")
        if not self.run_dir.is_dir():
            raise EvalError(f"Run folder not found: {self.run_dir}.")
        self.reviewer = reviewer
        self.items: list[JudgeItem] = sorted(run_items(self.run_dir),
                                             key=lambda i: hashlib.sha256(i.id.encode()).hexdigest())
        self.by_id = {i.id: i for i in self.items}
        self.criteria = self._criteria()
        self.log = JsonlLog(self.run_dir / HUMAN_FILE)
        self._lock = threading.Lock()

    def _criteria(self) -> CriteriaSet:
        path = self.run_dir / CONFIG_FILE
        saved = json.loads(path.read_text()).get("criteria") if path.exists() else None
        if not saved:
            return load_criteria()
        return CriteriaSet(tuple(Criterion(**c) for c in saved["criteria"]), saved.get("precheck_criterion"))

    def _graded(self) -> set[str]:
        """Ids this reviewer has graded on the answer as it is now (a changed answer is graded again)."""
        return {item_id for (reviewer, item_id), grade in latest_grades(self.log).items()
                if reviewer == self.reviewer and item_id in self.by_id
                and grade.get("answer_sha256") == answer_sha256(self.by_id[item_id].answer)}

    def state(self) -> dict:
        """The next answer to grade (or none), with the criteria and this reviewer's progress."""
        graded = self._graded()
        following = next((i for i in self.items if i.id not in graded), None)
        return {"reviewer": self.reviewer, "n_items": len(self.items), "n_graded": len(graded),
                "criteria": [{"id": c.id, "name": c.name, "definition": c.definition, "severity": c.severity}
                             for c in self.criteria.criteria],
                "item": None if following is None else {"id": following.id, "question": following.question,
                                                        "report": following.report, "answer": following.answer}}

    def grade(self, payload: object) -> dict:
        """Validate and append one grade; returns the next state. Bad input raises EvalError."""
        if not isinstance(payload, dict):
            raise EvalError("A grade must be a JSON object.")
        item = self.by_id.get(str(payload.get("id")))
        if item is None:
            raise EvalError(f"Unknown answer id {str(payload.get('id'))[:80]!r}.")
        criteria = payload.get("criteria")
        if not isinstance(criteria, dict) or any(not isinstance(criteria.get(c), bool) for c in self.criteria.ids):
            raise EvalError(f"Give pass or fail for every criterion ({', '.join(self.criteria.ids)}).")
        if not isinstance(payload.get("accepted"), bool):
            raise EvalError("Choose accept or reject.")
        comment = payload.get("comment") or ""
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise EvalError(f"The comment must be text of at most {MAX_COMMENT} characters.")
        record = {"id": item.id, "reviewer": self.reviewer, "criteria": {c: criteria[c] for c in self.criteria.ids},
                  "accepted": payload["accepted"], "comment": comment.strip(),
                  "answer_sha256": answer_sha256(item.answer), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with self._lock:  # one process's writes in order; O_APPEND keeps other reviewers' lines whole
            self.log.append(record, durable=True)
        self._refresh()
        return self.state()

    def _refresh(self) -> None:
        if not (self.run_dir / "summary.json").exists():
            return  # the judge has not finished: agreement appears when it does
        try:
            refresh_report(self.run_dir)
        except Exception:  # noqa: BLE001 - the grade is safe on disk; a report failure must not lose the page
            logger.exception("Could not rewrite %s/report.md with the new grade.", self.run_dir)


def parse_auth(values: list[str] | None) -> list[tuple[str, str]] | None:
    """`USER:PASSWORD` strings → pairs; malformed ones raise EvalError."""
    if not values:
        return None
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise EvalError("--auth must look like USER:PASSWORD (repeat it for more users).")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Logins:
    """HTTP Basic checks with a brake: a client with too many recent failures is refused for a while."""

    def __init__(self, auth: list[tuple[str, str]]) -> None:
        self.auth, self.failures = auth, defaultdict(deque)

    def check(self, client: str, header: str | None) -> int:
        """200 when the header holds a valid login, 401 when not, 429 when this client must wait."""
        now, recent = time.monotonic(), self.failures[client]
        while recent and now - recent[0] > FAILED_LOGIN_WINDOW:
            recent.popleft()
        if len(recent) >= FAILED_LOGINS_ALLOWED:
            return 429
        if not header:  # a browser's first request, before it asks for the login: not a wrong guess
            return 401
        try:
            user, _, password = b64decode((header or "").partition(" ")[2]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        ok = False
        for known_user, known_password in self.auth:  # every pair compared: no early exit to time
            ok |= hmac.compare_digest(user.encode(), known_user.encode()) & \
                hmac.compare_digest(password.encode(), known_password.encode())
        if not ok:
            recent.append(now)
        return 200 if ok else 401


def build_review_app(session: ReviewSession, auth: list[tuple[str, str]] | None = None):
    """The FastAPI app: the page, its state and the grade endpoint."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    logins = _Logins(auth) if auth else None

    @app.middleware("http")
    async def login(request: Request, call_next):
        if logins is not None:
            status = logins.check(request.client.host if request.client else "?", request.headers.get("authorization"))
            if status == 429:
                return Response("Too many failed logins; wait and try again.", status_code=429)
            if status == 401:
                return Response("Sign in to grade.", status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="ChatEXAONEPath review"'})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/state")
    def state() -> dict:
        return session.state()

    @app.post("/api/grade")
    async def grade(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "Grades are sent as JSON."}, status_code=415)
        try:
            return session.grade(json.loads(await request.body()))
        except ValueError:
            return JSONResponse({"error": "The grade is not valid JSON."}, status_code=400)
        except EvalError as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    return app


@contextmanager
def serve_review(session: ReviewSession, host: str = "127.0.0.1", port: int = 0,
                 auth: list[tuple[str, str]] | None = None) -> Iterator[str]:
    """Serve the page in a background thread; yields its URL, stops on exit."""
    import uvicorn

    if not is_loopback(host) and not auth:
        raise EvalError(f"Serving the review page on {host} would let anyone on the network grade; add --auth "
                        "USER:PASSWORD or keep the default 127.0.0.1.")
    server = uvicorn.Server(uvicorn.Config(build_review_app(session, auth), host=host, port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EvalError(f"The review page could not start on {host}:{port} (is the port in use?).")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
