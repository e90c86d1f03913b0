"""The app served for real: what its HTTP routes take from a script — uploads without a page, of the wrong type
or past a budget, password guessing, and numbers that do not parse."""

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from chatexaonepath import fileio
from chatexaonepath.fileio import file_sha256
from tests.webapp.conftest import served

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def app(tiny_chat_model, tiny_encoder, tmp_path_factory):
    """One app with a login, served for the whole module: (engine, url)."""
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

    root = tmp_path_factory.mktemp("guarded")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), max_upload_gb=0.01, max_session_gb=0.012,
                                 example=False), example_path=root / "example.tiff", work_dir=root / "work")
    with served(engine, auth=[("ana", PASSWORD)]) as url:
        yield engine, url.rstrip("/")


def signed_in(url):
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/login", data={"username": "ana", "password": PASSWORD}).status_code == 200
    return client


def upload(client, name, data):
    return client.post("/gradio_api/upload", files={"files": (name, data)})


def stored_bytes(engine):
    folder = engine.work_dir / "gradio"
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_uploads_without_a_page_session_are_refused_before_they_are_stored(app, monkeypatch):
    from chatexaonepath.webapp import upload_gate

    monkeypatch.setattr(upload_gate, "START_GRACE_SECONDS", 0.2)  # how long a just-opened page may take to start
    engine, url = app
    client = signed_in(url)
    for _ in range(10):
        response = upload(client, "filler.png", b"\0" * (2 << 20))
        assert response.status_code == 403 and "Open the app's page first" in response.text
    assert stored_bytes(engine) < 64 * 1024


def test_a_page_session_uploads_slides_only_within_its_budget_hashed_on_the_way_in(app):
    engine, url = app
    client = signed_in(url)
    engine.start_session("page", client="127.0.0.1", user="ana")  # what the page's load event does
    try:
        refused = upload(client, "filler.bin", b"\1" * (4 << 20))
        assert refused.status_code == 415 and "filler.bin is not a slide format" in refused.text
        assert stored_bytes(engine) < 256 * 1024  # at most the chunk that carried the part's name
        data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4000
        response = upload(client, "export.png", data)
        assert response.status_code == 200
        path = response.json()[0]
        remembered = fileio._HASHES.get(fileio._HashMemo.identity(Path(path)))  # taken on the way in, not read
        assert remembered == file_sha256(path) == hashlib.sha256(data).hexdigest()
        assert upload(client, "huge.png", b"\0" * (12 << 20)).status_code == 413  # past --max-upload-gb
        assert upload(client, "second.png", b"\0" * (6 << 20)).status_code == 200
        over = upload(client, "third.png", b"\0" * (6 << 20))  # 1 + 6 + 6 MB unclaimed: past 12.9 MB
        assert over.status_code == 429 and "--max-session-gb" in over.text
        assert engine.uploads.sweep(now=time.monotonic() + 3600) == 2  # unclaimed: removed by the timer
        assert stored_bytes(engine) < 64 * 1024
    finally:
        engine.end_session("page", "ana")


def test_password_guessing_is_slowed_and_the_right_password_still_works(app):
    _, url = app
    client = httpx.Client(base_url=url, timeout=30)
    started, checked = time.perf_counter(), 0
    while time.perf_counter() - started < 2.0:
        status = client.post("/login", data={"username": "ana", "password": f"guess-{checked}"}).status_code
        assert status in (400, 429)
        checked += status == 400
    assert checked <= 2 * 5 + 1  # at most five tries a second were even checked
    time.sleep(1.2)
    assert client.post("/login", data={"username": "ana", "password": PASSWORD}).status_code == 200


@pytest.mark.parametrize("path", ["/viewer/s/x/tiles/" + "9" * 5000 + "/0_0.jpeg",
                                  "/viewer/s/x/region/" + "1" * 5000 + ",0,1,1.jpeg",
                                  "/viewer/s/x/patch/99999999999999999999.jpeg"])
def test_huge_numbers_in_viewer_urls_are_not_found_not_server_errors(app, path):
    _, url = app
    assert signed_in(url).get(path).status_code == 404


def test_an_upload_abandoned_mid_way_is_removed_by_the_sweep(app):
    """Gradio leaves the temp file of an upload whose client hung up; the engine's timer removes it."""
    import socket

    engine, url = app
    engine.start_session("page", client="127.0.0.1", user="ana")
    try:
        token = signed_in(url).cookies
        host, port = url.split("//")[1].split(":")
        boundary = "x" * 16
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="half.svs"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        cookies = "; ".join(f"{k}={v}" for k, v in token.items())
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nCookie: {cookies}\r\n"
                         f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                         f"Content-Length: {len(head) + (4 << 20)}\r\n\r\n").encode() + head + b"\0" * (1 << 20))
            time.sleep(1.0)  # the first MiB is written to Gradio's temp file; then the client hangs up
        folder = engine.work_dir / "gradio"
        deadline = time.monotonic() + 10
        while not [p for p in folder.iterdir() if p.is_file()] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in folder.iterdir() if p.is_file()], "no temp file was left to test with"
        time.sleep(1.1)
        engine.uploads.sweep(max_age=1.0, upload_dir=folder)
        assert not [p for p in folder.iterdir() if p.is_file()]
    finally:
        engine.end_session("page", "ana")


def test_the_sign_in_spacing_grows_with_failures_and_a_success_clears_it():
    from chatexaonepath.webapp.sign_in import Throttle

    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    keys = [("address", "10.0.0.1"), ("login", "ana")]
    admitted = 0
    for step in range(100):  # 10 s of a try every 0.1 s, every one a failure
        now[0] = step * 0.1
        if throttle.admit(keys) <= 0:
            admitted += 1
            throttle.outcome(keys, succeeded=False)
    assert admitted == 20 + 6 and throttle.admit(keys) > 0  # five a second up to 20 failures, then one a second
    now[0] += 1.0
    assert throttle.admit(keys) <= 0  # once the guessing stops, the next try is checked
    throttle.outcome(keys, succeeded=True)
    now[0] += 0.01
    assert throttle.admit(keys) <= 0  # a success clears the failures: no spacing left
    assert throttle.admit([("address", "10.0.0.2"), ("login", "ben")]) <= 0  # others were never slowed
