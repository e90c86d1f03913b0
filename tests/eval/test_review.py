"""`eval review`: grades recorded blind to the judge, resumable, several reviewers; κ in the report and in compare."""

import base64
import json
import urllib.error
import urllib.request

import pytest

from chatexaonepath.eval.agreement import answer_sha256
from chatexaonepath.eval.compare import compare_runs
from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.review import FAILED_LOGINS_ALLOWED, ReviewSession, serve_review
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, keyword_judge, write_answers

ANSWERS = ["Invasive ductal carcinoma.", "Benign fibroadenoma.", "Ductal carcinoma, grade 2.", "Normal breast tissue."]


@pytest.fixture
def judged_run(tmp_path):
    """A finished judged run: the keyword judge accepts q0 and q2 (they say carcinoma) and rejects q1, q3."""
    write_answers(tmp_path / "answers.jsonl", ANSWERS, slide="S1")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        judge_answers_file(tmp_path / "answers.jsonl", tmp_path / "run", f"openai:test-model@{server.url}")
    return tmp_path / "run"


def call(url, path, payload=None, content_type="application/json", auth=None):
    data = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", content_type)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, (json.loads(body) if body.startswith(b"{") else body.decode())


def grade(state, accepted, fail=()):
    return {"id": state["item"]["id"], "criteria": {c: c not in fail for c in IDS}, "accepted": accepted,
            "comment": "checked"}


def test_the_page_shows_one_answer_without_the_judges_verdict_and_records_grades(judged_run):
    session = ReviewSession(judged_run, "dr_a")
    with serve_review(session) as url:
        status, page = 200, urllib.request.urlopen(url, timeout=10).read().decode()
        assert status == 200 and "Grade answers against the report" in page
        status, state = call(url, "api/state")
        assert status == 200 and state["n_items"] == 4 and state["n_graded"] == 0
        assert set(state["item"]) == {"id", "question", "report", "answer"}
        assert "invasive ductal carcinoma" in state["item"]["report"].lower()
        text = json.dumps(state)
        # blind to the judge: none of its reasons ("diagnosis checked.") or decisions reach the page
        assert "checked." not in json.dumps(state["item"]) and '"accepted"' not in text and '"pass"' not in text
        assert not any(f"{c} checked" in text for c in IDS)
        assert [c["id"] for c in state["criteria"]] == IDS
        seen = []
        while state["item"] is not None:
            seen.append(state["item"]["id"])
            status, state = call(url, "api/grade", grade(state, True))
            assert status == 200
        assert sorted(seen) == ["q0", "q1", "q2", "q3"] and state["n_graded"] == 4
    records = [json.loads(line) for line in (judged_run / "human.jsonl").read_text().splitlines()]
    assert [r["reviewer"] for r in records] == ["dr_a"] * 4 and all(r["comment"] == "checked" for r in records)
    q1 = next(r for r in records if r["id"] == "q1")
    assert q1["answer_sha256"] == answer_sha256(ANSWERS[1]) and set(q1["criteria"]) == set(IDS)


@pytest.mark.parametrize("payload,expected", [
    ({"id": "q0", "criteria": {i: True for i in IDS[:-1]}, "accepted": True}, "every criterion"),
    ({"id": "q0", "criteria": {i: True for i in IDS}, "accepted": "yes"}, "accept or reject"),
    ({"id": "zz", "criteria": {i: True for i in IDS}, "accepted": True}, "Unknown answer id"),
    ({"id": "q0", "criteria": {i: True for i in IDS}, "accepted": True, "comment": "x" * 5000}, "at most 4000"),
])
def test_incomplete_or_malformed_grades_are_refused_in_one_sentence(judged_run, payload, expected):
    with serve_review(ReviewSession(judged_run, "dr_a")) as url:
        status, body = call(url, "api/grade", payload)
        assert status == 400 and expected in body["error"]
        assert call(url, "api/grade", b"id=q0&accepted=true", "application/x-www-form-urlencoded")[0] == 415
        assert call(url, "api/grade", b"{not json")[0] == 400
    assert not (judged_run / "human.jsonl").exists()


def test_grading_resumes_per_reviewer_and_two_reviewers_give_kappa_in_report_and_compare(judged_run):
    # dr_a agrees with the judge on acceptance everywhere; dr_b accepts q1 (which the judge rejected).
    judge_accepts = {"q0": True, "q1": False, "q2": True, "q3": False}
    session = ReviewSession(judged_run, "dr_a")
    first = session.state()["item"]["id"]
    session.grade({"id": first, "criteria": {c: judge_accepts[first] for c in IDS}, "accepted": judge_accepts[first]})
    again = ReviewSession(judged_run, "dr_a").state()  # a restart resumes after the graded answer
    assert again["n_graded"] == 1 and again["item"]["id"] != first
    for item_id in judge_accepts:
        if item_id != first:
            session.grade({"id": item_id, "criteria": {c: judge_accepts[item_id] for c in IDS},
                           "accepted": judge_accepts[item_id]})
    other = ReviewSession(judged_run, "dr_b")
    assert other.state()["n_graded"] == 0  # each reviewer grades everything
    for item_id, accepted in judge_accepts.items():
        human = accepted or item_id == "q1"
        other.grade({"id": item_id, "criteria": {c: human for c in IDS}, "accepted": human})
    summary = json.loads((judged_run / "summary.json").read_text())
    agreement = summary["human_agreement"]
    assert agreement["reviewers"] == {"dr_a": 4, "dr_b": 4}
    assert agreement["by_reviewer"]["dr_a"]["acceptance"]["kappa"] == 1.0
    # dr_b: 3 of 4 agree; judge yes 2/4, dr_b yes 3/4 → pe = 0.5, κ = (0.75 − 0.5) / 0.5 = 0.5
    assert agreement["by_reviewer"]["dr_b"]["acceptance"]["kappa"] == pytest.approx(0.5)
    assert agreement["pooled"]["acceptance"]["n"] == 8 and agreement["pooled"]["criteria"]["diagnosis"]["n"] == 8
    assert set(agreement["by_reviewer"]["dr_b"]["criteria"]) == set(IDS)
    assert agreement["between_reviewers"]["dr_a vs dr_b"]["acceptance"]["kappa"] == pytest.approx(0.5)
    report = (judged_run / "report.md").read_text()
    assert "## Judge–human agreement" in report and "| dr_b | 0.50 |" in report and "κ `diagnosis`" in report
    markdown, _, _ = compare_runs([judged_run])
    assert "κ acceptance, judge vs human" in markdown and "0.75 (n 8, 2 reviewers)" in markdown


def test_a_grade_on_an_answer_that_changed_since_is_stale(judged_run, tmp_path):
    session = ReviewSession(judged_run, "dr_a")
    session.grade({"id": "q0", "criteria": {c: True for c in IDS}, "accepted": True})
    write_answers(tmp_path / "answers.jsonl", ["Lobular carcinoma."] + ANSWERS[1:], slide="S1")  # q0 changed
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = judge_answers_file(tmp_path / "answers.jsonl", judged_run, f"openai:test-model@{server.url}")
    assert result.summary["human_agreement"]["n_stale"] == 1 and result.summary["human_agreement"]["reviewers"] == {}
    assert ReviewSession(judged_run, "dr_a").state()["n_graded"] == 0  # the new answer needs a new grade


def test_logins_are_required_off_loopback_and_guessing_is_braked(judged_run):
    session = ReviewSession(judged_run, "dr_a")
    with pytest.raises(EvalError, match="add --auth"):
        with serve_review(session, host="0.0.0.0"):
            pass
    with serve_review(session, auth=[("path", "s3cret")]) as url:
        assert call(url, "api/state")[0] == 401
        assert call(url, "api/state", auth="path:s3cret")[0] == 200
        for _ in range(FAILED_LOGINS_ALLOWED):
            assert call(url, "api/state", auth="path:guess")[0] == 401
        assert call(url, "api/state", auth="path:s3cret")[0] == 429  # this client waits out the window


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "<script>"])
def test_reviewer_names_are_checked(judged_run, name):
    with pytest.raises(EvalError, match="--reviewer"):
        ReviewSession(judged_run, name)


def test_the_review_command_refuses_bad_input_in_one_sentence(judged_run, tmp_path):
    from .test_cli import run_cli

    for args, expected in (([judged_run, "--reviewer", "a/b"], "--reviewer 'a/b' must be"),
                           ([tmp_path / "nowhere", "--reviewer", "dr_a"], "Run folder not found"),
                           ([judged_run, "--reviewer", "dr_a", "--host", "0.0.0.0"], "add --auth"),
                           ([judged_run, "--reviewer", "dr_a", "--auth", "nopassword"], "USER:PASSWORD")):
        result = run_cli("review", *args)
        assert result.returncode == 2 and expected in " ".join(result.stderr.split()), result.stderr
        assert "Traceback" not in result.stderr
