"""`chatexaonepath eval …` as a user runs it: real processes, real exit codes."""

import json
import os
import subprocess
import sys

import pytest

from chatexaonepath.loopback import FakeOpenAIServer

from .judges import keyword_judge, write_answers


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "chatexaonepath.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_judge_then_compare_from_the_command_line(tmp_path):
    write_answers(tmp_path / "base.jsonl", ["Benign.", "Carcinoma."])
    write_answers(tmp_path / "ours.jsonl", ["Carcinoma.", "Carcinoma."])
    with FakeOpenAIServer(reply=keyword_judge) as server:
        for name in ("base", "ours"):
            result = run_cli("judge", "--answers", tmp_path / f"{name}.jsonl", "--judge",
                             f"openai:test-model@{server.url}", "--out", tmp_path / name, "--quiet")
            assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ours" / "summary.json").read_text())["acceptance_rate"] == 1.0
    result = run_cli("compare", tmp_path / "base", tmp_path / "ours", "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    assert "| base | 2 | 50.0%" in result.stdout and "| ours | 2 | 100.0%" in result.stdout
    assert (tmp_path / "cmp" / "compare.png").exists() and "Traceback" not in result.stderr


def test_user_errors_exit_2_with_one_sentence(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma."])
    cases = [
        (["judge", "--answers", tmp_path / "missing.jsonl", "--judge", "openai:m@http://127.0.0.1:9/v1", "--out",
          tmp_path / "r"], "not found"),
        (["judge", "--answers", tmp_path / "a.jsonl", "--judge", "openai:m@http://127.0.0.1:9/v1", "--out",
          tmp_path / "r", "--votes", "3", "--temperature", "0"], "temperature above 0"),
        (["compare", tmp_path], "no summary.json"),
    ]
    for args, expected in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_eval_run_end_to_end_with_a_tiny_model_and_the_embedded_judge(workspace, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--model", workspace / "ckpt", "--data", workspace / "test.json", "--features",
                     workspace / "features", "--reports", workspace / "reports", "--judge", "local:embedded",
                     "--out", out, "--max-new-tokens", "4", "--judge-max-tokens", "48", "--max-repairs", "0",
                     "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert "acceptance" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert summary["n"] == summary["n_items"] == len(verdicts) == 4
    # A 135M judge often writes no usable JSON: every such verdict is a judge error, never a pass or a fail.
    assert summary["n_judged"] + summary["n_judge_errors"] >= summary["n"]
    for v in verdicts:
        assert (v["accepted"] is None) == bool(v["judge_error"]) or v["flags"]
    assert summary["judge"] == "local:embedded" and (out / "criteria.png").exists() and (out / "report.md").exists()


def test_closed_scoring_and_its_refusals_from_the_command_line(tmp_path):
    from .closed_fixtures import write_wsi_bench

    choice, _ = write_wsi_bench(tmp_path)
    ids = [r["id"] for r in json.loads(choice.read_text())]
    (tmp_path / "theirs.jsonl").write_text("".join(json.dumps({"id": i, "answer": "B"}) + "\n" for i in ids))
    result = run_cli("closed", "--data", choice, "--answers", tmp_path / "theirs.jsonl", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["overall"]["n"] == 10 and summary["overall"]["correct"] == 3  # "B" is right 3 times in the key
    assert "accuracy 30.0%" in result.stdout + result.stderr
    (tmp_path / "bad.csv").write_text("ID,Slide,Question,A,B,Answer\n1,S1,Which?,x,y,C\n")
    cases = [(["closed", "--data", tmp_path / "bad.csv", "--answers", tmp_path / "theirs.jsonl", "--out", tmp_path / "r"],
              "bad.csv row 2: the answer 'C' is not one of its options A, B"),
             (["closed", "--data", choice, "--out", tmp_path / "r"], "Give either --model")]
    for args, expected in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr, result.stderr
