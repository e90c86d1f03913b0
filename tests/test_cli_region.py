"""`chatexaonepath chat --region x,y,w,h`: the terminal asks about part of a slide, as the app's drawn regions do."""

import os
import subprocess
import sys

import pytest


def run_chat(*args, cache) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", CHATEXAONEPATH_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "chatexaonepath.cli", "chat", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize("region, words", [("10,20,30", "four whole numbers x,y,w,h"),
                                           ("1,2,3," + "9" * 5000, "level-0 pixels of at most")])
def test_a_malformed_region_is_one_sentence_and_exit_2(slides, tmp_path, region, words):
    result = run_chat(slides["tumor"], "--region", region, "--question", "Hi?", cache=tmp_path)
    assert result.returncode == 2 and words in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # two runs of a ViT-B/16 on a CPU: ~50 s
def test_chat_answers_about_a_region_and_names_its_evidence(slides, tmp_path):
    from tests.chat.conftest import make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm")
    common = ("--llm", llm, "--encoder", "random-vit-b16", "--max-new-tokens", "3")
    result = run_chat(slides["tumor"], *common, "--region", "0,0,1024,2048", "--question", "What is here?",
                      cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the answer; what it was about and its evidence go to the console (stderr)
    assert "about region 0,0,1024,2048" in result.stderr and "evidence (level-0 x,y, weight): #1 (" in result.stderr
    empty = run_chat(slides["tumor"], *common, "--region", "3000,3000,100,100", "--question", "And here?",
                     cache=tmp_path / "cache")
    assert empty.returncode == 2 and "outside the slide" in empty.stderr and "Traceback" not in empty.stderr
