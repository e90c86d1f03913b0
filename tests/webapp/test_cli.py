"""`python app.py` / `chatexaonepath app`: options, login parsing, and the real start-up."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.webapp.cli import main, parse_auth

ROOT = Path(__file__).resolve().parents[2]


def test_logins_are_user_colon_password():
    assert parse_auth(None) is None
    assert parse_auth(["ana:s3cret:with-colon", "ben:pw"]) == [("ana", "s3cret:with-colon"), ("ben", "pw")]
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(ChatEXAONEPathError, match="USER:PASSWORD") as caught:
            parse_auth([bad])
        assert "pw" not in str(caught.value)  # a password is never echoed back


def test_bad_options_are_one_sentence_and_exit_2(capsys):
    for argv, expected in ((["--auth", "nocolon"], "USER:PASSWORD"), (["--max-upload-gb", "0"], "max-upload-gb")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_help_lists_the_safety_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--share", "--auth", "--max-upload-gb", "--model", "--encoder-weights"):
        assert option in text


@pytest.mark.slow
def test_python_app_py_serves_the_default_within_a_minute_and_cleans_up(tmp_path):
    """The README's first command without its one-off demo build: embedded LLM, labelled demo weights, URL printed.

    `--untrained` skips the demo model, whose first build takes minutes (test_demo_model.py builds tiny
    ones and checks the app picks the demo without `--model`); everything else is the real start-up.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    for spaces_setting in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        env.pop(spaces_setting, None)
    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "app.py", "--untrained", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "ready in" in line or time.monotonic() - started > 120:
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/" in output, output
        assert time.monotonic() - started < 90, "the app took too long to start"
        assert "Demo weights — answers are not diagnostic" in output.replace("\n", " ")
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "ChatEXAONEPath" in page
        work_dirs = list(tmp_path.glob("chatexaonepath-app-*"))
        assert len(work_dirs) == 1 and oct(work_dirs[0].stat().st_mode)[-3:] == "700"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert not list(tmp_path.glob("chatexaonepath-app-*"))  # the private folder went with the app


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
