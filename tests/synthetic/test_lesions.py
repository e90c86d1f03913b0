"""The lesion cohort: slides with known lesion masks, balanced plans, reports and QA that name the truth,
and the scores (answer matching, localisation AUC) the benchmark and the demo build use."""

import json
from pathlib import Path

import numpy as np
import pytest

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.train.data import load_records
from chatexaonepath.synthetic.scores import (
    CohortView, answer_correct, derangement, description_facts, localisation_auc, named, roc_auc,
)
from chatexaonepath.synthetic.lesions import (
    DESCRIBE_QUESTIONS, NO_LESION, OTHER_QUESTIONS, OUT_OF_SCOPE, QUESTIONS, SPLITS, LesionCohortConfig, make_lesion_cohort, plan_lesion_cohort,
    plan_cases, read_lesion_cases, read_lesion_labels, read_lesion_mask,
)
from chatexaonepath.synthetic.lesion_slides import (
    MASK_DOWNSAMPLE, NORMAL, PALETTES, Canvas, LesionSpec, ScannerLook, _paint_lesion, downsample_mask,
    patch_lesion_coverage, render_lesion_image,
)


@pytest.mark.parametrize("spec", [LesionSpec("colon", "adenocarcinoma", "high", 0.02),
                                  LesionSpec("liver", "melanoma", "low", 0.04, foci=2),
                                  LesionSpec("lymph node", "squamous cell carcinoma", "high", 0.01,
                                             margin_involved=True)])
def test_the_lesion_covers_the_asked_share_of_the_tissue_and_only_where_its_margin_says(spec):
    image, tissue, lesion = render_lesion_image(spec, (2048, 2048), seed=3)
    assert image.shape == (2048, 2048, 3) and not (lesion & ~tissue).any()
    assert lesion.sum() / tissue.sum() == pytest.approx(spec.fraction, rel=0.15)
    import cv2

    count = cv2.connectedComponents(lesion.astype(np.uint8))[0] - 1
    assert count >= spec.foci  # a ragged, infiltrative edge may leave a few islands beside each focus
    edge = tissue & ~cv2.erode(tissue.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert (lesion & edge).any() == spec.margin_involved


def _nucleus_sizes(canvas) -> np.ndarray:
    """Areas (µm²) of the haematoxylin-dense blobs of a painted canvas: its nuclei."""
    import cv2

    count, _, stats, _ = cv2.connectedComponentsWithStats((canvas.h > 0.5).astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA] / canvas.px**2
    return areas[areas >= 10]  # not the bridges' dots, debris or mitotic clumps


@pytest.mark.parametrize("organ", ["colon", "liver", "lymph node"])
@pytest.mark.parametrize("lesion", ["adenocarcinoma", "squamous cell carcinoma", "melanoma"])
def test_a_lesion_has_its_tissue_s_colour_statistics_but_larger_cells(organ, lesion):
    import cv2

    image, tissue, mask = render_lesion_image(LesionSpec(organ, lesion, "high", 0.08), (2048, 2048), seed=5)
    # The six colour numbers (mean and spread per channel) of the tissue around it, to within the scanner's noise…
    ys, xs = np.nonzero(mask)
    window = np.zeros_like(mask)
    window[max(0, ys.min() - 120): ys.max() + 121, max(0, xs.min() - 120): xs.max() + 121] = True  # 60 µm around
    around, inside = tissue & ~mask & window, mask
    assert np.abs(image[inside].mean(0) - image[around].mean(0)).max() < 4
    assert np.abs(image[inside].std(0) - image[around].std(0)).max() < 4
    # …while its cells are drawn larger than the organ's own.
    rng, region = np.random.default_rng(0), np.ones((600, 600), bool)
    normal, drawn = Canvas(region.shape, 0.5), Canvas(region.shape, 0.5)
    NORMAL[organ](normal, rng, region, PALETTES[organ])
    _paint_lesion(drawn, rng, region, LesionSpec(organ, lesion, "high", 0.08), PALETTES[organ])
    assert np.median(_nucleus_sizes(drawn)) > 2 * np.median(_nucleus_sizes(normal))


def test_every_slide_has_its_own_stain_and_scanner_look():
    looks = [ScannerLook.draw(np.random.default_rng(seed)) for seed in range(6)]
    assert len({tuple(np.round(look.h_od, 3)) for look in looks}) == 6
    assert len({look.jpeg_quality for look in looks}) > 2 and len({(look.h_strength, look.e_strength) for look in looks}) == 6
    normal = [render_lesion_image(LesionSpec("liver"), (1024, 1024), seed=seed)[0] for seed in (1, 2)]
    assert np.abs(normal[0].reshape(-1, 3).mean(0) - normal[1].reshape(-1, 3).mean(0)).max() > 3


def test_a_normal_slide_has_no_lesion():
    _, tissue, lesion = render_lesion_image(LesionSpec("liver"), (2048, 2048), seed=1)
    assert tissue.mean() > 0.4 and not lesion.any()


def test_unknown_organs_lesions_and_grades_are_refused():
    with pytest.raises(ValueError, match="organ"):
        LesionSpec("brain")
    with pytest.raises(ValueError, match="grade"):
        LesionSpec("colon", "melanoma", "medium")
    with pytest.raises(ValueError, match="pigment"):
        LesionSpec("colon", "adenocarcinoma", "low", pigment=True)


def test_patch_coverage_comes_from_the_mask_at_its_scale():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 40:64] = True  # level 0: y 80–160, x 320–512
    small = downsample_mask(np.kron(mask, np.ones((MASK_DOWNSAMPLE, MASK_DOWNSAMPLE), bool)))
    assert small.shape == (64, 64) and small.max() == 255
    coords = np.array([[256, 0], [0, 0], [256, 256], [384, 128]])
    coverage = patch_lesion_coverage(coords, 128, small)
    assert coverage[0] == pytest.approx(64 * 48 / 128**2) and coverage[1] == 0.0 and coverage[2] == 0.0
    assert coverage[3] == pytest.approx(32 / 128)  # rows 128–160 of the patch's 128–256
    assert patch_lesion_coverage(np.array([[320, 80]]), 128, small)[0] == pytest.approx(80 / 128)


