"""`eval closed` on test sets shaped as WSI-Bench and SlideBench-VQA ship them."""

import json
import shutil

import pytest

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.eval.closed import ClosedConfig, run_closed
from chatexaonepath.eval.closed_data import load_closed_items
from chatexaonepath.eval.criteria import EvalError
from chatexaonepath.eval.data import JsonlLog
from chatexaonepath.patients import patient_id, record_train_patients

from .closed_fixtures import SLIDES, write_features, write_slidebench, write_wsi_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """WSI-Bench's two closed file shapes, a SlideBench-VQA CSV and flat <slide>.h5 features."""
    root = tmp_path_factory.mktemp("closed")
    choice, tf = write_wsi_bench(root)
    return {"root": root, "choice": choice, "tf": tf, "csv": write_slidebench(root), "features": write_features(root)}


def test_shipped_shapes_give_every_question_its_options_answer_and_features(bench):
    loaded = load_closed_items([bench["choice"], bench["tf"], bench["csv"]], bench["features"])
    items = {i.id: i for i in loaded.items}
    assert len(items) == 20 and loaded.not_closed == []  # 10 choice + 5 yes/no + 5 CSV: none dropped
    first = items[f"Diagnosis_choice_test:{next(iter(SLIDES))}-1"]
    assert first.options == {"A": "Adenocarcinoma", "B": "Squamous cell carcinoma, keratinizing type",
                             "C": "Squamous cell carcinoma, non-keratinizing type", "D": "Small cell carcinoma"}
    assert first.answer == "B" and first.kind == "choice" and first.category == "Diagnosis_choice"
    assert first.features.name == f"{first.slide}.h5"  # shipped as TCGA-BRCA/<slide>.pt, found flat as .h5
    assert first.turns[0].content.startswith("<image>\n") and "A) Adenocarcinoma" in first.turns[0].content
    tf = [i for i in items.values() if i.file == "Prognosis_TF_question_test.json"]
    assert {i.kind for i in tf} == {"yes/no"} and {i.answer for i in tf} == {"Yes", "No"}
    csv_items = [i for i in items.values() if i.file == "SlideBench-VQA-TCGA.csv"]
    assert [i.answer for i in csv_items] == ["B", "A", "B", "A", "B"]  # text answers mapped to their letter
    assert csv_items[0].category == "Diagnosis" and csv_items[0].subcategory == "Histological typing"
    assert "C) Mucinous carcinoma, with a comma" in csv_items[0].question


def test_slidebench_features_are_found_in_their_tumour_folder(tmp_path, bench):
    slide = next(iter(SLIDES))
    (tmp_path / "features" / "BRCA").mkdir(parents=True)
    shutil.copy(bench["features"] / f"{slide}.h5", tmp_path / "features" / "BRCA" / f"{slide}.h5")
    rows = bench["csv"].read_text().splitlines()[:2]
    (tmp_path / "one.csv").write_text("\n".join(rows) + "\n")
    item = load_closed_items([tmp_path / "one.csv"], tmp_path / "features").items[0]
    assert item.features == tmp_path / "features" / "BRCA" / f"{slide}.h5"


ANSWERS = {  # free-text answers of the shapes models give, against the fixture's answer key
    "choice-1": ["B", "(C)", "The answer is D.", "A) Adenocarcinoma", "C. Squamous cell carcinoma, non-keratinizing"],
    "choice-2": ["Well differentiated (Grade 1)", "B", "The answer is C or D", "a", "A tumour with glands."],
    "tf": ["Yes.", "No, it is poor.", "Yes", "The prognosis is good.", "no"],
    "csv": ["B", "Invasive ductal carcinoma", "A", "A", "Invasive lobular carcinoma"],
}
# Against the key (choice-1 BCDAC, choice-2 ABCDB, tf Yes No Yes No Yes, csv B A B A B), right are:
# 5/5 choice-1; 2/5 choice-2 ("C or D" ambiguous, "a" wrong, "A tumour" unparsed); 3/5 tf (the prose
# unparsed, "no" wrong); 4/5 csv (option texts mapped to their letters) — 14 of 20, 3 unparsed.


def write_answers(bench, path):
    slides = list(SLIDES)
    with open(path, "w") as f:
        for k, slide in enumerate(slides):
            for n, key in ((1, "choice-1"), (2, "choice-2")):
                f.write(json.dumps({"id": f"Diagnosis_choice_test:{slide}-{n}", "answer": ANSWERS[key][k]}) + "\n")
            f.write(json.dumps({"id": f"Prognosis_TF_question_test:{slide}-1", "answer": ANSWERS["tf"][k]}) + "\n")
            f.write(json.dumps({"id": f"SlideBench-VQA-TCGA:{k + 1}", "answer": ANSWERS["csv"][k]}) + "\n")


