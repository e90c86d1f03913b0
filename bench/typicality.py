"""Does a trained model say when a slide is unlike its training slides? (chat/typicality.py)

Takes a built demo model (or any checkpoint trained on the lesion cohort, with that cohort and its features),
extracts slides the cohort's painter never made — its own held-out slides restained as IHC, the older tissue
painter's slides, photographs shipped by Python packages — with the patch encoder the checkpoint was trained
on, and counts how many of each kind the checkpoint's typicality flags, beside its held-out test slides
(which it should not flag). Target (the demo issue): ≥ 95 % of held-out slides not flagged, ≥ 95 % of the
others flagged.

    .venv/bin/python bench/typicality.py --demo <cache>/demo-model/<key>     # a demo build
    .venv/bin/python bench/typicality.py                                     # the cached demo (built if none)

Prints a table and final `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM  # noqa: E402
from chatexaonepath.progress import setup_logging  # noqa: E402
from chatexaonepath.synthetic.lesions import read_lesion_labels  # noqa: E402
from chatexaonepath.synthetic.unlike import make_unlike_slides  # noqa: E402
from chatexaonepath.vision_tower.features import read_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a demo build folder (default: the cached demo, built if none)")
    parser.add_argument("--per-kind", type=int, default=6, help="slides of each unlike kind")
    parser.add_argument("--work", type=Path, help="where the unlike slides and their features go (default: a temp dir)")
    args = parser.parse_args()
    setup_logging()
    started = time.perf_counter()
    if args.demo is None:
        from chatexaonepath.synthetic.demo_model import ensure_demo_model

        args.demo = ensure_demo_model().folder
    card = json.loads((args.demo / "demo.json").read_text())
    model = ChatEXAONEPathForCausalLM.from_pretrained(args.demo / card.get("model", "model"))
    if model.typicality is None:
        raise SystemExit("This checkpoint has no typicality.json: it was trained before typicality existed.")
    mean, std = model.tower.feature_mean.cpu(), model.tower.feature_std.cpu()

    rows = read_lesion_labels(args.demo / "cohort" / "labels.csv")
    scores: dict[str, list[float]] = {"held-out (test split)": []}
    for sid, row in sorted(rows.items()):
        if row["split"] == "test":
            bag = read_features(args.demo / "features" / f"{sid}.h5").features
            scores["held-out (test split)"].append(model.typicality.assess(bag, mean, std).score)

    from chatexaonepath.chat.provenance import serving_extractor
    from chatexaonepath.vision_tower.batch import extract_slides

    extractor, _ = serving_extractor(model.config, num_workers=0)
    work = args.work or Path(tempfile.mkdtemp(prefix="typicality-"))
    tests = sorted(args.demo / "cohort" / "slides" / f"{sid}.tiff" for sid, r in rows.items() if r["split"] == "test")
    unlike = make_unlike_slides(work / "slides", tests, per_kind=args.per_kind)
    no_tissue: dict[str, int] = {}
    for kind, paths in unlike.items():
        out = work / "features" / kind.replace(" ", "-")
        summary = extract_slides([p for p in paths], out, extractor.config, extractor=extractor)
        no_tissue[kind] = len(summary.failed)  # refused before any answer: no tissue found
        scores[kind] = [model.typicality.assess(read_features(out / f"{p.stem}.h5").features, mean, std).score
                        for p in paths if (out / f"{p.stem}.h5").is_file()]

    print(f"{'slides':<24}{'n':>4}{'flagged':>9}{'refused':>9}{'score min / median / max':>30}")
    for kind, values in scores.items():
        flagged = sum(v > 1.0 for v in values)
        ordered = sorted(values) or [float("nan")]
        print(f"{kind:<24}{len(values):>4}{flagged:>9}{no_tissue.get(kind, 0):>9}"
              f"{ordered[0]:>12.2f} / {ordered[len(ordered) // 2]:.2f} / {ordered[-1]:.2f}")
    held = scores["held-out (test split)"]
    others = [v for kind, values in scores.items() if kind != "held-out (test split)" for v in values]
    refused = sum(no_tissue.values())
    print(f"typicality_held_out_not_flagged: {sum(v <= 1.0 for v in held) / max(1, len(held)):.3f}")
    # A slide refused for want of tissue never reaches an answer: it counts as told.
    print(f"typicality_unlike_flagged: {(sum(v > 1.0 for v in others) + refused) / max(1, len(others) + refused):.3f}")
    print(f"typicality_wall_seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    logging.getLogger("chatexaonepath").setLevel(logging.WARNING)
    main()