def test_every_split_holds_every_organ_and_diagnosis_with_the_grades_balanced():
    config = LesionCohortConfig(per_combination=(3, 1, 2), seed=2)
    slides = plan_lesion_cohort(config)
    assert len(slides) == config.slides == 72 and len({s.slide_id for s in slides}) == 72
    for split, count in zip(SPLITS, config.per_combination):
        members = [s for s in slides if s.split == split]
        assert {(s.organ, s.diagnosis) for s in members} == {(o, d) for o in config.organs for d in config.diagnoses}
        assert all(sum(s.organ == o and s.diagnosis == d for s in members) == count
                   for o in config.organs for d in config.diagnoses)
        assert sum(s.diagnosis == NO_LESION for s in members) == len(members) // 4
        for lesion in config.lesions:
            grades = [s.grade for s in members if s.diagnosis == lesion]
            assert abs(grades.count("low") - grades.count("high")) <= 1, (split, lesion, grades)
            margins = [s.margins for s in members if s.diagnosis == lesion]
            assert abs(margins.count("involved") - margins.count("clear")) <= 1, (split, lesion, margins)
    lesions = [s for s in slides if s.diagnosis != NO_LESION]
    assert all(s.lesion_fraction == 0.01 and s.foci == 1 for s in lesions if s.split != "train")
    assert all(0.005 <= s.lesion_fraction <= 0.03 for s in lesions)
    assert all(s.grade is None and s.margins is None for s in slides if s.diagnosis == NO_LESION)
    melanomas = [s for s in slides if s.diagnosis == "melanoma"]
    assert 0 < sum(s.pigment for s in melanomas) < len(melanomas) and not any(s.pigment for s in slides
                                                                               if s.diagnosis != "melanoma")
    ids = [s.slide_id for s in slides]  # in a seeded random order: neighbours do not share a split or diagnosis
    assert [s.split for s in sorted(slides, key=lambda s: s.slide_id)][:12] != ["train"] * 12


def test_bad_settings_are_one_sentence_errors():
    with pytest.raises(ChatEXAONEPathError, match="at least one slide"):
        LesionCohortConfig(per_combination=(3, 0, 2))
    with pytest.raises(ChatEXAONEPathError, match="Unknown"):
        LesionCohortConfig(organs=["brain"])
    with pytest.raises(ChatEXAONEPathError, match="too small"):
        LesionCohortConfig(size=1024)


