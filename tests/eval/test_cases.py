"""`eval run` and `eval closed` read case items (image lists), answer over every slide of a case, check every
slide's patient against training, and the shuffled baseline swaps whole cases."""

import json
import shutil

import pytest

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.eval.answers import GenerateConfig, generate_answers
from chatexaonepath.eval.baselines import case_derangement
from chatexaonepath.eval.closed import ClosedConfig, run_closed
from chatexaonepath.eval.closed_data import load_closed_items
from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.data import JsonlLog, load_test_items
from chatexaonepath.eval.run import run_eval
from chatexaonepath.patients import record_train_patients


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


def choice_case_file(tmp_path):
    """A WSI-Bench-named closed file (every question must parse) whose records are cases and single slides."""
    data = [qa("c1", ["S1", "S2.svs"], "Which slide shows carcinoma? A) Slide 1 B) Slide 2\n<image>", "A"),
            qa("c2", ["S2", "S1"], "<image> or <image>: which shows carcinoma? A) The first B) The second", "B"),
            qa("s1", "S1", "<image>\nIs it carcinoma?", "Yes"),
            qa("s2", ["S2"], "Which organ? A) Colon B) Liver", "B")]  # a one-slide list is a single slide
    path = tmp_path / "Cases_choice_test.json"
    path.write_text(json.dumps(data))
    return path


def test_eval_closed_answers_case_items_over_every_slide_and_its_baselines_swap_whole_cases(workspace, tmp_path):
    path = choice_case_file(tmp_path)
    items = {i.id: i for i in load_closed_items([path], workspace / "features").items}
    assert [p.name for p in items["c1"].case_features] == ["S1.h5", "S2.h5"]
    assert items["c1"].case_names == ("S1", "S2.svs") and items["c1"].options == {"A": "Slide 1", "B": "Slide 2"}
    assert items["s2"].case_features == () and items["s2"].features.name == "S2.h5"

    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    bags, original = [], model.generate
    model.generate = lambda ids, feats, **k: bags.append(len(feats)) or original(ids, feats, **k)
    config = ClosedConfig(data=[str(path)], model=str(workspace / "ckpt"), features=str(workspace / "features"),
                          baselines="blind,shuffled", max_new_tokens=3, batch_size=4)
    summary = run_closed(config, tmp_path / "run", model=model).summary
    assert sum(bags) == 2 * (2 + 2 + 1 + 1)  # model and shuffled: every slide of each case; blind: none
    used = {c: {r["id"]: r["features_used"] for r in JsonlLog(tmp_path / "run" / f).records()}
            for c, f in (("model", "answers.jsonl"), ("blind", "answers_blind.jsonl"),
                         ("shuffled", "answers_shuffled.jsonl"))}
    assert used["model"]["c1"] == [str(p) for p in items["c1"].case_features]
    assert used["shuffled"]["c1"] == [str(p) for p in items["c2"].case_features]  # a whole case for a whole case
    assert used["shuffled"]["s1"] == str(items["s2"].features) and set(used["blind"].values()) == {None}
    answers = {r["id"]: r for r in JsonlLog(tmp_path / "run" / "answers.jsonl").records()}
    assert answers["c1"]["case"] == [str(p) for p in items["c1"].case_features] and "case" not in answers["s1"]
    assert summary["overall"]["n"] == 4 and set(summary["baselines"]) == {"blind", "shuffled"}


def test_every_slide_of_a_case_is_checked_against_the_training_patients(workspace, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    # S2, the second slide of case c1, was a training patient's: a case's first slide alone would hide it.
    (ckpt / "training_args.json").write_text(json.dumps({"train_patients": record_train_patients(["S2"])}))
    closed = tmp_path / "Cases_choice_test.json"
    closed.write_text(json.dumps([qa("c1", ["S1", "S2"], "Which slide? A) Slide 1 B) Slide 2\n<image>", "A")]))
    with pytest.raises(EvalError, match="--strict: 1 of 2 test patients were seen in training"):
        run_closed(ClosedConfig(data=[str(closed)], model=str(ckpt), features=str(workspace / "features"),
                                strict=True), tmp_path / "closed")
    (tmp_path / "cases.json").write_text(json.dumps([qa("c1", ["S1", "S2"])]))
    with pytest.raises(EvalError, match="--strict: 1 of 2 test patients were seen in training"):
        run_eval(GenerateConfig(model=str(ckpt), data=str(tmp_path / "cases.json"),
                                features=str(workspace / "features")), tmp_path / "open", "local:embedded", strict=True)
    assert not (tmp_path / "closed").exists() and not (tmp_path / "open").exists()  # refused before any answer


def slidechat_csv(path, patches=4, dim=6):
    """A features CSV as SlideChat ships them: columns 0..D-1, then each patch's image path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [",".join([*map(str, range(dim)), "img_path"])]
    rows += [",".join(["0.5"] * dim) + f",./BLCA/{path.stem}/{i}_0.jpeg" for i in range(patches)]
    path.write_text("\n".join(rows) + "\n")


def test_slidechat_test_json_with_csv_features_is_read_by_both_commands(tmp_path):
    """SlideChat's test JSON as shipped: `image` lists of `.csv` files under a tumour folder, `<image>` at the end."""
    from chatexaonepath.vision_tower.features import read_features

    for slide in ("TCGA-A", "TCGA-B"):
        slidechat_csv(tmp_path / "feat" / "BLCA" / f"{slide}.csv")
    data = [qa("sc1", ["./BLCA/TCGA-A.csv", "./BLCA/TCGA-B.csv"],
               "Which slide shows carcinoma?\nA) Slide 1\nB) Slide 2\n<image>", "A) Slide 1")]
    (tmp_path / "slidechat_test.json").write_text(json.dumps(data))
    item = load_test_items(tmp_path / "slidechat_test.json", tmp_path / "feat")[0]
    closed = load_closed_items([tmp_path / "slidechat_test.json"], tmp_path / "feat").items[0]
    for case in (item.case_features, closed.case_features):
        assert [p.name for p in case] == ["TCGA-A.csv", "TCGA-B.csv"]
        assert read_features(case[1]).features.shape == (4, 6)
    assert closed.answer == "A" and closed.case_names == ("TCGA-A.csv", "TCGA-B.csv")


def test_a_case_missing_one_slides_features_names_that_slide(tmp_path):
    slidechat_csv(tmp_path / "feat" / "BLCA" / "TCGA-A.csv")
    data = [qa("sc1", ["./BLCA/TCGA-A.csv", "./BLCA/TCGA-GONE.csv"], "Is it carcinoma?\n<image>", "Yes")]
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(EvalError, match="TCGA-GONE"):
        load_test_items(tmp_path / "t.json", tmp_path / "feat")
    with pytest.raises(EvalError, match="TCGA-GONE"):
        load_closed_items([tmp_path / "t.json"], tmp_path / "feat")
