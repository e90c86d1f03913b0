"""Typicality on slides the cohort's painter never made: held-out cohort slides pass, the rest are flagged.

The thresholds are calibrated as `train` calibrates them (its training and validation slides, in the tower's
feature statistics), here without training: typicality reads the features, not the weights."""

from types import SimpleNamespace

import numpy as np
import pytest

from chatexaonepath.synthetic.lesions import LesionCohortConfig, make_lesion_cohort, read_lesion_labels
from chatexaonepath.synthetic.unlike import make_unlike_slides, packaged_photographs, restain_as_ihc
from chatexaonepath.train.data import feature_statistics
from chatexaonepath.train.phases import calibrate_typicality
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.vision_tower.features import read_features


def test_restaining_keeps_the_haematoxylin_and_browns_the_eosin():
    pink = np.full((4, 4, 3), (235, 150, 220), np.uint8)  # eosin-rich
    purple = np.full((4, 4, 3), (90, 60, 150), np.uint8)  # haematoxylin-rich
    brown, still = restain_as_ihc(pink)[0, 0].astype(int), restain_as_ihc(purple)[0, 0].astype(int)
    assert brown[0] > brown[1] > brown[2]  # DAB: red over green over blue
    assert still[2] >= still[0] and abs(int(still.mean()) - int(purple.mean())) < 40  # nuclei stay blue-purple


@pytest.mark.slow
def test_held_out_cohort_slides_pass_and_slides_from_elsewhere_are_flagged(tiny_encoder, tmp_path):
    cohort, features = tmp_path / "cohort", tmp_path / "features"
    make_lesion_cohort(cohort, LesionCohortConfig(per_combination=(2, 1, 2), organs=["colon", "liver"],
                                                  lesions=["melanoma"], size=2048, seed=3))
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=16, num_workers=0)
    extractor = FeatureExtractor(config, tiny_encoder)
    assert not extract_slides([cohort / "slides"], features, config, extractor=extractor).failed
    rows = read_lesion_labels(cohort / "labels.csv")
    records = [SimpleNamespace(features_path=features / f"{sid}.h5", features_paths=(features / f"{sid}.h5",))
               for sid, r in rows.items() if r["split"] != "test"]
    mean, std = feature_statistics(records)
    tower = SimpleNamespace(tower=SimpleNamespace(feature_mean=mean, feature_std=std))
    typicality = calibrate_typicality(tower, records)

    held_out = sorted(sid for sid, r in rows.items() if r["split"] == "test")
    flagged = [sid for sid in held_out
               if not typicality.assess(read_features(features / f"{sid}.h5").features, mean, std).typical]
    assert len(held_out) == 8 and flagged == []  # held-out slides of the cohort's kind pass, its odd stains too

    unlike = make_unlike_slides(tmp_path / "unlike", [cohort / "slides" / f"{sid}.tiff" for sid in held_out],
                                per_kind=3, size=1536)
    assert len(unlike["photograph"]) == min(3, len(packaged_photographs()))
    out = tmp_path / "unlike-features"
    summary = extract_slides([p for paths in unlike.values() for p in paths], out, config, extractor=extractor)
    refused = {r.slide_id for r in summary.results if r.status == "failed" or r.num_patches <= 0}
    flagged_by_kind = {}
    for kind, paths in unlike.items():
        told = [path.stem in refused or  # no tissue found: refused before any answer
                not typicality.assess(read_features(out / f"{path.stem}.h5").features, mean, std).typical
                for path in paths]
        flagged_by_kind[kind] = sum(told) / len(told)
    # Another stain and a photograph are always told. The project's older painter draws H&E-like tissue too,
    # and a 64-wide 2-layer random encoder sees its fat and necrosis as like the cohort's pale tissue (measured
    # 1 of 3 flagged: its lymphoid tissue); bench/typicality.py measures that kind with ViT-B/16.
    assert flagged_by_kind["ihc"] == 1.0 and flagged_by_kind["photograph"] == 1.0, flagged_by_kind
    assert flagged_by_kind["other generator"] > 0, flagged_by_kind
