"""Patients, not files: ids, the patient map, splits that never straddle a patient, the training record."""

import pytest

from chatexaonepath.patients import (
    PatientMapError, hash_patient, load_patient_map, patient_id, patients_of, record_train_patients, seen_in_training,
    slide_key, split_by_patient,
)

DX1 = "TCGA-A1-0001-01Z-00-DX1.1A2B3C4D-0000-4000-8000-000000000001"
DX2 = "TCGA-A1-0001-01Z-00-DX2.1A2B3C4D-0000-4000-8000-000000000002"


@pytest.mark.parametrize("slide", [DX1, DX2, f"TCGA-BRCA/{DX1}.pt", f"/data/features/{DX2}.h5", f"{DX1}.svs",
                                   "tcga-a1-0001-01z-00-dx1", "TCGA-A1-0001"])
def test_tcga_slides_belong_to_the_barcodes_first_12_characters(slide):
    assert patient_id(slide) == "TCGA-A1-0001"


def test_slide_key_drops_folders_and_slide_or_feature_suffixes_only():
    assert slide_key(f"TCGA-LUSC/{DX1}.pt") == DX1 and slide_key("case.7.svs") == "case.7"
    assert slide_key("S1.2024") == "S1.2024"  # a dot that is no suffix stays


def test_other_ids_use_the_map_then_themselves(tmp_path):
    (tmp_path / "map.csv").write_text("slide_id,patient_id\nH-1001-A.svs,P17\nH-1001-B,P17\nH-2002,P18\n")
    mapping = load_patient_map(tmp_path / "map.csv")
    assert mapping == {"H-1001-A": "P17", "H-1001-B": "P17", "H-2002": "P18"}
    assert patient_id("slides/H-1001-A.svs", mapping) == patient_id("H-1001-B.h5", mapping) == "P17"
    assert patient_id("H-9999", mapping) == "H-9999"  # unknown: the slide is its own patient
    assert patient_id(DX1, {DX1: "someone-else"}) == "TCGA-A1-0001"  # a TCGA barcode is never overridden
    assert patients_of([DX1, DX2, "H-1001-A", "H-2002"], mapping) == {"TCGA-A1-0001", "P17", "P18"}


def test_aliased_headers_are_accepted(tmp_path):
    (tmp_path / "m.csv").write_text("Case_ID,Filename\nC1,a.svs\n")
    assert load_patient_map(tmp_path / "m.csv") == {"a": "C1"}


@pytest.mark.parametrize("text,expected", [
    ("", "is empty"),
    ("slide,organ\na,colon\n", "row 1 .*must name a slide column"),
    ("slide_id,patient_id\na,P1\nb\n", "row 3 has 1 column"),
    ("slide_id,patient_id\na,P1\nb,\n", "row 3 has an empty"),
    ("slide_id,patient_id\na,P1\na.svs,P2\n", "row 3 maps slide 'a' to patient 'P2'.*'P1'"),
    ("slide_id,patient_id\n", "no rows"),
])
def test_malformed_patient_maps_are_one_sentence_naming_file_and_row(tmp_path, text, expected):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PatientMapError, match=expected) as caught:
        load_patient_map(path)
    assert str(path) in str(caught.value)


def test_missing_patient_map_is_one_sentence(tmp_path):
    with pytest.raises(PatientMapError, match="not found"):
        load_patient_map(tmp_path / "nope.csv")


def test_split_keeps_every_patient_on_one_side():
    # 20 patients with 1–3 slides each; a split by slide file would separate some of them.
    slides = [f"TCGA-AA-{p:04d}-01Z-00-DX{k}" for p in range(20) for k in range(1, 2 + p % 3)]
    for seed in range(5):
        rest, held = split_by_patient(slides, 0.25, seed)
        assert sorted(rest + held) == sorted(slides)
        assert not patients_of(rest) & patients_of(held)
        assert len(patients_of(held)) == 5  # a quarter of the patients, not of the slides
    assert split_by_patient(slides, 0.25, 1) == split_by_patient(slides, 0.25, 1)  # seeded
    assert split_by_patient(slides, 0.25, 1) != split_by_patient(slides, 0.25, 2)


def test_split_into_three_groups_with_records_and_a_map():
    records = [{"id": i, "slide": f"H-{i // 2}"} for i in range(20)]  # two slides per patient via the map
    mapping = {f"H-{i}": f"P{i}" for i in range(10)}
    train, val, test = split_by_patient(records, [0.8, 0.1, 0.1], 0, slide_of=lambda r: r["slide"],
                                        patient_map=mapping)
    groups = [{mapping[r["slide"]] for r in g} for g in (train, val, test)]
    assert [len(g) for g in groups] == [8, 1, 1] and not (groups[0] & groups[1] or groups[1] & groups[2])
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)  # order kept within a group


def test_split_edge_cases():
    assert split_by_patient([DX1, DX2], 0.5, 0) == [[DX1, DX2], []]  # one patient: nothing can be held out
    rest, held = split_by_patient(["a", "b"], 0.9, 0)
    assert len(rest) == 1 and len(held) == 1  # never all patients held out
    assert split_by_patient(["a", "b", "c"], 0.0, 0) == [["a", "b", "c"], []]
    with pytest.raises(ValueError):
        split_by_patient(["a"], [1.0], 0)


def test_training_patients_are_recorded_hashed_with_their_salt_and_checked():
    record = record_train_patients(["TCGA-A1-0001", "P17", "P17"], salt="s3")
    assert record == {"scheme": "sha256-salted", "salt": "s3",
                      "hashes": sorted([hash_patient("TCGA-A1-0001", "s3"), hash_patient("P17", "s3")])}
    assert "TCGA-A1-0001" not in str(record)  # the ids themselves are not in the checkpoint
    assert seen_in_training(["P17", "P99", "TCGA-A1-0001"], record) == ["P17", "TCGA-A1-0001"]
    fresh = record_train_patients(["P17"])
    assert len(fresh["salt"]) == 32 and fresh["salt"] != record_train_patients(["P17"])["salt"]
    assert seen_in_training(["P17"], record_train_patients(["P17"], hashed=False)) == ["P17"]
    assert record_train_patients(["b", "a"], hashed=False) == ["a", "b"]


@pytest.mark.parametrize("recorded", [{"scheme": "md5", "salt": "x", "hashes": []}, {"salt": "x"}, "P17", 3])
def test_a_malformed_training_record_is_refused(recorded):
    with pytest.raises(PatientMapError, match="train_patients"):
        seen_in_training(["P17"], recorded)
