"""RAIDER: a report that covers a case (mapped to several slides) gives case records listing its slides."""

import json

from chatexaonepath.raider.generate import CAPTION
from chatexaonepath.raider.records import RecordOptions, caption_records, instruction_records
from tests.raider.test_run import log_record


def test_a_report_on_several_slides_gives_case_records_that_training_reads(tmp_path):
    log = [log_record("r1", "diagnosis", "What is it?", "ok", "Carcinoma"),
           log_record("r1", "grade", "What grade?", "ok", "Grade 2"),
           log_record("r1", CAPTION, "q", "ok", "Carcinoma, grade 2."),
           log_record("r2", "diagnosis", "What is it?", "ok", "Adenoma")]
    slide_map = {"r1": ["s1b", "s1a"], "r2": ["s2"]}
    cases = instruction_records(log, slide_map, RecordOptions(cases=True), ["diagnosis", "grade"])
    assert [(r["image"], r["category"]) for r in cases] == [(["s1a", "s1b"], "diagnosis"), (["s1a", "s1b"], "grade"),
                                                            ("s2", "diagnosis")]
    assert cases[0]["conversations"][0]["value"] == "<image>\nWhat is it?" and cases[0]["id"].startswith("r1:case:")
    multi = instruction_records(log, slide_map, RecordOptions(multi_turn=True, cases=True), ["diagnosis", "grade"])
    assert multi[0]["image"] == ["s1a", "s1b"] and len(multi[0]["conversations"]) == 4
    assert [c["image"] for c in caption_records(log, slide_map, cases=True)] == [["s1a", "s1b"]]
    # without --cases, one record per slide, as before
    assert [r["image"] for r in instruction_records(log, slide_map, RecordOptions())][:2] == ["s1a", "s1a"]

    from chatexaonepath.train.data import load_records
    from tests.train.conftest import write_bags

    write_bags(tmp_path, {"s1a": 0, "s1b": 1, "s2": 0})
    (tmp_path / "d.json").write_text(json.dumps(cases))
    records = load_records([str(tmp_path / "d.json")], str(tmp_path)).records
    assert [len(r.features_paths) for r in records] == [2, 2, 1]
