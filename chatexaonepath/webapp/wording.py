"""How the page says things: lengths and areas in µm and mm, weights as shares, and plain words for technical ones.

A pathologist reads micrometres, not pixels of a pyramid's level 0, and "2.0 % of the attention", not
"pooling weight 0.0197"; the technical name stays one hover away (a `title` tooltip), because a
developer or a methods section needs it. The same formats are used by static/viewer.js (`fmtLength`,
`fmtArea`, `fmtShare`), so the chat, the viewer and the exports agree.
"""

from __future__ import annotations

import html
import math
import re

from ..chat.regions import Region

# Technical names the page shows in plain words, with the technical name (and what it is) in a tooltip.
GLOSSARY = {
    "vision tower": ("slide reader", "vision tower: the attention aggregator and projector that turn the patch "
                                     "features into the language model's visual tokens"),
    "pooling weight": ("attention", "pooling weight: the share of a patch in the visual tokens the answer was "
                                    "made from (the projector's attention; all patches add up to 100 %)"),
    "patch encoder": ("patch encoder", "the image model that turns each tissue patch into a feature vector"),
    "LoRA": ("fine-tuning (LoRA)", "LoRA: low-rank adapters trained into the language model"),
    "level-0": ("full-resolution", "level 0: the scan's full resolution"),
}
_GLOSSED = re.compile("|".join(re.escape(term) for term in sorted(GLOSSARY, key=len, reverse=True)))

# Vendors as OpenSlide names them, as a reader would ("generic-tiff" says nothing to a pathologist).
VENDORS = {"aperio": "Aperio", "hamamatsu": "Hamamatsu", "leica": "Leica", "mirax": "3DHISTECH MIRAX",
           "philips": "Philips", "sakura": "Sakura", "ventana": "Roche Ventana", "dicom": "DICOM",
           "generic-tiff": "TIFF", "generic-tiled-tiff": "TIFF", "tiff": "TIFF", "image": "image", "pil": "image"}


def plain_html(text: str) -> str:
    """`text` escaped for HTML, each technical term in GLOSSARY replaced by its plain word with a tooltip."""
    out, last = [], 0
    for match in _GLOSSED.finditer(text):
        plain, tip = GLOSSARY[match.group(0)]
        out += [html.escape(text[last:match.start()]),
                f'<span class="cxp-term" title="{html.escape(tip)}">{html.escape(plain)}</span>']
        last = match.end()
    return "".join(out) + html.escape(text[last:])


def vendor_name(vendor: str | None) -> str:
    """A slide format's name as a reader would say it ("" when unknown)."""
    return VENDORS.get((vendor or "").lower(), "")


def length(um: float) -> str:
    """A length: "8.5 µm", "120 µm", "1,250 µm" below 2 mm, "2.50 mm" above (as viewer.js's fmtLength)."""
    if not math.isfinite(um):
        return "?"
    if um >= 2000:
        return f"{um / 1000:.2f} mm"
    return f"{um:.1f} µm" if um < 10 else f"{round(um):,} µm"


def area(um2: float) -> str:
    """An area: "3,700 µm²" below 0.01 mm², "0.037 mm²" above (as viewer.js's fmtArea)."""
    if um2 < 10_000:
        return f"{round(um2):,} µm²"
    mm2 = um2 / 1e6
    return f"{mm2:.3f} mm²" if mm2 < 10 else f"{mm2:.1f} mm²"


def share(weight: float) -> str:
    """A weight that sums to 1 over the patches, as a share: "12 %", "2.0 %", "0.05 %", "< 0.01 %"."""
    percent = 100.0 * float(weight)
    if not math.isfinite(percent):
        return "?"
    if percent >= 10:
        return f"{percent:.0f} %"
    if percent >= 0.1:
        return f"{percent:.1f} %"
    if percent >= 0.01:
        return f"{percent:.2f} %"
    return "< 0.01 %"


def position(x_px: float, y_px: float, mpp: float) -> str:
    """A point of the slide, from its top-left corner: "x 320 µm, y 704 µm"."""
    return f"x {round(x_px * mpp):,} µm, y {round(y_px * mpp):,} µm"


def region_size(region: Region, mpp: float) -> str:
    """A region's size: "210 × 177 µm (0.037 mm²)"."""
    width, height = region.width * mpp, region.height * mpp
    return f"{length(width)} × {length(height)} ({area(width * height)})"


def region_text(region: Region, mpp: float | None) -> str:
    """A region for people: its size and place in µm (pixels when the µm/px is unknown)."""
    if not mpp:
        return region.describe()
    return f"{region_size(region, mpp)} at {position(region.x, region.y, mpp)}"


def region_pixels(region: Region) -> str:
    """The secondary detail: a region in full-resolution pixels."""
    return f"pixels x {region.x:,}, y {region.y:,}, {region.width:,} × {region.height:,} at full resolution"
