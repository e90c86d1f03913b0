"""Benchmark: does training learn to find a small lesion, and does the heatmap point at it?

The lesion cohort (train/lesions.py: colon, liver or lymph node tissue; adenocarcinoma, squamous cell
carcinoma or melanoma, low or high grade, in foci covering 1–5 % of the tissue; a quarter of the
slides without a lesion) → features (random ViT-B/16: the EXAONEPath weights are not available
offline) → phase 1 → phase 2 on the embedded LLM — the same `build_demo_model`, with the same
defaults, that the app's demo model comes from (24 training slides, 8 held out; `--slides 64` for a
larger held-out set, at about twice the time). On the held-out slides, whose lesions cover exactly 2 %
of the tissue: the chat answers to the diagnosis, organ and grade questions, and the localisation
AUC of the weights the app paints as the heatmap (per slide, patches at least 10 % lesion against
patches without lesion, the slivers it only grazes left out; mean over the slides with a lesion; the
AUC with every overlapping patch positive is printed too).

Controls on the same slides: the untrained model (what `--untrained` serves; its localisation is the
mean over 16 random towers, as one tower's is far from chance either way) and the trained model asked
about another held-out slide (its answers scored against the asked slide, its heatmap laid over the
asked slide's grid): both near chance when the answers and the heatmap come from the slide.

Final lines: `lesion_accuracy: X` (diagnosis on held-out slides at 2 % lesion area; target ≥ 0.90)
and `localisation_auc: Y` (target ≥ 0.90).

    python bench/learn_lesions.py [--slides N] [--test-fraction F] [--size PX] [--out DIR] [--keep]

`--out` resumes a build folder, so `--out <user cache>/demo-model/<key>` scores the cached demo model
itself without training again (pass the settings it was built with).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.synthetic.demo_model import DemoBuildConfig, build_demo_model
from chatexaonepath.synthetic.scores import (MIN_COVERAGE, CohortView, derangement, score_lesion_cohort,
                                                untrained_localisation)
from chatexaonepath.synthetic.lesions import NO_LESION, SCORED


UNTRAINED_TOWERS = 16


def untrained_model(in_dim: int, llm: str, seed: int) -> ChatEXAONEPathForCausalLM:
    """What the app serves with --untrained: a fresh tower around the LLM."""
    torch.manual_seed(seed)
    return ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=llm,
                                                                aggregator={"in_dim": in_dim})).eval()


def cohort_patches(work: Path) -> int:
    """Tissue patches of every slide of the cohort (counted from the features, so a resumed build counts too)."""
    from chatexaonepath.vision_tower.features import read_features

    return sum(len(read_features(path).coords) for path in sorted((work / "features").glob("*.h5")))


def chance(view: CohortView, category: str) -> float:
    """Accuracy of always answering the most frequent class of `category` among the scored slides."""
    values = [row[category] for row in view.rows.values() if row[category]]
    return max(values.count(v) for v in set(values)) / len(values)


def patch_count(text: str) -> int | None:
    """A --phase1-max-patches value: a positive count, or `none` for whole slides."""
    if text.strip().lower() == "none":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of patches or none, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=DemoBuildConfig.slides)
    parser.add_argument("--size", type=int, default=DemoBuildConfig.size,
                        help="slide side in level-0 pixels (0.5 µm/px)")
    parser.add_argument("--test-fraction", type=float, default=DemoBuildConfig.test_fraction,
                        help="share of each diagnosis's slides held out")
    parser.add_argument("--phase1-epochs", type=float, default=DemoBuildConfig.phase1_epochs)
    parser.add_argument("--phase1-max-patches", type=patch_count, default=DemoBuildConfig.phase1_max_patches,
                        help="patches phase 1 draws from each training slide per step (none: every patch)")
    parser.add_argument("--phase2-epochs", type=float, default=DemoBuildConfig.phase2_epochs)
    parser.add_argument("--llm", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untrained-towers", type=int, default=UNTRAINED_TOWERS,
                        help="random towers the untrained localisation control averages over")
    parser.add_argument("--out", type=Path, default=None, help="work folder, resumed if it exists (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.untrained_towers < 2:
        parser.error("--untrained-towers must be at least 2: the control is a mean with its standard error.")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    work = args.out or Path(tempfile.mkdtemp(prefix="learn-lesions-"))
    started = time.perf_counter()

    def progress(stage, done, total):
        if done is None:
            print(f"  [{time.perf_counter() - started:5.0f} s] {stage} …", file=sys.stderr, flush=True)

    config = DemoBuildConfig(slides=args.slides, size=args.size, test_fraction=args.test_fraction,
                             phase1_epochs=args.phase1_epochs, phase1_max_patches=args.phase1_max_patches,
                             phase2_epochs=args.phase2_epochs, llm=args.llm, seed=args.seed, check=False)
    demo = build_demo_model(work, config, progress=progress)
    view = CohortView.load(work / "cohort", work / "features")
    model = ChatEXAONEPathForCausalLM.from_pretrained(demo.model_dir)  # what `--model` loads
    progress("scoring the trained model", None, None)
    trained = score_lesion_cohort(model, view)
    shuffled = score_lesion_cohort(model, view, answer_from=derangement(view.ids, args.seed))
    in_dim = model.config.aggregator["in_dim"]
    del model
    progress("scoring untrained models", None, None)
    base = untrained_model(in_dim, args.llm, 0)
    untrained = score_lesion_cohort(base, view)  # its answers; localisation: the mean over many towers
    untrained_aucs = [untrained.localisation_auc, *untrained_localisation(base, view, range(1, args.untrained_towers))]
    untrained_auc = float(np.mean(untrained_aucs))

    lesion_slides = [sid for sid in view.ids if view.rows[sid]["diagnosis"] != NO_LESION]
    rows = [
        ("held-out slides (with a lesion at 2 %)", f"{len(view.ids)} ({len(lesion_slides)})"),
        ("training slides, patches in the cohort", f"{demo.card['train_slides']}, {cohort_patches(work)}"),
        ("patches per held-out lesion slide: ≥10 % lesion / grazed / all (mean)",
         f"{np.mean([(view.coverage[s] >= MIN_COVERAGE).sum() for s in lesion_slides]):.1f} / "
         f"{np.mean([((view.coverage[s] > 0) & (view.coverage[s] < MIN_COVERAGE)).sum() for s in lesion_slides]):.1f}"
         f" / {np.mean([len(view.coverage[s]) for s in lesion_slides]):.0f}"),
    ]
    for category in SCORED:
        rows.append((f"{category} accuracy: trained / shuffled slide / untrained (chance)",
                     f"{trained.accuracy[category]:.2f} / {shuffled.accuracy[category]:.2f} / "
                     f"{untrained.accuracy[category]:.2f} ({chance(view, category):.2f})"))
    rows += [
        ("diagnosis accuracy, slides with a lesion / without", f"{trained.accuracy_where('diagnosis', lesion=True):.2f} / "
                                                               f"{trained.accuracy_where('diagnosis', lesion=False):.2f}"),
        (f"localisation AUC: trained / shuffled slide / untrained (mean of {len(untrained_aucs)} towers)",
         f"{trained.localisation_auc:.3f} / {shuffled.localisation_auc:.3f} / {untrained_auc:.3f} "
         f"(range {min(untrained_aucs):.2f}–{max(untrained_aucs):.2f}, "
         f"s.e. {np.std(untrained_aucs, ddof=1) / np.sqrt(len(untrained_aucs)):.2f})"),
        ("  the same, every overlapping patch positive (slivers too)",
         f"{trained.localisation_auc_any:.3f} / {shuffled.localisation_auc_any:.3f} / "
         f"{untrained.localisation_auc_any:.3f} (one tower)"),
        ("localisation AUC: worst held-out slide", f"{min(trained.per_slide_auc.values()):.3f}"),
        *((f"time: {k} (its build; 0 for a stage resumed)", f"{v:.0f} s") for k, v in demo.card["seconds"].items()),
        ("time: total (with scoring and controls)", f"{time.perf_counter() - started:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for a in [a for a in trained.answers if not a["correct"]][:8]:
        print(f"  wrong: {a['slide']} {a['category']} ({a['truth']}): {a['answer']!r}")
    for name, score in (("trained", trained), ("untrained", untrained)):
        print(f"  {name} answers, e.g.: {[a['answer'][:40] for a in score.answers[:3]]}")
    (work / "bench.json").write_text(json.dumps({"trained": trained.__dict__, "shuffled": shuffled.__dict__,
                                                 "untrained_auc": untrained_auc,
                                                 "untrained_aucs": untrained_aucs}, indent=1, default=str))
    if not args.keep and args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"lesion_accuracy: {trained.accuracy['diagnosis']:.3f}")
    print(f"localisation_auc: {trained.localisation_auc:.3f}")


if __name__ == "__main__":
    main()