def images(record: dict) -> list[str]:
    """A record's slides: one, or a case's list."""
    return record["image"] if isinstance(record["image"], list) else [record["image"]]


SMALL = dict(per_combination=(1, 1, 1), organs=["colon"], lesions=["adenocarcinoma", "melanoma"], size=2048,
             lesion_area=(0.01, 0.02), eval_lesion_area=0.01, seed=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("lesions")
    make_lesion_cohort(out, LesionCohortConfig(**SMALL))
    return out


def test_the_cohort_writes_slides_masks_reports_and_data_that_name_the_truth(cohort):
    labels = read_lesion_labels(cohort / "labels.csv")
    assert len(labels) == 9
    split = {sid: row["split"] for sid, row in labels.items()}
    for name, wanted in (("captions.json", "train"), ("instruct.json", "train"), ("val_captions.json", "val"),
                         ("val_instruct.json", "val"), ("test.json", "test")):
        records = json.loads((cohort / name).read_text())
        assert records and {split[Path(i).stem] for r in records for i in images(r)} == {wanted}, name
    for record in json.loads((cohort / "captions.json").read_text()):
        row = labels[record["image"]]
        caption = record["conversations"][1]["value"]  # what the slide shows: organ, finding, grade, margins
        assert caption.startswith(row["organ"].capitalize()) and answer_correct(caption, row["diagnosis"], "diagnosis")
        if row["grade"]:
            assert row["grade"] in caption and row["margins"] in caption
    for record in json.loads((cohort / "instruct.json").read_text()):
        if isinstance(record["image"], list):  # a case: test_the_cases_* check them
            continue
        row = labels[record["image"]]
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            asked = question["value"].split("\n")[-1]
            if asked in DESCRIBE_QUESTIONS:  # the description names every fact the slide has, and no other
                assert all(description_facts(answer["value"], row).values()), (row, answer)
                continue
            if asked in OTHER_QUESTIONS:  # what a slide cannot tell gets the honest answer, not an attribute
                assert answer["value"] == OUT_OF_SCOPE
                continue
            category = next(c for c, phrasings in QUESTIONS.items() if asked in phrasings)
            if category in ("diagnosis", "organ") or (category in ("grade", "margins") and row["grade"]):
                assert answer_correct(answer["value"], row[category], category), (row, answer)
    held_out = [r for r in json.loads((cohort / "test.json").read_text()) if not isinstance(r["image"], list)]
    assert {r["image"] for r in held_out} == {sid for sid, row in labels.items() if row["split"] == "test"}
    planned = sorted(plan_cases(plan_lesion_cohort(LesionCohortConfig(**SMALL))), key=lambda c: c.case_id)
    assert read_lesion_cases(cohort / "cases.csv") == planned and {c.split for c in planned} == set(SPLITS)
    for sid, row in labels.items():
        report = (cohort / "reports" / f"{sid}.txt").read_text()
        assert row["organ"].capitalize() in report and (row["diagnosis"] in report or row["diagnosis"] == NO_LESION)
        mask = read_lesion_mask(cohort / "masks" / f"{sid}.png")
        assert mask.shape == (2048 // MASK_DOWNSAMPLE,) * 2 and (mask.any() == (row["diagnosis"] != NO_LESION))


def test_the_cohort_data_is_valid_training_data_and_a_rerun_keeps_the_slides(cohort, tmp_path):
    from chatexaonepath.vision_tower.features import write_features

    for slide in (cohort / "slides").glob("*.tiff"):
        write_features(tmp_path / f"{slide.stem}.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64), {})
    for name in ("captions.json", "instruct.json", "val_captions.json", "val_instruct.json", "test.json"):
        assert load_records([str(cohort / name)], str(tmp_path)).records
    before = {p.name: p.stat().st_mtime_ns for p in (cohort / "slides").iterdir()}
    make_lesion_cohort(cohort, LesionCohortConfig(**SMALL))
    assert {p.name: p.stat().st_mtime_ns for p in (cohort / "slides").iterdir()} == before
    with pytest.raises(ChatEXAONEPathError, match="other settings"):
        make_lesion_cohort(cohort, LesionCohortConfig(**SMALL | {"seed": 2}))


def test_slides_painted_side_by_side_are_the_slides_painted_one_by_one(cohort, tmp_path):
    import tifffile

    config, seen = LesionCohortConfig(**SMALL), []
    make_lesion_cohort(tmp_path, config, progress=lambda done, total: seen.append((done, total)), threads=1)
    assert seen == [(i, 9) for i in range(10)]
    for slide in sorted((cohort / "slides").glob("*.tiff")):
        assert np.array_equal(tifffile.imread(slide), tifffile.imread(tmp_path / "slides" / slide.name)), slide.name
        assert np.array_equal(read_lesion_mask(cohort / "masks" / f"{slide.stem}.png"),
                              read_lesion_mask(tmp_path / "masks" / f"{slide.stem}.png"))
    (tmp_path / "masks" / "les-0003.png").unlink()  # interrupted after the slide, before its mask
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "slides").iterdir() if p.name != "les-0003.tiff"}
    seen.clear()
    make_lesion_cohort(tmp_path, config, progress=lambda done, total: seen.append((done, total)), threads=2)
    assert seen == [(8, 9), (9, 9)] and (tmp_path / "masks" / "les-0003.png").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "slides").iterdir() if p.name != "les-0003.tiff"} == kept


