"""The small version of bench/learn_lesions.py: from slide-level captions alone (phase 1, LLM frozen) the
model learns what a slide shows, on held-out slides of the fair lesion cohort, at every seed it runs.

Small means: two organs, two lesion types or none, slides of 2048² (~40 patches), a tiny random ViT, every
slide stained alike, and lesions large enough (8–12 % of the tissue) that its features can show them — the
benchmark itself holds them to 1 % under each slide's own stain and scanner look. The checkpoint is the one the validation slides chose; the test slides are scored once:
the true caption must be likelier with its own slide than with another test slide's (the slide matters),
and asked closed-ended — which organ's caption is likeliest, the rest of the caption true — the model must
beat always answering the most frequent organ. (Greedy decoding after phase 1 alone mostly repeats the
commonest caption: the frozen LLM's prior outweighs a tower trained for minutes; the likelihoods show what
the tower learned. The demo build and the benchmark score decoded answers after phase 2.)"""

import pytest

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.synthetic.lesions import CAPTION_PROMPT, LesionCohortConfig, make_lesion_cohort
from chatexaonepath.synthetic.scores import CohortView, derangement
from chatexaonepath.train.data import DataConfig
from chatexaonepath.train.phases import PhaseConfig, train_phase
from chatexaonepath.vision_tower.batch import extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor


def chance(view: CohortView, category: str) -> float:
    values = [view.rows[sid][category] for sid in view.ids]
    return max(values.count(v) for v in set(values)) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_captions_alone_teach_the_tower_what_a_held_out_slide_shows(tiny_encoder, tmp_path, seed):
    cohort, features = tmp_path / "cohort", tmp_path / "features"
    make_lesion_cohort(cohort, LesionCohortConfig(per_combination=(3, 1, 2), organs=["colon", "lymph node"],
                                                  lesions=["adenocarcinoma", "melanoma"], size=2048,
                                                  lesion_area=(0.08, 0.12), eval_lesion_area=0.1,
                                                  stain_variation=0.0, seed=seed))
    config = ExtractConfig(encoder=tiny_encoder.name, batch_size=16, num_workers=0)
    summary = extract_slides([cohort / "slides"], features, config, extractor=FeatureExtractor(config, tiny_encoder))
    assert not summary.failed

    result = train_phase(
        PhaseConfig(phase=1, out=str(tmp_path / "p1"), llm="embedded", epochs=12, learning_rate=2e-3, batch_size=4,
                    gradient_accumulation=1, warmup_ratio=0.1, report_to="none", save_total_limit=1, seed=seed,
                    validate_every=3, patience=0),
        DataConfig(data=[str(cohort / "captions.json")], val_data=[str(cohort / "val_captions.json")],
                   features_dir=str(features), max_patches=24, seed=seed))
    assert result.selection["chosen"] is not None  # validation chose the checkpoint

    view = CohortView.load(cohort, features)  # the test split
    model = ChatEXAONEPathForCausalLM.from_pretrained(tmp_path / "p1").eval()
    own = caption_losses(model, cohort, view.ids, view.ids)
    other = derangement(view.ids, seed)
    shuffled = caption_losses(model, cohort, view.ids, [other[sid] for sid in view.ids])
    assert len(view.ids) == 12 and sum(own) < sum(shuffled) - 0.05 * len(own), (own, shuffled)
    organs = ["colon", "lymph node"]
    losses = {organ: caption_losses(model, cohort, view.ids, view.ids, organ=organ) for organ in organs}
    chosen = [min(organs, key=lambda o: losses[o][i]) for i in range(len(view.ids))]
    right = sum(c == view.rows[sid]["organ"] for c, sid in zip(chosen, view.ids)) / len(view.ids)
    assert right >= chance(view, "organ") + 0.15, (chosen, [view.rows[sid]["organ"] for sid in view.ids])


def caption_losses(model, cohort, asked: list[str], shown: list[str], organ: str | None = None) -> list[float]:
    """Per test slide: the loss of its true caption given the features of `shown` (itself, or another slide);
    with `organ`, of its caption with that organ instead of its own."""
    import json
    from dataclasses import replace

    import torch

    from chatexaonepath.synthetic.lesions import caption, plan_lesion_cohort
    from chatexaonepath.chat.conversation import Turn
    from chatexaonepath.train.phases import prompt_builder
    from chatexaonepath.vision_tower.features import read_features

    config = LesionCohortConfig(**json.loads((cohort / "cohort.json").read_text()))
    truth = {s.slide_id: caption(replace(s, organ=organ) if organ else s) for s in plan_lesion_cohort(config)}
    builder = prompt_builder(model)
    losses = []
    with torch.no_grad():
        for sid, source in zip(asked, shown):
            built = builder.build([Turn("user", f"<image>\n{CAPTION_PROMPT}"), Turn("assistant", truth[sid])])
            bag = read_features(cohort.parent / "features" / f"{source}.h5").features.float()
            out = model(torch.tensor([built.input_ids]), slide_features=[bag], labels=torch.tensor([built.labels]))
            losses.append(float(out.loss))
    return losses
