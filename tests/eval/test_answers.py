"""`eval run`: answers from a tiny untrained checkpoint, then judgements (test data in LLaVA format)."""

import json

import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.eval.answers import GenerateConfig, generate_answers
from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.data import JsonlLog, load_test_items
from chatexaonepath.eval.run import run_eval
from chatexaonepath.loopback import FakeOpenAIServer
from .judges import block, keyword_judge

def config_for(ws, **kwargs):
    return GenerateConfig(model=str(ws / "ckpt"), data=str(ws / "test.json"), features=str(ws / "features"),
                          reports=str(ws / "reports"), max_new_tokens=6, **kwargs)


def test_test_items_one_per_gpt_turn_with_reference_history_and_reports(workspace):
    items = {i.id: i for i in load_test_items(workspace / "test.json", workspace / "features", workspace / "reports")}
    assert list(items) == ["rec1#1", "rec1#2", "rec2", "rec3"]
    second = items["rec1#2"]
    assert [t.role for t in second.turns] == ["user", "assistant", "user"]
    assert second.turns[1].content == "Adenocarcinoma." and second.question == "What is the grade?"
    assert second.reference == "Moderately differentiated." and second.category == "grade" and second.organ == "colon"
    assert (items["rec1#1"].report_source, items["rec2"].report_source, items["rec3"].report_source) == \
        ("file", "record", "reference")
    assert "squamous cell carcinoma" in items["rec3"].report  # no report: judged against its reference answers
    assert items["rec2"].features.name == "S2.h5" and items["rec3"].features.suffix == ".pt"
    assert items["rec1#1"].question == "What is the diagnosis?"  # the placeholder is not part of the question


def test_missing_features_are_one_sentence_before_anything_runs(workspace, tmp_path):
    data = [{"id": "x", "image": "NOPE", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}]
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(EvalError, match="1 of 1 test items have no features file .*'NOPE'"):
        load_test_items(tmp_path / "t.json", workspace / "features")


def test_run_answers_then_judges_and_resumes(workspace, tmp_path):
    out = tmp_path / "run"
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = run_eval(config_for(workspace, batch_size=3), out, f"openai:test-model@{server.url}")
        judged = {block(m, "question") for m in server.prompts()}
    answers = {r["id"]: r for r in JsonlLog(out / "answers.jsonl").records()}
    assert set(answers) == {"rec1#1", "rec1#2", "rec2", "rec3"}
    assert all(isinstance(a["answer"], str) and a["new_tokens"] <= 6 for a in answers.values())
    assert answers["rec1#1"]["report"].startswith("FINAL DIAGNOSIS") and answers["rec2"]["organ"] is None
    assert judged == {"What is the diagnosis?", "What is the grade?", "Which organ is this?", "Is there carcinoma?"}
    summary = result.summary
    assert summary["n"] == summary["n_items"] == 4 and summary["n_judged"] == 4
    assert summary["report_sources"] == {"record": 1, "file": 2, "reference": 1}
    assert set(summary["per_category"]) == {"diagnosis", "grade", "organ"}
    config = json.loads((out / "eval_config.json").read_text())
    assert config["generation"]["max_new_tokens"] == 6 and config["judge"]["votes"] == 1

    # Rerun after losing one answer (and a half-written line): only that answer is generated again.
    kept = [r for r in JsonlLog(out / "answers.jsonl").records() if r["id"] != "rec2"]
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "rec2", "ans')
    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    calls = []
    original = model.generate
    model.generate = lambda input_ids, *a, **k: calls.append(input_ids.shape[0]) or original(input_ids, *a, **k)
    with FakeOpenAIServer(reply=keyword_judge) as server:
        run_eval(config_for(workspace), out, f"openai:test-model@{server.url}", model=model)
        assert server.requests == []  # every answer already had its verdict
    assert calls == [1]
    again = {r["id"]: r for r in JsonlLog(out / "answers.jsonl").records()}
    assert again["rec2"]["answer"] == answers["rec2"]["answer"]  # greedy: the same answer as before


def test_batched_answers_match_one_at_a_time(workspace, tmp_path):
    items = load_test_items(workspace / "test.json", workspace / "features", workspace / "reports")
    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    texts = []
    for batch_size in (1, 4):
        log = JsonlLog(tmp_path / f"b{batch_size}.jsonl")
        generate_answers(items, config_for(workspace, batch_size=batch_size), log, model=model)
        texts.append({r["id"]: r["answer"] for r in log.records()})
    assert texts[0] == texts[1]  # left padding changes nothing