def test_a_slide_that_fails_to_paint_stops_the_cohort_and_keeps_the_others(tmp_path, monkeypatch):
    import chatexaonepath.synthetic.lesions as lesions

    paint = lesions._paint

    def failing(out, slide, config):
        if slide.slide_id == "les-0002":
            raise OSError("disk full")
        paint(out, slide, config)

    monkeypatch.setattr(lesions, "_paint", failing)
    with pytest.raises(OSError, match="disk full"):
        make_lesion_cohort(tmp_path, LesionCohortConfig(**SMALL), threads=1)
    painted = {p.stem for p in (tmp_path / "masks").glob("*.png")}  # the one slide already being painted may finish
    assert {"les-0000", "les-0001"} <= painted <= {"les-0000", "les-0001", "les-0003"}
    assert not (tmp_path / "cohort.json").exists()  # so the next run paints the rest


def test_the_cohort_view_finds_the_lesion_patches_of_extracted_slides(cohort, tmp_path, tiny_encoder):
    from chatexaonepath.vision_tower.batch import extract_slides
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

    config = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=16)
    extract_slides([cohort / "slides"], tmp_path, config, extractor=FeatureExtractor(config, tiny_encoder))
    view = CohortView.load(cohort, tmp_path)
    for sid in view.ids:
        lesion = view.rows[sid]["diagnosis"] != NO_LESION
        assert (view.coverage[sid] > 0).any() == lesion
        assert len(view.coverage[sid]) == len(view.features[sid])


def test_answers_are_right_when_they_name_the_truth_and_nothing_else():
    assert named("Squamous cell carcinoma, high grade.", "diagnosis") == {"squamous cell carcinoma"}
    assert answer_correct("No lesion; normal tissue.", NO_LESION, "diagnosis")
    assert not answer_correct("Adenocarcinoma or melanoma.", "melanoma", "diagnosis")
    assert answer_correct("Lymph node.", "lymph node", "organ") and not answer_correct("Colonic", "colon", "organ")
    assert answer_correct("High grade.", "high", "grade") and not answer_correct("Low to high.", "high", "grade")
    assert answer_correct("Involved; the lesion reaches the margin.", "involved", "margins")
    assert answer_correct("Clear; the lesion does not reach the margin.", "clear", "margins")


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert np.isnan(roc_auc([1, 2], [True, True]))


def test_localisation_auc_leaves_out_patches_the_lesion_only_grazes():
    weights = np.array([0.5, 0.3, 0.01, 0.1, 0.09])
    coverage = np.array([0.9, 0.4, 0.02, 0.0, 0.0])  # the grazed patch (2 %) gets no more weight than clean ones
    assert localisation_auc(weights, coverage) == 1.0  # lenient
    assert localisation_auc(weights, coverage, min_coverage=0.0) == pytest.approx(4 / 6)  # strict


def test_the_shuffled_control_gives_every_slide_another_one():
    ids = [f"s{i}" for i in range(5)]
    mapping = derangement(ids, seed=3)
    assert sorted(mapping.values()) == ids and all(k != v for k, v in mapping.items())
    with pytest.raises(ChatEXAONEPathError):
        derangement(["only"])
