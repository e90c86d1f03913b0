"""Judging runs: resume after a kill, retried backend failures, settings checks, reports by id, long reports."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.judge import JudgeConfig
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, REPORT, asked_ids, block, keyword_judge, verdict, write_answers


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_without_redoing_finished_verdicts(tmp_path):
    ids = write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "Benign."] * 6)
    out = tmp_path / "run"
    with FakeOpenAIServer(delay=0.2, reply=keyword_judge) as server:
        script = ("import sys; from chatexaonepath.eval.run import judge_answers_file; "
                  "from chatexaonepath.eval.judge import JudgeConfig; "
                  "judge_answers_file(sys.argv[1], sys.argv[2], sys.argv[3], judge_config=JudgeConfig(concurrency=2))")
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a.jsonl"), str(out),
                                  f"openai:test-model@{server.url}"], env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.time() + 60
        while time.time() < deadline and child.poll() is None:
            if (out / "verdicts.jsonl").exists() and len((out / "verdicts.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = {r["id"] for r in lines(out / "verdicts.jsonl")}
        assert 3 <= len(done) < len(ids)
        with open(out / "verdicts.jsonl", "a") as f:
            f.write('{"id": "q11", "accepted": tr')  # a record cut off mid-write by the kill
        before = len(server.requests)
        result = judge_answers_file(tmp_path / "a.jsonl", out, f"openai:test-model@{server.url}")
        asked = [block(m, "candidate_answer") for m in server.prompts()[before:]]
    assert len(asked) == len(ids) - len(done)  # only the missing verdicts were asked for
    records = lines(out / "verdicts.jsonl")
    assert sorted(r["id"] for r in records) == sorted(ids)  # compacted: one record per item, none lost
    assert result.summary["n"] == 12 and result.summary["acceptance_rate"] == 0.5


def test_backend_failures_are_recorded_undecided_and_retried_next_run(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "Carcinoma, again.", "Benign."])

    def flaky(messages):
        if "again" in block(messages, "candidate_answer"):
            raise RuntimeError("overloaded")  # the server answers HTTP 500
        return keyword_judge(messages)

    config = JudgeConfig(concurrency=1, retries=0)
    with FakeOpenAIServer(reply=flaky) as server:
        first = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}",
                                   judge_config=config)
    failed = next(r for r in lines(tmp_path / "run" / "verdicts.jsonl") if r["id"] == "q1")
    assert failed["accepted"] is None and failed["error_kind"] == "backend" and "HTTP 500" in failed["judge_error"]
    assert first.summary["n_judge_errors"] == 1 and first.summary["acceptance_rate"] == 0.5
    with FakeOpenAIServer(reply=keyword_judge) as healthy:  # the server is back (on another port: same model)
        second = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{healthy.url}",
                                    judge_config=config)
        assert [block(m, "candidate_answer") for m in healthy.prompts()] == ["Carcinoma, again."]
    assert second.summary["n_judge_errors"] == 0 and second.summary["acceptance_rate"] == pytest.approx(2 / 3)


def test_rerun_with_other_judge_settings_is_refused_but_a_new_rule_rescoring_is_free(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "Carcinoma."])
    style_fails = lambda m: verdict(asked_ids(m), {i: i != "clinical_language" for i in IDS})  # noqa: E731
    with FakeOpenAIServer(reply=style_fails) as server:
        spec = f"openai:test-model@{server.url}"
        assert judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", spec).summary["acceptance_rate"] == 1.0
        with pytest.raises(EvalError, match=r"votes: 1 → 3.*new --out"):
            judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", spec, judge_config=JudgeConfig(votes=3))
        requests = len(server.requests)
        strict = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", spec, rule="all")
        assert len(server.requests) == requests  # rescored from the stored verdicts, no new judge calls
    assert strict.summary["acceptance_rate"] == 0.0 and strict.summary["acceptance_rule"] == "all"
    assert all(r["accepted"] is False for r in lines(tmp_path / "run" / "verdicts.jsonl"))


def test_reports_are_resolved_by_id_and_missing_ones_are_one_sentence(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "R1.txt").write_text("DIAGNOSIS: Lung, lobectomy: squamous cell carcinoma, keratinizing.")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": 1, "question": "Diagnosis?", "answer": "Squamous cell carcinoma.",
                                   "report_id": "R1", "organ": "lung"}) + "\n")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = judge_answers_file(answers, tmp_path / "run", f"openai:test-model@{server.url}", reports=reports)
        assert "keratinizing" in block(server.prompts()[0], "report")
    assert result.summary["per_organ"]["lung"]["n_accepted"] == 1
    for record, expected in (({"report_id": "R2"}, "R2.txt does not exist"), ({}, "neither 'report' text")):
        answers.write_text(json.dumps({"id": "x", "question": "Q?", "answer": "A.", **record}) + "\n")
        with pytest.raises(EvalError, match=expected):
            judge_answers_file(answers, tmp_path / "bad", "openai:m@http://127.0.0.1:9/v1", reports=reports)


def test_long_reports_are_judged_on_their_most_relevant_passages(tmp_path):
    filler = " ".join(f"Cassette {i} contains fatty breast tissue without abnormality." for i in range(40))
    report = (f"GROSS DESCRIPTION:\n{filler}\n\nFINAL DIAGNOSIS:\nInvasive lobular carcinoma of the right breast, "
              f"grade 2, with negative margins.\n\nCOMMENT:\nE-cadherin is negative in the tumor cells.")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "long", "question": "What is the diagnosis?",
                                   "answer": "Invasive lobular carcinoma.", "report": report}) + "\n")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = judge_answers_file(answers, tmp_path / "run", f"openai:test-model@{server.url}",
                                    judge_config=JudgeConfig(max_report_chars=600, chunk_chars=300))
        sent = block(server.prompts()[0], "report")
    assert len(report) > 2000 and len(sent) <= 700
    assert "Invasive lobular carcinoma of the right breast" in sent and "[diagnosis]" in sent
    assert "passages most relevant" in server.prompts()[0][1]["content"]
    assert lines(tmp_path / "run" / "verdicts.jsonl")[0]["report_excerpted"] is True
    assert result.summary["n_report_excerpted"] == 1


def test_a_changed_answer_is_judged_again_not_reused(tmp_path):
    (tmp_path / "a1.jsonl").write_text(json.dumps({"id": "q1", "question": "What is the diagnosis?",
                                                   "answer": "Invasive ductal carcinoma.", "report": REPORT}) + "\n")
    (tmp_path / "a2.jsonl").write_text(json.dumps({"id": "q1", "question": "What is the diagnosis?",
                                                   "answer": "Benign fibroadenoma.", "report": REPORT}) + "\n")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        spec = f"openai:test-model@{server.url}"
        first = judge_answers_file(tmp_path / "a1.jsonl", tmp_path / "run", spec)
        assert first.summary["acceptance_rate"] == 1.0 and len(server.requests) == 1
        second = judge_answers_file(tmp_path / "a2.jsonl", tmp_path / "run", spec)
        assert len(server.requests) == 2  # the new answer was judged, not matched to the old verdict by id
        assert [block(m, "candidate_answer") for m in server.prompts()[1:]] == ["Benign fibroadenoma."]
        third = judge_answers_file(tmp_path / "a2.jsonl", tmp_path / "run", spec)
        assert len(server.requests) == 2  # unchanged: resumed, not judged again
    assert second.summary["acceptance_rate"] == 0.0 and second.summary["n_rejudged_changed"] == 1
    assert third.summary["n_rejudged_changed"] == 0
    (record,) = lines(tmp_path / "run" / "verdicts.jsonl")
    assert record["accepted"] is False and len(record["input_hash"]) == 64


def test_a_changed_report_is_judged_again(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma."])
    with FakeOpenAIServer(reply=keyword_judge) as server:
        spec = f"openai:test-model@{server.url}"
        judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", spec)
        rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
        rows[0]["report"] = "FINAL DIAGNOSIS: Colon, biopsy: tubular adenoma."
        (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
        judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", spec)
        assert len(server.requests) == 2 and "tubular adenoma" in block(server.prompts()[1], "report")


def test_an_over_long_report_id_is_one_sentence(tmp_path):
    (tmp_path / "reports").mkdir()
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "x", "question": "Q?", "answer": "A.", "report_id": "r" * 300}) + "\n")
    with pytest.raises(EvalError, match="300 bytes, longer than the 200"):
        judge_answers_file(answers, tmp_path / "run", "openai:m@http://127.0.0.1:9/v1", reports=tmp_path / "reports")
