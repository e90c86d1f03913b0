"""A hostile or broken judge reply is that one item's judge error, never the end of the run (issue 29, item 7)."""

import json
import time

import pytest

from chatexaonepath.eval import judge as judge_module
from chatexaonepath.eval.criteria import load_criteria
from chatexaonepath.eval.judge import JudgeConfig, JudgeOutputError, parse_verdicts
from chatexaonepath.eval.parsing import MAX_DEPTH
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import block, keyword_judge, write_answers

NESTED = '{"diagnosis": ' + "[" * 100_000 + "]" * 100_000 + "}"  # json.loads → RecursionError
HUGE = '{"diagnosis": {"pass": true, "reason": "' + "x" * 20_000_000 + '"}}'  # 20 MB


def hostile(messages):
    answer = block(messages, "candidate_answer")
    if "NESTED" in answer:
        return NESTED
    if "HUGE" in answer:
        return HUGE
    return keyword_judge(messages)


def test_nested_and_huge_replies_are_their_items_judge_errors_and_every_other_item_is_judged(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "NESTED carcinoma.", "Benign.", "HUGE carcinoma.", "Carcinoma."])
    started = time.perf_counter()
    with FakeOpenAIServer(reply=hostile) as server:
        result = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}",
                                    judge_config=JudgeConfig(max_repairs=0, concurrency=2))
    verdicts = {v["id"]: v for v in map(json.loads, (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines())}
    assert set(verdicts) == {"q0", "q1", "q2", "q3", "q4"}
    for hostile_id, why in (("q1", "characters long"), ("q3", "characters long")):
        assert verdicts[hostile_id]["accepted"] is None and verdicts[hostile_id]["error_kind"] == "output"
        assert why in verdicts[hostile_id]["judge_error"]
    assert [verdicts[i]["accepted"] for i in ("q0", "q2", "q4")] == [True, False, True]
    summary = result.summary
    assert summary["n_judged"] == 3 and summary["n_undecided"] == 2 and summary["acceptance_rate"] == pytest.approx(2 / 3)
    assert time.perf_counter() - started < 30  # the 20 MB reply is refused by its size, not parsed


def test_deep_nesting_within_the_size_limit_is_refused_before_decoding():
    criteria = load_criteria().criteria
    deep = '{"diagnosis": ' + "[" * 40_000 + "]" * 40_000 + "}"  # 80 KB: under the size cap
    with pytest.raises(JudgeOutputError, match=f"deeper than {MAX_DEPTH}"):
        parse_verdicts(deep, criteria)
    with pytest.raises(JudgeOutputError, match="characters long"):
        parse_verdicts(NESTED, criteria)
    started = time.perf_counter()
    with pytest.raises(JudgeOutputError, match="characters long"):
        parse_verdicts(HUGE, criteria)
    assert time.perf_counter() - started < 0.5


def test_an_unexpected_failure_judging_one_item_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = judge_module.precheck_flags

    def failing(answer):
        if "BREAK" in answer:
            raise RecursionError("maximum recursion depth exceeded")
        return real(answer)

    monkeypatch.setattr(judge_module, "precheck_flags", failing)
    write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "BREAK carcinoma.", "Carcinoma."])
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}")
    verdicts = {v["id"]: v for v in map(json.loads, (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines())}
    assert verdicts["q1"]["error_kind"] == "internal" and "RecursionError" in verdicts["q1"]["judge_error"]
    assert verdicts["q0"]["accepted"] is True and verdicts["q2"]["accepted"] is True
    assert result.summary["n_judge_errors"] == 1 and result.summary["n_undecided"] == 1