def test_another_systems_answers_are_scored_per_file_and_category_with_intervals(bench, tmp_path):
    write_answers(bench, tmp_path / "theirs.jsonl")
    config = ClosedConfig(data=[str(bench["choice"]), str(bench["tf"]), str(bench["csv"])],
                          answers=str(tmp_path / "theirs.jsonl"))
    summary = run_closed(config, tmp_path / "run").summary
    assert summary["overall"]["n"] == 20 and summary["overall"]["correct"] == 14
    assert summary["overall"]["accuracy"] == pytest.approx(14 / 20)
    low, high = summary["overall"]["ci95"]
    assert (low, high) == pytest.approx((0.4810, 0.8545), abs=1e-3)  # Wilson
    assert summary["overall"]["ci95_slide_bootstrap"] is not None and summary["overall"]["n_slides"] == 5
    files = summary["by_file"]
    assert (files["Diagnosis_choice_test.json"]["correct"], files["Prognosis_TF_question_test.json"]["correct"],
            files["SlideBench-VQA-TCGA.csv"]["correct"]) == (7, 3, 4)
    assert set(summary["by_category"]) == {"Diagnosis", "Diagnosis_choice", "Prognosis_TF_question"}
    assert all({"accuracy", "n", "ci95"} <= set(b) for b in summary["by_category"].values())
    assert summary["unparsed"] == 3 and {u["why"] for u in summary["unparsed_items"]} >= {"ambiguous: C, D"}
    records = {r["id"]: r for r in JsonlLog(tmp_path / "run" / "answers.jsonl").records()}
    assert len(records) == 20 and all({"answer", "choice", "correct"} <= set(r) for r in records.values())
    assert records[f"Diagnosis_choice_test:{list(SLIDES)[1]}-1"]["choice"] == "C"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**accuracy: 70.0%" in report and "| Diagnosis_choice_test.json | 10 | 70.0%" in report
    assert "Unparsed answers (counted wrong)" in report and (tmp_path / "run" / "closed.png").stat().st_size > 1000
    assert summary["patients"]["checked"] is False and summary["patients"]["n_test_patients"] == 4


@pytest.mark.parametrize("name,text,expected", [
    ("bad.csv", "ID,Slide,Question,A,B\n1,S1,Q?,x,y\n", r"row 1 \(the header\) lacks Answer"),
    ("bad.csv", "ID,Slide,Question,A,B,C,D,Answer\n1,S1,Q?,x,y,z,w,A\n2,S2,Q?,x,y,z,w,E\n",
     r"row 3: the answer 'E' is not one of its options A, B, C, D"),
    ("bad.csv", "ID,Slide,Question,A,B,Answer\n1,S1,Q?,x,y\n", "row 2 has 5 cells; the header has 6"),
    ("bad.csv", "ID,Slide,Question,A,B,Answer\n1,,Q?,x,y,A\n", "row 2 has an empty Slide"),
    ("Bad_choice_test.json", '[{"id": "r1", "image": "S1", "conversations": [\n{"from": "human" "value": 1}]}]',
     "not valid JSON: Expecting ',' delimiter at line 2"),
    ("Bad_choice_test.json", json.dumps([{"id": "r1", "image": "S1", "conversations": [
        {"from": "human", "value": "<image>\nWhich? A) x B) y"}, {"from": "gpt", "value": "A"}]},
        {"id": "r2", "image": "S2", "conversations": [
            {"from": "human", "value": "<image>\nWhich one is it?"}, {"from": "gpt", "value": "B"}]}]),
     r"record 2 \(r2\): its question lists no lettered options"),
    ("bad.jsonl", '{"id": "r1", "image": "S1", "conversations": []}\n{"id": \n', "line 2 is not valid JSON"),
    ("bad.jsonl", '{"id": "r1", "conversations": []}\n', r"record 1 \(r1\) has no 'image'"),
])
def test_malformed_test_data_is_one_sentence_naming_file_and_row(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(EvalError, match=expected) as caught:
        load_closed_items([tmp_path / name], require_features=False)
    assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)


def test_open_questions_of_a_general_llava_file_are_listed_not_scored(tmp_path):
    records = [{"id": "r1", "image": "S1", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the slide."}, {"from": "gpt", "value": "Glands."},
        {"from": "human", "value": "Is there necrosis?"}, {"from": "gpt", "value": "No."}]}]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    loaded = load_closed_items([tmp_path / "mixed.json"], require_features=False)
    assert [i.id for i in loaded.items] == ["r1#2"] and loaded.items[0].turns[1].content == "Glands."
    assert loaded.not_closed[0]["id"] == "r1#1"