def test_unreadable_features_skip_their_items_and_the_rest_is_judged(workspace, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for name in ("S1.h5", "S2.h5"):
        (features / name).write_bytes((workspace / "features" / name).read_bytes())
    (features / "S2.h5").write_bytes(b"not an hdf5 file")
    config = GenerateConfig(model=str(workspace / "ckpt"), data=str(workspace / "test.json"), features=str(features),
                            reports=str(workspace / "reports"), max_new_tokens=4)
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = run_eval(config, tmp_path / "run", f"openai:test-model@{server.url}")
    assert result.summary["n_skipped"] == 1 and result.summary["skipped"][0]["id"] == "rec2"
    assert "not a readable HDF5" in result.summary["skipped"][0]["error"]
    assert result.summary["n"] == 3 and result.summary["n_items"] == 4
    assert JsonlLog(tmp_path / "run" / "errors.jsonl").records()[0]["id"] == "rec2"


def test_answers_decode_like_the_app_and_chat_and_the_settings_are_recorded(workspace, tmp_path):
    from chatexaonepath.chat.session import repetition_defaults

    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    seen = []
    original = model.generate
    model.generate = lambda input_ids, feats, **k: seen.append(k) or original(input_ids, feats, **k)
    with FakeOpenAIServer(reply=keyword_judge) as server:
        result = run_eval(config_for(workspace), tmp_path / "run", f"openai:test-model@{server.url}", model=model)
    penalty, ngram = repetition_defaults(model.llm)  # what ChatSession and the app's sliders start from
    assert (penalty, ngram) == (1.15, 6)
    assert seen and all(k["repetition_penalty"] == penalty and k["no_repeat_ngram_size"] == ngram
                        and k["do_sample"] is False for k in seen)
    assert result.summary["decoding"] == {"do_sample": False, "temperature": 0.0, "max_new_tokens": 6,
                                          "repetition_penalty": 1.15, "no_repeat_ngram_size": 6,
                                          "source": "chat/app defaults"}
    assert json.loads((tmp_path / "run" / "eval_config.json").read_text())["decoding"] == result.summary["decoding"]
    assert "repetition penalty 1.15, no-repeat n-gram 6" in (tmp_path / "run" / "report.md").read_text()
    with FakeOpenAIServer(reply=keyword_judge) as server:  # other guards on the same folder: refused
        with pytest.raises(EvalError, match="other settings.*repetition_penalty"):
            run_eval(config_for(workspace, repetition_penalty=1.3), tmp_path / "run", f"openai:test-model@{server.url}",
                     model=model)


def test_answers_made_before_decoding_was_recorded_are_not_mixed_with_new_ones(workspace, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "answers.jsonl").write_text(json.dumps({"id": "rec2", "answer": "Liver.", "question": "Which organ is this?",
                                                   "report": "Liver."}) + "\n")
    with FakeOpenAIServer(reply=keyword_judge) as server:
        with pytest.raises(EvalError, match="made before evaluation decoded like the app"):
            run_eval(config_for(workspace), out, f"openai:test-model@{server.url}")


def test_eval_run_with_baselines_judges_them_and_reports_slide_dependence(workspace, tmp_path):
    from .judges import asked_ids, verdict

    def slide_sensitive(messages):  # accepts answers given with a slide, rejects the blind ones
        blind = "BLIND" in block(messages, "candidate_answer")
        return verdict(asked_ids(messages), not blind)

    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    original = model.llm.generate

    def tagged(**kwargs):  # mark the blind answers (the LLM called alone, without the tower) so the judge sees them
        out = original(**kwargs)
        if not getattr(model, "_in_tower", False):
            bad = model.tokenizer("BLIND", add_special_tokens=False).input_ids
            out = torch.cat([torch.tensor([bad] * out.shape[0]), out], dim=1)
        return out

    tower = model.generate

    def via_tower(*args, **kwargs):
        model._in_tower = True
        try:
            return tower(*args, **kwargs)
        finally:
            model._in_tower = False

    model.llm.generate, model.generate = tagged, via_tower
    with FakeOpenAIServer(reply=slide_sensitive) as server:
        result = run_eval(config_for(workspace, batch_size=4), tmp_path / "run", f"openai:test-model@{server.url}",
                          model=model, baselines="blind,shuffled")
    out, summary = tmp_path / "run", result.summary
    for name in ("answers_blind.jsonl", "answers_shuffled.jsonl", "verdicts_blind.jsonl", "verdicts_shuffled.jsonl"):
        assert len(JsonlLog(out / name).records()) == 4, name
    assert summary["acceptance_rate"] == 1.0 and summary["baselines"]["blind"]["acceptance_rate"] == 0.0
    assert summary["baselines"]["shuffled"]["acceptance_rate"] == 1.0
    dependence = summary["slide_dependence"]["overall"]
    assert dependence["difference"] == 1.0 and dependence["n"] == 4
    report = (out / "report.md").read_text()
    assert "| blind baseline | 4 | 4 | 0 | 0 | 0.0%" in report and "Slide dependence (model − blind, rule `major`): +100.0 pp" in report
