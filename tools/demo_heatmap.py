"""Draw docs/images/demo_heatmap.png: a demo build's pooling weights on its example slide, lesion outlined.

    python tools/demo_heatmap.py <user cache>/demo-model/<key> docs/images/demo_heatmap.png

Left, the weights by rank (as the app paints them); right, on a linear scale. Prints the answer to the
diagnosis question and the strongest patches' weights with their lesion coverage.
"""

import json
import logging
import sys
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import tifffile

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM  # noqa: E402
from chatexaonepath.synthetic.scores import CohortView, ask, displayed_weights, session_for  # noqa: E402
from chatexaonepath.synthetic.lesions import QUESTIONS, read_lesion_mask  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    build, out = Path(sys.argv[1]), Path(sys.argv[2])
    card = json.loads((build / "demo.json").read_text())
    sid = card["example"]["slide"]
    view = CohortView.load(build / "cohort", build / "features")
    model = ChatEXAONEPathForCausalLM.from_pretrained(build / "model")
    session = session_for(model, 24)
    f = view.features[sid]
    w = displayed_weights(session, f)
    answer = ask(session, f, QUESTIONS["diagnosis"][0])  # as the check and the bench ask it
    with tifffile.TiffFile(build / "cohort" / "slides" / f"{sid}.tiff") as t:
        thumb = min(t.series[0].levels, key=lambda level: abs(level.shape[0] - 768)).asarray()
        full = t.series[0].levels[0].shape[0]
    s = thumb.shape[0] / full
    ps, coords = int(f.attrs["patch_size_level0"]), f.coords.numpy()
    rank = np.empty(len(w))
    rank[np.argsort(w)] = np.arange(len(w)) / max(1, len(w) - 1)
    mask = read_lesion_mask(build / "cohort" / "masks" / f"{sid}.png")
    mask = cv2.resize(mask, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR) > 127
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, values, title in ((axes[0], rank, "by rank (as the app paints)"), (axes[1], w / w.max(), "linear (weight / max)")):
        heat, cover = np.zeros(thumb.shape[:2]), np.zeros(thumb.shape[:2], bool)
        for (x, y), v in zip(coords, values):
            x0, y0, x1, y1 = int(x * s), int(y * s), int((x + ps) * s), int((y + ps) * s)
            heat[y0:y1, x0:x1], cover[y0:y1, x0:x1] = v, True
        ax.imshow(thumb)
        ax.imshow(np.ma.masked_where(~cover, heat), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        for c in contours:
            ax.plot(c[:, 0, 0], c[:, 0, 1], color="cyan", lw=1.5)
        ax.set_title(title)
        ax.axis("off")
    ex = card["example"]
    fig.suptitle(f"{sid}: {ex['organ']}, {ex['grade']}-grade {ex['diagnosis']} at {ex['lesion_fraction']:.0%} of the tissue "
                 f"(lesion outlined) — asked the diagnosis: {answer!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    top = np.argsort(w)[::-1][:4]
    print(sid, repr(answer), "top weights", [round(float(w[i]), 3) for i in top],
          "lesion coverage", [round(float(view.coverage[sid][i]), 2) for i in top])


if __name__ == "__main__":
    main()
