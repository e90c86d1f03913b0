"""The small version of bench/learn_lesions.py: from slide-level captions alone (phase 1, LLM frozen) the
tower learns to find a lesion covering a few per cent of the tissue and the model names it, on held-out
slides — both far above their controls (random towers; always the most frequent diagnosis)."""

import numpy as np
import pytest

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.train.data import DataConfig
from chatexaonepath.synthetic.scores import CohortView, score_lesion_cohort, untrained_localisation
from chatexaonepath.synthetic.lesions import CAPTION_PROMPT, NO_LESION, LesionCohortConfig, make_lesion_cohort
from chatexaonepath.train.phases import PhaseConfig, train_phase
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor


@pytest.mark.slow
def test_captions_alone_teach_the_tower_to_find_and_name_a_small_lesion(tiny_encoder, tmp_path):
    cohort, features = tmp_path / "cohort", tmp_path / "features"
    # 24 slides of ~44 tissue patches; lesions cover 3-5 % of the tissue (4 % on the held-out slides): two
    # or three patches of a slide, the rest normal tissue of one of three organs.
    make_lesion_cohort(cohort, LesionCohortConfig(slides=24, size=2048, lesion_area=(0.03, 0.05),
                                                  test_lesion_area=0.04, seed=0))
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=16, num_workers=0)
    summary = extract_slides([cohort / "slides"], features, config, extractor=FeatureExtractor(config, tiny_encoder))
    assert not summary.failed

    train_phase(PhaseConfig(phase=1, out=str(tmp_path / "p1"), llm="embedded", epochs=20, learning_rate=2e-3,
                            batch_size=4, gradient_accumulation=1, warmup_ratio=0.1, report_to="none",
                            save_total_limit=1),
                DataConfig(data=[str(cohort / "captions.json")], features_dir=str(features), val_fraction=0.0))

    view = CohortView.load(cohort, features)
    model = ChatEXAONEPathForCausalLM.from_pretrained(tmp_path / "p1")
    # After phase 1 the model answers the caption prompt; a caption starts with the diagnosis.
    trained = score_lesion_cohort(model, view, categories=("diagnosis",), questions={"diagnosis": CAPTION_PROMPT},
                                  max_new_tokens=16)
    diagnoses = [view.rows[sid]["diagnosis"] for sid in view.ids]
    chance = max(diagnoses.count(d) for d in set(diagnoses)) / len(diagnoses)
    assert len(view.ids) >= 6 and sum(d != NO_LESION for d in diagnoses) >= 4
    assert trained.accuracy["diagnosis"] >= max(0.5, chance + 0.2), trained.answers

    assert trained.localisation_auc >= 0.75, trained.per_slide_auc
    untrained = untrained_localisation(model, view, range(8))  # replaces the trained tower: scored last
    assert trained.localisation_auc >= np.mean(untrained) + 0.15, untrained
