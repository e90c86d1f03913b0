"""`chatexaonepath train …` and `synth cohort` as a user runs them: real processes, real exit codes."""

import json
import os
import subprocess
import sys

from tests.train.conftest import record, write_json


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "chatexaonepath.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_train_phase1_then_phase2_from_the_command_line(dataset_dir, tiny_llm, tmp_path):
    fast = ["--epochs", "1", "--batch-size", "2", "--grad-accum", "1", "--report-to", "none", "--precision", "fp32"]
    p1 = run_cli("train", "phase1", "--data", dataset_dir / "captions.json", "--features", dataset_dir / "features",
                 "--llm", tiny_llm, "--out", tmp_path / "p1", *fast)
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert "train phase2 --init" in p1.stderr and "records train / validation" in p1.stderr
    # --select-by loss: no decoding of the validation answers (test_validation.py covers exact match)
    p2 = run_cli("train", "phase2", "--init", tmp_path / "p1", "--data", dataset_dir / "instruct.json",
                 "--features", dataset_dir / "features", "--out", tmp_path / "p2", "--lora-r", "4",
                 "--lora-targets", "q_proj,v_proj", "--select-by", "loss", *fast)
    assert p2.returncode == 0, p2.stderr[-2000:]
    config = json.loads((tmp_path / "p2" / "config.json").read_text())
    assert config["tower_trained"] and config["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "p2" / "training_args.json").read_text())["phase_config"]["select_by"] == "loss"
    assert f"--model {tmp_path / 'p2'}" in p2.stderr.replace("\n", "")


def test_a_malformed_record_is_one_sentence_and_exit_code_2(dataset_dir, tiny_llm, tmp_path):
    bad = write_json(tmp_path / "bad.json", [record("slide-7-q3", "s1", "What is it?", "Tumour.")])
    done = run_cli("train", "phase1", "--data", bad, "--features", dataset_dir / "features", "--llm", tiny_llm,
                   "--out", tmp_path / "p1")
    assert done.returncode == 2
    assert "slide-7-q3" in done.stderr and "no <image>" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "p1").exists()


def test_synth_cohort_writes_the_documented_layout(tmp_path):
    done = run_cli("synth", "cohort", "--out", tmp_path / "c", "--slides", "6", "--classes", "tumor,stroma,normal",
                   "--size", "768", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("slides", "reports", "labels.csv", "captions.json", "instruct.json", "test.json", "cohort.json"):
        assert (tmp_path / "c" / name).exists(), name
    assert len(list((tmp_path / "c" / "slides").glob("*.tiff"))) == 6
    bad = run_cli("synth", "cohort", "--out", tmp_path / "d", "--classes", "tumor,bone")
    assert bad.returncode == 2 and "Unknown tissue class 'bone'" in bad.stderr


def test_synth_lesions_writes_the_three_splits_and_refuses_bad_sizes_in_a_sentence(tmp_path):
    done = run_cli("synth", "lesions", "--out", tmp_path / "c", "--split-sizes", "1,1,1", "--organs", "colon",
                   "--lesions", "melanoma", "--size", "2048", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("slides", "masks", "reports", "labels.csv", "captions.json", "instruct.json", "val_captions.json",
                 "val_instruct.json", "test.json"):
        assert (tmp_path / "c" / name).exists(), name
    assert len(list((tmp_path / "c" / "masks").glob("*.png"))) == 6  # melanoma or none, in three splits
    bad = run_cli("synth", "lesions", "--out", tmp_path / "d", "--organs", "colon,brain")
    assert bad.returncode == 2 and "brain" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("synth", "lesions", "--out", tmp_path / "e", "--split-sizes", "3,x,2")
    assert bad.returncode == 2 and "--split-sizes" in bad.stderr and "Traceback" not in bad.stderr