def test_answers_for_unknown_ids_and_missing_features_are_refused(bench, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "answer": "B"}\n')
    with pytest.raises(EvalError, match=r"line 1: id 'x' is not a question"):
        run_closed(ClosedConfig(data=[str(bench["choice"])], answers=str(tmp_path / "a.jsonl")), tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"10 of 10 questions have no features file in .*Diagnosis_choice_test.json "
                                        r"record 1"):
        load_closed_items([bench["choice"]], tmp_path / "empty")
    with pytest.raises(EvalError, match="either --model"):
        ClosedConfig(data=["x"])
    with pytest.raises(EvalError, match="--baselines needs --model"):
        ClosedConfig(data=["x"], answers="a", baselines="blind")
    with pytest.raises(EvalError, match="Unknown baseline"):
        ClosedConfig(data=["x"], model="m", features="f", baselines="blind,none")


def test_a_checkpoint_answers_with_blind_and_shuffled_baselines_and_resumes(workspace, bench, tmp_path):
    model = ChatEXAONEPathForCausalLM.from_pretrained(workspace / "ckpt")
    tower_calls, llm_calls = [], []
    original_generate, original_llm = model.generate, model.llm.generate
    model.generate = lambda ids, feats, **k: tower_calls.append(len(feats)) or original_generate(ids, feats, **k)
    model.llm.generate = lambda **k: llm_calls.append("inputs_embeds" in k) or original_llm(**k)
    config = ClosedConfig(data=[str(bench["choice"]), str(bench["tf"])], model=str(workspace / "ckpt"),
                          features=str(bench["features"]), baselines="blind,shuffled", max_new_tokens=4, batch_size=8)
    summary = run_closed(config, tmp_path / "run", model=model).summary
    out = tmp_path / "run"
    blind = JsonlLog(out / "answers_blind.jsonl").records()
    shuffled = JsonlLog(out / "answers_shuffled.jsonl").records()
    assert len(blind) == len(shuffled) == 15 and all(r["features_used"] is None for r in blind)
    for r in shuffled:  # another slide, of another patient
        assert r["features_used"] != r["features"] and patient_id(r["features_used"]) != patient_id(r["features"])
    assert sum(tower_calls) == 30  # model and shuffled go through the tower; blind never does
    assert set(summary["baselines"]) == {"blind", "shuffled"}
    for block in (summary, summary["baselines"]["blind"], summary["baselines"]["shuffled"]):
        assert block["overall"]["n"] == 15 and {"accuracy", "n", "ci95"} <= set(block["overall"])
    dependence = summary["slide_dependence"]["overall"]
    assert dependence["n"] == 15 and dependence["difference"] == pytest.approx(dependence["with"] - dependence["without"])
    assert summary["decoding"]["repetition_penalty"] == 1.15 and summary["decoding"]["no_repeat_ngram_size"] == 6
    assert "slide dependence (model − blind)" in (out / "report.md").read_text()
    calls = len(tower_calls) + len(llm_calls)
    run_closed(config, out, model=model)  # everything answered: nothing is generated again
    assert len(tower_calls) + len(llm_calls) == calls
    with pytest.raises(EvalError, match="other settings.*max_new_tokens"):
        run_closed(ClosedConfig(**{**config.__dict__, "max_new_tokens": 5, "data": config.data}), out, model=model)


def test_test_patients_seen_in_training_are_reported_and_refused_with_strict(workspace, bench, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    seen = patient_id(next(iter(SLIDES)))
    (ckpt / "training_args.json").write_text(json.dumps({"train_patients": record_train_patients([seen, "TCGA-ZZ-9999"])}))
    config = ClosedConfig(data=[str(bench["tf"])], model=str(ckpt), features=str(bench["features"]), max_new_tokens=2)
    summary = run_closed(config, tmp_path / "run").summary
    assert summary["patients"] == {"n_test_patients": 4, "checked": True, "n_seen": 1, "seen": [seen],
                                   "recorded_as": "salted hashes"}
    assert f"warning: 1 of 4 test patients were seen in training** (first: {seen})" in \
        (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(EvalError, match="--strict: 1 of 4 test patients were seen in training"):
        run_closed(ClosedConfig(**{**config.__dict__, "strict": True}), tmp_path / "strict")
    assert not (tmp_path / "strict").exists()  # refused before anything was answered or written
    (ckpt / "training_args.json").write_text("{}")
    with pytest.raises(EvalError, match="records no train_patients"):
        run_closed(ClosedConfig(**{**config.__dict__, "strict": True}), tmp_path / "strict")
