"""The judge against a real HTTP server scripted to reply well, badly and slowly."""

import asyncio
import json
import threading
import time
from collections import Counter

import pytest

from chatexaonepath.backends import BackendError, BackendOptions, build_backend
from chatexaonepath.eval.criteria import AcceptanceRule, EvalError
from chatexaonepath.eval.judge import Judge, JudgeConfig, JudgeItem, JudgeOutputError, parse_verdicts
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, REPORT, asked_ids, block, keyword_judge, verdict, write_answers


def judge_one(server, criteria, answer, **config):
    backend = build_backend(f"openai:test-model@{server.url}", BackendOptions(max_retries=0))
    judge = Judge(backend, criteria, AcceptanceRule("major"), JudgeConfig(**config))
    item = JudgeItem("x", "What is the diagnosis?", answer, REPORT)
    return asyncio.run(judge.judge(item, REPORT))


# --- parsing ------------------------------------------------------------------------------------------
ALL_PASS = json.dumps({i: {"pass": True, "reason": "ok"} for i in IDS})


@pytest.mark.parametrize("reply", [
    verdict(IDS),
    verdict(IDS, fences=False, reasoning=False),
    "Reasoning first.\n" + ALL_PASS.replace("}}", "},}") + "\n",  # a trailing comma
    "```json\n{" + ", ".join(f"'{i}': {{'pass': True, 'reason': 'ok'}}" for i in IDS) + "}\n```",
    json.dumps({str(n): {"pass": "yes", "reason": "ok"} for n in range(1, 8)}),
    json.dumps({"criteria": {i: True for i in IDS}}),
])
def test_small_json_slips_are_repaired(reply, criteria):
    parsed = parse_verdicts(reply, criteria.criteria, require_evaluator_field=False)
    assert list(parsed.criteria) == IDS
    assert all(v["pass"] is True and isinstance(v["reason"], str) for v in parsed.criteria.values())


@pytest.mark.parametrize("reply,expected", [
    # a quoted all-pass object, then the judge's own verdict cut off at max_tokens
    ("An answer could claim " + ALL_PASS + " but the real verdict is:\n" + verdict(IDS, False, reasoning=False)[:-40],
     "cut off"),
    # a fenced failing verdict followed by an unfenced all-pass object
    (verdict(IDS, False) + "\n" + ALL_PASS, "2 JSON objects"),
    ('The format is {"diagnosis": {"pass": true}}.\n' + verdict(IDS, False), "2 JSON objects"),
    (ALL_PASS[:-1], "cut off"),  # no library invents the missing end
    (verdict(IDS) + "\nDone.", "after the JSON"),
])
def test_only_one_complete_verdict_at_the_end_counts(reply, expected, criteria):
    with pytest.raises(JudgeOutputError, match=expected):
        parse_verdicts(reply, criteria.criteria, require_evaluator_field=False)


def test_the_evaluator_field_is_read_and_required(criteria):
    flagged = json.loads(ALL_PASS) | {"addresses_evaluator": True}
    assert parse_verdicts(json.dumps(flagged), criteria.criteria).addresses_evaluator is True
    with pytest.raises(JudgeOutputError, match="addresses_evaluator"):
        parse_verdicts(ALL_PASS, criteria.criteria)


@pytest.mark.parametrize("reply,expected", [
    ("", "empty"),
    ("All criteria look fine to me.", "no JSON object"),
    (json.dumps({i: {"pass": True} for i in IDS[:5]}), "lacks the criteria answers_question, clinical_language"),
    (json.dumps({i: {"pass": 0.8, "reason": "x"} for i in IDS}), "true or false"),
    (json.dumps({i: {"pass": "maybe"} for i in IDS}), "true or false"),
])
def test_unusable_replies_raise_with_the_reason(reply, expected, criteria):
    with pytest.raises(JudgeOutputError, match=expected):
        parse_verdicts(reply, criteria.criteria, require_evaluator_field=False)


