"""API keys and what each may use: the key file, 401s, two keys that cannot see each other, per-key limits."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from typer.testing import CliRunner

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.webapp.api import ApiKeys
from chatexaonepath.webapp.api.keys import ApiOwner
from tests.webapp.test_api import ask, client, engine, error_of, headless, upload, wait_processed  # noqa: F401 (engine: a fixture)

ANA = "ana-" + "a1" * 12
BEN = "ben-" + "b2" * 12


def key_file(tmp_path, text):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_key_file_takes_one_key_a_line_and_its_mistakes_never_quote_a_key(tmp_path):
    keys = ApiKeys.load(key_file(tmp_path, f"# lab keys\n\n{ANA} Dr Ana\n{BEN}\n"))
    assert len(keys) == 2 and keys.owner(ANA) == ApiOwner("Dr Ana") and keys.owner(BEN) == ApiOwner("key 2")
    assert keys.owner(ANA + "x") is None and keys.owner("") is None
    short = "tooshort-secret"
    for text, words in ((f"{short} ana\n", "at least 20"), (f"{ANA} ana\n{ANA} again\n", "repeats the key of line 1"),
                        (f"{ANA} ana\n{BEN} ana\n", "reuses the name 'ana'"), ("# nothing\n", "holds no keys")):
        with pytest.raises(ChatEXAONEPathError, match=words) as caught:
            ApiKeys.load(key_file(tmp_path, text))
        assert short not in str(caught.value) and ANA not in str(caught.value)
    with pytest.raises(ChatEXAONEPathError, match="Cannot read the API key file"):
        ApiKeys.load(tmp_path / "missing.txt")


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = key_file(tmp_path, f"{ANA}\n")
    ApiKeys.load(path)
    assert "chmod 600" not in caplog.text
    path.chmod(0o644)
    ApiKeys.load(path)
    assert "can be read by other users" in caplog.text and ANA not in caplog.text


def test_the_commands_refuse_a_network_address_without_keys_and_a_bad_key_file_before_loading(tmp_path):
    from chatexaonepath.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert refused.exit_code != 0 and "needs --api-key-file" in str(refused.exception or refused.output)
    bad = key_file(tmp_path, "short\n")
    for command in (["serve", "--api-key-file", str(bad)], ["app", "--api-key-file", str(bad)]):
        result = runner.invoke(app, command)
        assert isinstance(result.exception, ChatEXAONEPathError) and "at least 20" in str(result.exception)


@pytest.fixture(scope="module")
def two_keys(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("two-keys") / "keys.txt"
    path.write_text(f"{ANA} ana\n{BEN} ben\n")
    with headless(engine, ApiKeys.load(path)) as url:
        yield url


def test_two_keys_cannot_see_each_others_files_or_answers_and_keys_are_never_logged(two_keys, engine, slides,
                                                                                    caplog):
    caplog.set_level(logging.DEBUG)
    ana, ben = client(two_keys, ANA), client(two_keys, BEN)
    error_of(httpx.get(two_keys + "/models"), 401, "missing_api_key")
    error_of(client(two_keys, "Bearer-but-wrong-" + "x" * 20).get("/models"), 401, "invalid_api_key")
    error_of(httpx.get(two_keys + "/models", headers={"Authorization": f"Basic {ANA}"}), 401, "missing_api_key")

    file_id = upload(ana, slides["tumor"]).json()["id"]
    assert wait_processed(ana, file_id)["status"] == "processed"
    answer = ana.post("/chat/completions", json=ask(file_id, "Ana's private question?"))
    assert answer.status_code == 200

    # Ben gets exactly what an id that never existed gets: nothing says Ana's file is there.
    unknown = error_of(ben.get("/files/file-000000000000000000000000"), 404, "file_not_found")
    for response in (ben.get(f"/files/{file_id}"), ben.delete(f"/files/{file_id}"),
                     ben.post("/chat/completions", json=ask(file_id, "What did Ana ask?"))):
        assert error_of(response, 404, "file_not_found")["message"] == unknown["message"].replace(
            "file-000000000000000000000000", file_id)
    assert ben.get("/files").json()["data"] == []
    # Ben's upload of the very same bytes is a file and a conversation of his own.
    own = upload(ben, slides["tumor"]).json()["id"]
    assert own != file_id and wait_processed(ben, own)["status"] == "processed"
    assert ben.post("/chat/completions", json=ask(own, "Ben's question?")).status_code == 200
    assert [t.content for t in engine.find_session(own, ApiOwner("ben")).turns][0] == "Ben's question?"
    assert engine.find_session(file_id, ApiOwner("ben")) is None
    assert "Ana's private question?" in [t.content for t in engine.find_session(file_id, ApiOwner("ana")).turns]
    assert [f["id"] for f in ana.get("/files").json()["data"]] == [file_id]
    assert ana.get(f"/files/{file_id}").json()["status"] == "processed"  # Ben's delete did nothing

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "ana" in logged and ANA not in logged and BEN not in logged
    for response in (ana.delete(f"/files/{file_id}"), ben.delete(f"/files/{own}")):
        assert response.json()["deleted"]


def test_per_key_limits_on_files_requests_and_tokens(make_engine, slides, tmp_path):
    engine = make_engine(api_max_files_per_key=1, api_max_requests_per_key=1, api_max_tokens_per_minute=150)
    with headless(engine, ApiKeys.load(key_file(tmp_path, f"{ANA} ana\n{BEN} ben\n"))) as url:
        ana, ben = client(url, ANA), client(url, BEN)
        file_id = upload(ana, slides["tumor"]).json()["id"]
        error_of(upload(ana, slides["stroma"]), 429, "file_limit")  # --api-max-files-per-key 1
        assert wait_processed(ana, file_id)["status"] == "processed"

        with engine.model_slot():  # the model is busy: Ana's first answer waits, under way
            waiting = _post_in_background(ana, ask(file_id))
            time.sleep(0.5)
            busy = error_of(ana.post("/chat/completions", json=ask(file_id)), 429, "rate_limit_exceeded")
            assert "--api-max-requests-per-key" in busy["message"]
        assert waiting.result().status_code == 200
        first = waiting.result().json()["usage"]["total_tokens"]
        assert 75 < first <= 150 - 12  # the prompt (with its visual tokens) and the answer, counted
        assert ana.post("/chat/completions", json=ask(file_id)).status_code == 200
        spent = error_of(ana.post("/chat/completions", json=ask(file_id)), 429, "rate_limit_exceeded")
        assert "--api-max-tokens-per-minute" in spent["message"]
        own = upload(ben, slides["tumor"]).json()["id"]  # Ben's files and tokens are his own
        assert wait_processed(ben, own)["status"] == "processed"
        assert ben.post("/chat/completions", json=ask(own)).status_code == 200


def test_the_pages_own_limits_hold_for_api_files(make_engine, slides, tmp_path):
    engine = make_engine(max_sessions=2, max_requests_per_minute=2)
    with headless(engine, ApiKeys.load(key_file(tmp_path, f"{ANA} ana\n"))) as url:
        ana = client(url, ANA)
        file_id = upload(ana, slides["tumor"]).json()["id"]
        assert wait_processed(ana, file_id)["status"] == "processed"
        assert ana.post("/chat/completions", json=ask(file_id, max_tokens=1)).status_code == 200
        rate = error_of(ana.post("/chat/completions", json=ask(file_id, max_tokens=1)), 429, "server_busy")
        assert "--max-requests-per-minute" in rate["message"]  # the load and one question: the session's two
        # API files and the page's sessions share --max-sessions.
        engine.start_session("a-page", client="192.0.2.1")
        busy = error_of(upload(ana, slides["stroma"]), 429, "server_busy")
        assert "--max-sessions" in busy["message"] and not list((engine.work_dir / "api-uploads").glob("*/*"))
        ana.delete(f"/files/{file_id}")
        assert upload(ana, slides["stroma"]).status_code == 200


def _post_in_background(http, body):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(http.post, "/chat/completions", json=body)
    pool.shutdown(wait=False)
    return future
