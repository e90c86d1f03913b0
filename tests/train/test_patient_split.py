"""Training splits by patient and records its training patients, in the shape evaluation's leakage check reads."""

import json

import pytest

from chatexaonepath.eval.leakage import check_training_patients
from chatexaonepath.patients import PatientMapError, hash_patient, patient_id, record_train_patients
from chatexaonepath.train.data import DataConfig, load_records, split_by_slide
from chatexaonepath.train.phases import PhaseConfig, prepare_data, split_by_patients, train_patients
from tests.train.conftest import record, write_bags, write_json

# Ten TCGA patients with two slides each (a diagnostic and a frozen section: one report), and one lone slide.
TCGA = [f"TCGA-A{p}-00{p}{p}-01Z-00-DX1.ab{p}" for p in range(10)] + \
       [f"TCGA-A{p}-00{p}{p}-01A-01-TS1.cd{p}" for p in range(10)] + ["TCGA-ZZ-9999-01Z-00-DX1.ef"]


@pytest.fixture(scope="module")
def tcga_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tcga")
    write_bags(folder, {slide: i % 2 for i, slide in enumerate(TCGA)})
    return write_json(folder / "d.json", [record(f"{s}-q{q}", s, "<image>\nQ?", "A.") for s in TCGA for q in range(2)])


def test_two_slides_of_one_patient_are_never_on_both_sides(tcga_data):
    records = load_records([str(tcga_data)], str(tcga_data.parent)).records
    for seed in range(20):
        train, val = split_by_patients(records, 0.3, seed)
        train_patients_, val_patients = ({patient_id(r.features_path) for r in side} for side in (train, val))
        assert val and not train_patients_ & val_patients, seed
        assert len(train) + len(val) == len(records)
    # By slide file, some seed puts a patient's two slides apart: the grouping by patient is what holds.
    apart = [seed for seed in range(20) if {patient_id(r.features_path) for r in split_by_slide(records, 0.3, seed)[0]}
             & {patient_id(r.features_path) for r in split_by_slide(records, 0.3, seed)[1]}]
    assert apart
    assert split_by_patients(records, 0.3, 4) == split_by_patients(records, 0.3, 4)
    assert split_by_patients(records, 0.0, 4) == (records, [])


def test_prepare_data_splits_by_patient_without_val_data(tcga_data, tmp_path):
    config = PhaseConfig(phase=1, out=str(tmp_path / "p1"))
    _, train, val = prepare_data(config, DataConfig(data=[str(tcga_data)], features_dir=str(tcga_data.parent),
                                                    val_fraction=0.2, seed=1))
    assert val and not {patient_id(r.features_path) for r in train} & {patient_id(r.features_path) for r in val}


def test_one_patient_trains_without_validation(tmp_path, caplog):
    slides = ["TCGA-AB-1234-01Z-00-DX1.x", "TCGA-AB-1234-01A-01-TS1.y"]
    write_bags(tmp_path, {s: 0 for s in slides})
    data = write_json(tmp_path / "d.json", [record(s, s, "<image>\nQ?", "A.") for s in slides])
    records = load_records([str(data)], str(tmp_path)).records
    assert split_by_patients(records, 0.5, 0) == (records, [])
    assert "Only one patient" in caplog.text


def test_phase1_records_its_training_patients_and_eval_reads_them(phase1_out):
    info = json.loads((phase1_out / "training_args.json").read_text())
    recorded = info["train_patients"]
    assert recorded["scheme"] == "sha256-salted" and len(recorded["hashes"]) == info["data"]["train_slides"]
    val = {name.rsplit(".", 1)[0] for name in info["data"]["val_slide_files"]}
    train = sorted({f"s{i}" for i in range(8)} - val)  # conftest's dataset_dir: slides s0…s7, each its own patient
    assert not any(f'"{s}"' in json.dumps(recorded) for s in train)  # hashes, not the ids
    checked = check_training_patients(phase1_out, [*train, *sorted(val)])
    assert checked["checked"] and checked["recorded_as"] == "salted hashes" and checked["seen"] == train
    assert check_training_patients(phase1_out, sorted(val))["n_seen"] == 0


def _init(tmp_path, recorded):
    init = tmp_path / "p1"
    init.mkdir()
    (init / "training_args.json").write_text(json.dumps({"phase": 1} | ({} if recorded is None else
                                                                        {"train_patients": recorded})))
    return PhaseConfig(phase=2, out=str(tmp_path / "p2"), init=str(init))


def _records(slides):
    return [type("R", (), {"features_path": f"/f/{s}.h5"})() for s in slides]


def test_phase2_adds_phase1s_patients_under_its_salt(tmp_path):
    config = _init(tmp_path, record_train_patients(["P1", "TCGA-AA-0001"], salt="s1"))
    recorded = train_patients(config, _records(["TCGA-AA-0001-01Z-00-DX1", "P2"]))
    assert recorded["salt"] == "s1"
    assert recorded["hashes"] == sorted(hash_patient(p, "s1") for p in ("P1", "P2", "TCGA-AA-0001"))


def test_phase2_from_a_plain_record_hashes_the_union(tmp_path):
    recorded = train_patients(_init(tmp_path, ["P1"]), _records(["P2"]))
    assert sorted(recorded["hashes"]) == sorted(hash_patient(p, recorded["salt"]) for p in ("P1", "P2"))


def test_phase2_from_a_checkpoint_without_a_record_records_none(tmp_path, caplog):
    assert train_patients(_init(tmp_path, None), _records(["P2"])) is None
    assert "records no train_patients" in caplog.text


def test_phase2_refuses_a_malformed_record_in_one_sentence(tmp_path):
    with pytest.raises(PatientMapError, match="train_patients must be"):
        train_patients(_init(tmp_path, {"scheme": "md5", "salt": "x", "hashes": []}), _records(["P2"]))