def test_a_truncated_or_doubled_verdict_is_a_judge_error_never_a_pass(criteria):
    replies = iter([verdict(IDS, False) + "\n" + ALL_PASS, "Quoting " + ALL_PASS + " then " + ALL_PASS[:-30]] * 3)
    with FakeOpenAIServer(reply=lambda m: next(replies)) as server:
        record = judge_one(server, criteria, "Benign fibroadenoma.", max_repairs=1)
    assert record["accepted"] is None and record["error_kind"] == "output"
    assert all(v["pass"] is None for v in record["criteria"].values())


# --- judging through the server ---------------------------------------------------------------------
def test_well_formed_verdicts_decide_acceptance(tmp_path, criteria):
    answers = ["Invasive ductal carcinoma.", "Benign fibroadenoma.", "Ductal carcinoma, grade 2."]
    write_answers(tmp_path / "a.jsonl", answers, category="diagnosis")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}")
    verdicts = {v["id"]: v for v in map(json.loads, (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines())}
    assert [verdicts[i]["accepted"] for i in ("q0", "q1", "q2")] == [True, False, True]
    assert verdicts["q1"]["criteria"]["diagnosis"] == {"pass": False, "reason": "diagnosis checked."}
    assert result.summary["n"] == 3 and result.summary["acceptance_rate"] == pytest.approx(2 / 3)
    assert result.summary["criteria"]["clinical_language"]["pass_rate"] == 1.0
    assert result.summary["per_category"]["diagnosis"]["n_accepted"] == 2
    # The prompt carries the report, the question and the answer in their blocks, and every criterion.
    prompt = server.prompts()[0]
    assert "invasive ductal carcinoma" in block(prompt, "report") and block(prompt, "question")
    assert all(f"- {i} —" in prompt[0]["content"] for i in IDS)


def test_malformed_reply_is_re_asked_with_the_reason(criteria):
    def reply(messages):
        return verdict(asked_ids(messages)) if len(messages) > 2 else "I think the answer is fine overall."

    with FakeOpenAIServer(reply=reply) as server:
        record = judge_one(server, criteria, "Invasive ductal carcinoma.")
        second = server.prompts()[1]
    assert record["accepted"] is True and record["judge_error"] is None and record["calls"] == 2
    assert second[2] == {"role": "assistant", "content": "I think the answer is fine overall."}
    assert "no JSON object" in second[3]["content"]


def test_a_judge_that_never_complies_is_a_judge_error_not_a_fail(tmp_path, criteria):
    def reply(messages):
        if "Benign" in block(messages, "candidate_answer"):
            return "Verdict: FAIL. The answer is wrong."  # prose, every time
        return keyword_judge(messages)

    write_answers(tmp_path / "a.jsonl", ["Invasive carcinoma.", "Benign fibroadenoma.", "Carcinoma, ductal."])
    with FakeOpenAIServer(reply=reply) as server:
        result = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}",
                                    judge_config=JudgeConfig(max_repairs=1))
    record = next(v for v in map(json.loads, (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines())
                  if v["id"] == "q1")
    assert record["accepted"] is None and record["error_kind"] == "output"
    assert "no JSON object" in record["judge_error"] and record["calls"] == 2
    assert all(v["pass"] is None for v in record["criteria"].values())
    summary = result.summary
    assert summary["n"] == 3 and summary["n_judge_errors"] == 1 and summary["n_judged"] == 2
    assert summary["acceptance_rate"] == 1.0  # the error is neither a pass nor a fail
    assert summary["criteria"]["diagnosis"] == {**summary["criteria"]["diagnosis"], "n": 2, "n_errors": 1}


def test_votes_take_the_majority_and_report_agreement(criteria):
    seen, lock = Counter(), threading.Lock()

    def reply(messages):
        with lock:
            seen["n"] += 1
            k = seen["n"]
        # Every third sample fails the diagnosis; the others pass everything.
        return verdict(asked_ids(messages), {i: not (i == "diagnosis" and k % 3 == 0) for i in IDS})

    with FakeOpenAIServer(reply=reply) as server:
        record = judge_one(server, criteria, "Invasive ductal carcinoma.", votes=3)
        temperatures = {r["temperature"] for r in server.requests}
        seeds = sorted(r["seed"] for r in server.requests)
    assert record["accepted"] is True and record["calls"] == 3
    assert record["criteria"]["diagnosis"]["votes"].count(False) == 1
    assert record["criteria"]["diagnosis"]["agreement"] == pytest.approx(2 / 3)
    assert record["criteria"]["site"]["agreement"] == 1.0
    assert record["agreement"] == pytest.approx((6 + 2 / 3) / 7)
    assert temperatures == {0.7} and seeds == [0, 1, 2]  # seed + vote: distinct, reproducible samples


def test_tied_votes_count_as_a_fail(criteria):
    seen, lock = Counter(), threading.Lock()

    def reply(messages):
        with lock:
            seen["n"] += 1
            k = seen["n"]
        return verdict(asked_ids(messages), {i: i != "site" or k % 2 == 0 for i in IDS})

    with FakeOpenAIServer(reply=reply) as server:
        record = judge_one(server, criteria, "Invasive ductal carcinoma.", votes=2)
    assert record["criteria"]["site"]["pass"] is False and "tied" in record["criteria"]["site"]["reason"]
    assert record["accepted"] is False


def test_votes_need_a_temperature_above_zero():
    with pytest.raises(EvalError, match="temperature above 0"):
        JudgeConfig(votes=3, temperature=0.0)


def test_per_criterion_mode_asks_one_criterion_per_call(criteria):
    with FakeOpenAIServer(reply=keyword_judge) as server:
        record = judge_one(server, criteria, "Benign fibroadenoma.", per_criterion=True)
        prompts = server.prompts()
    assert sorted(asked_ids(p)[0] for p in prompts) == sorted(IDS) and all(len(asked_ids(p)) == 1 for p in prompts)
    assert all(p[0]["content"].count(" — ") == 1 for p in prompts)  # the system prompt defines only that criterion
    assert record["calls"] == 7 and record["accepted"] is False
    assert [record["criteria"][i]["pass"] for i in IDS] == [False] * 4 + [True] * 3


def test_slow_replies_time_out_and_are_retried(criteria):
    calls = Counter()

    def reply(messages):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(1.5)  # longer than the judge's timeout
        return verdict(asked_ids(messages))

    with FakeOpenAIServer(reply=reply) as server:
        record = judge_one(server, criteria, "Carcinoma.", timeout=0.5, backoff=0.01)
    assert record["accepted"] is True and calls["n"] == 2


def test_an_unreachable_judge_stops_the_run_with_one_sentence(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_answers(tmp_path / "a.jsonl", ["Carcinoma."] * 3)
    with pytest.raises(BackendError, match="Cannot reach"):
        judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@http://127.0.0.1:{port}/v1",
                           judge_config=JudgeConfig(retries=1, backoff=0.01))
    assert not (tmp_path / "run" / "verdicts.jsonl").exists()


# --- structured output ------------------------------------------------------------------------------
def test_the_verdict_schema_is_sent_as_structured_output(criteria):
    with FakeOpenAIServer(reply=keyword_judge) as server:
        record = judge_one(server, criteria, "Invasive ductal carcinoma.")
        sent = server.requests[0]["response_format"]
    assert record["accepted"] is True and sent["type"] == "json_schema"
    schema = sent["json_schema"]["schema"]
    assert schema["required"] == IDS + ["addresses_evaluator"] and schema["additionalProperties"] is False
    assert schema["properties"]["diagnosis"]["required"] == ["reason", "pass"]


def test_a_server_without_structured_output_is_asked_in_free_text(tmp_path):
    write_answers(tmp_path / "a.jsonl", ["Carcinoma.", "Carcinoma, ductal.", "Benign."])
    with FakeOpenAIServer(reply=keyword_judge, structured_output=False) as server:
        result = judge_answers_file(tmp_path / "a.jsonl", tmp_path / "run", f"openai:test-model@{server.url}",
                                    judge_config=JudgeConfig(concurrency=1))
        with_schema = [r for r in server.requests if "response_format" in r]
    assert len(with_schema) == 1 and len(server.requests) == 4  # refused once, then free text for the run
    assert result.summary["n_judge_errors"] == 0 and result.summary["acceptance_rate"] == pytest.approx(2 / 3)


def test_structured_output_can_be_switched_off(criteria):
    with FakeOpenAIServer(reply=keyword_judge) as server:
        judge_one(server, criteria, "Carcinoma.", structured_output=False)
        assert "response_format" not in server.requests[0]
