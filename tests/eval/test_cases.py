"""`eval` reads case items (image lists); the shuffled baseline swaps whole cases."""

import json

import pytest

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.eval.answers import GenerateConfig, generate_answers
from chatexaonepath.eval.baselines import case_derangement
from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.data import JsonlLog, load_test_items


def qa(record_id, image, question="Which slide shows carcinoma?\n<image>", answer="Slide 1."):
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def case_data(workspace, tmp_path):
    data = [qa("c1", ["S1", "S2.svs"]), qa("c2", ["S2", "S1"], "<image> or <image>: which is it?"),
            qa("s1", "S1", "<image>\nWhat is it?", "Adenocarcinoma."), qa("s2", "S2", "What is it?", "Liver.")]
    (tmp_path / "cases.json").write_text(json.dumps(data))
    return load_test_items(tmp_path / "cases.json", workspace / "features")


def config(workspace, tmp_path, **kwargs):
    return GenerateConfig(model=str(workspace / "ckpt"), data=str(tmp_path / "cases.json"),
                          features=str(workspace / "features"), max_new_tokens=3, **kwargs)


def test_case_items_keep_every_slide_in_order(case_data):
    items = {i.id: i for i in case_data}
    assert [p.name for p in items["c1"].case_features] == ["S1.h5", "S2.h5"] and items["c1"].features.name == "S1.h5"
    assert items["c1"].case_names == ("S1", "S2.svs") and items["s1"].case_features == ()
    assert items["c1"].answer_fields()["case"][1].endswith("S2.h5") and "case" not in items["s1"].answer_fields()


def test_cases_and_single_slides_answer_in_one_batch_as_one_at_a_time(workspace, tmp_path, case_data):
    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    answers = []
    for batch_size in (1, 4):
        log = JsonlLog(tmp_path / f"b{batch_size}.jsonl")
        assert generate_answers(case_data, config(workspace, tmp_path, batch_size=batch_size), log, model=model) == []
        answers.append({r["id"]: r for r in log.records()})
    assert {k: v["answer"] for k, v in answers[0].items()} == {k: v["answer"] for k, v in answers[1].items()}
    assert [p.rsplit("/", 1)[-1] for p in answers[0]["c1"]["features_used"]] == ["S1.h5", "S2.h5"]


def test_the_shuffled_baseline_swaps_whole_cases(workspace, tmp_path, case_data):
    items = {i.id: i for i in case_data}
    swap = case_derangement(case_data)
    assert swap[items["c1"].case_features] == items["c2"].case_features
    assert swap[items["s1"].features] == items["s2"].features
    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    log = JsonlLog(tmp_path / "shuffled.jsonl")
    generate_answers(case_data, config(workspace, tmp_path, batch_size=4), log, model=model, condition="shuffled",
                     swap=swap)
    used = {r["id"]: r["features_used"] for r in log.records()}
    assert used["c1"] == [str(p) for p in items["c2"].case_features]
    with pytest.raises(EvalError, match="only one case of 2 slides"):
        case_derangement([items["c1"], items["s1"], items["s2"]])
