import csv
import json

import pytest

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.synthetic.tissue_cohort import (
    CLASS_TEXT, DIAGNOSIS_QUESTION, CohortConfig, diagnosis_correct, make_cohort, plan_cohort,
)
from chatexaonepath.train.data import load_records


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, CohortConfig(slides=9, classes=["tumor", "stroma", "lymphoid"], size=768, seed=1))
    return out


def test_cohort_files_split_by_slide_and_name_the_class(cohort):
    with open(cohort / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["class"] for r in rows} == {"tumor", "stroma", "lymphoid"}
    test = {r["slide_id"] for r in rows if r["split"] == "test"}
    assert {r["class"] for r in rows if r["split"] == "test"} == {"tumor", "stroma", "lymphoid"}  # every class tested
    truth = {r["slide_id"]: r["class"] for r in rows}
    for name in ("captions.json", "instruct.json"):
        records = json.loads((cohort / name).read_text())
        assert records and not {r["image"] for r in records} & test  # held-out slides never in training data
        for r in records:
            assert truth[r["image"]] in r["conversations"][1]["value"].lower()
    held_out = json.loads((cohort / "test.json").read_text())
    assert {r["image"] for r in held_out} == test
    assert all(r["conversations"][0]["value"] == f"<image>\n{DIAGNOSIS_QUESTION}" for r in held_out)
    assert any(len(r["conversations"]) == 4 for r in json.loads((cohort / "instruct.json").read_text()))
    for slide_id, tissue in truth.items():
        report = (cohort / "reports" / f"{slide_id}.txt").read_text()
        assert CLASS_TEXT[tissue].answer in report and tissue not in slide_id  # ids do not give the class away
        assert (cohort / "slides" / f"{slide_id}.tiff").is_file()


def test_cohort_records_are_valid_training_data(cohort):
    features = cohort / "features"
    features.mkdir(exist_ok=True)
    import numpy as np

    from chatexaonepath.vision_tower.features import write_features

    for slide in (cohort / "slides").glob("*.tiff"):
        write_features(features / f"{slide.stem}.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64), {})
    for name in ("captions.json", "instruct.json", "test.json"):
        assert load_records([str(cohort / name)], str(features)).records


def test_rerun_keeps_slides_and_other_settings_are_refused(cohort):
    before = {p.name: p.stat().st_mtime_ns for p in (cohort / "slides").iterdir()}
    make_cohort(cohort, CohortConfig(slides=9, classes=["tumor", "stroma", "lymphoid"], size=768, seed=1))
    assert {p.name: p.stat().st_mtime_ns for p in (cohort / "slides").iterdir()} == before
    with pytest.raises(ChatEXAONEPathError, match="other settings"):
        make_cohort(cohort, CohortConfig(slides=9, classes=["tumor", "stroma", "lymphoid"], size=768, seed=2))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"classes": ["tumor", "bone"]}, "Unknown tissue class 'bone'"),
    ({"classes": ["tumor"]}, "at least 2"),
    ({"slides": 5, "classes": ["tumor", "stroma", "normal"]}, "too few"),
    ({"test_fraction": 1.0}, "between 0 and 1"),
    ({"size": 512}, "too small.*--size 768"),
])
def test_bad_cohort_settings_are_one_sentence(kwargs, fragment):
    with pytest.raises(ChatEXAONEPathError, match=fragment):
        CohortConfig(**kwargs)


def test_plan_holds_out_slides_of_every_class():
    plan = plan_cohort(CohortConfig(slides=20, classes=["tumor", "stroma", "normal", "necrosis"], test_fraction=0.25))
    for tissue in ("tumor", "stroma", "normal", "necrosis"):
        splits = [s.split for s in plan if s.tissue == tissue]
        assert splits.count("test") == 1 and splits.count("train") == 4


@pytest.mark.parametrize("answer, correct", [
    ("Tumor.", True), ("The slide shows tumor tissue.", True), ("Stroma.", False),
    ("Tumor or stroma.", False), ("Tumorous.", False), ("I cannot tell.", False),
])
def test_an_answer_is_right_when_it_names_only_the_true_class(answer, correct):
    assert diagnosis_correct(answer, "tumor", ["tumor", "stroma", "normal"]) is correct
