"""The small version of bench/learn_synthetic.py: a synthetic cohort → features → phase 1 → phase 2 →
the chat answer to "What is the diagnosis?" on held-out slides names the right class."""

import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.synthetic.tissue_cohort import CohortConfig, make_cohort, score_diagnoses
from chatexaonepath.train.data import DataConfig
from chatexaonepath.train.phases import PhaseConfig, train_phase
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor


@pytest.mark.slow
def test_two_phases_learn_to_name_the_tissue_of_held_out_slides(tiny_encoder, tmp_path):
    cohort, features = tmp_path / "cohort", tmp_path / "features"
    make_cohort(cohort, CohortConfig(slides=18, classes=["tumor", "stroma", "lymphoid"], size=1024, test_fraction=0.34,
                                     questions_per_slide=2, seed=3))
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=16, num_workers=0)
    summary = extract_slides([cohort / "slides"], features, config, extractor=FeatureExtractor(config, tiny_encoder))
    assert not summary.failed

    common = dict(batch_size=4, gradient_accumulation=1, warmup_ratio=0.1, report_to="none", save_total_limit=1)
    data = lambda name: DataConfig(data=[str(cohort / name)], features_dir=str(features))  # noqa: E731
    train_phase(PhaseConfig(phase=1, out=str(tmp_path / "p1"), llm="embedded", epochs=8, learning_rate=2e-3,
                            **common), data("captions.json"))
    train_phase(PhaseConfig(phase=2, out=str(tmp_path / "p2"), init=str(tmp_path / "p1"), epochs=3, learning_rate=1e-3,
                            tower_learning_rate=1e-3, **common), data("instruct.json"))

    trained = score_diagnoses(ChatEXAONEPathForCausalLM.from_pretrained(tmp_path / "p2"), cohort, features)
    assert len(trained.answers) == 6
    assert trained.accuracy >= 5 / 6, trained.answers
    torch.manual_seed(0)
    untrained = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path="embedded",
                                                                     aggregator={"in_dim": 64}))
    assert score_diagnoses(untrained.eval(), cohort, features).accuracy <= 0.5
