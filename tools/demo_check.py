"""Check a built demo model the way a newcomer meets it: in the page, in Debian's Chromium at 1366×768.

The build in --demo (a `<cache>/demo-model/<key>` folder, or any folder `build_demo_model` wrote) is served
exactly as `chatexaonepath app` serves the cached one: its checkpoint, its example slide, its model card.
Then, in the browser:

1. "Load the synthetic example slide" (#example); is a typicality warning shown? (expected: none);
2. "What is the diagnosis?" — right when the answer names the example's diagnosis in the cohort's labels and
   no other (synthetic/scores.py, as the build's own check scores it);
3. the heatmap weights the page drew (its overlay.json, as the viewer holds it): is the most-weighted patch on
   the lesion (cohort/masks), and the strict AUC of the weights against "the patch overlaps the lesion";
4. "Describe the slide." in a fresh conversation — does it name the example's organ and its finding;
5. a slide from elsewhere uploaded through the upload box — the example restained as IHC (synthetic/unlike.py:
   the same tissue, only the stain differs) — is the typicality warning shown? (expected: yes).

Prints a table, then `name: value` lines. The figures are measured, never assumed: a build that did not learn
shows it here. With --screenshot it saves <out>/app.png (the example loaded, asked for its diagnosis and
answered, the heatmap on; the README shows it) — take it from a full-size build only.

    python tools/demo_check.py --demo ~/.cache/chatexaonepath/demo-model/<key> [--out docs/images] [--screenshot]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.webapp.cli import launch_app
from chatexaonepath.webapp.engine import AppConfig, AppEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from case_screenshot import build_case  # noqa: E402
from viewer_screenshots import CHROMIUM_ARGS, V, ask, load_example, open_page, settle  # noqa: E402

SIZE = (1366, 768)  # a laptop's screen: what a newcomer most likely has
# The text of the latest answer, without what the page adds after it (evidence chips, the typicality note):
# those are not the model's words, and the chips' "patch" and sizes must not count as naming anything.
ANSWER_JS = """() => { const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const last = bots[bots.length - 1].cloneNode(true);
    last.querySelectorAll('.cxp-evidence, .cxp-untypical, button').forEach((e) => e.remove());
    return last.textContent; }"""
WARNING_JS = "() => document.querySelector('#status [data-untypical]')?.innerText ?? null"
OVERLAY_JS = f"""() => {{ const o = {V}.overlay; return {{side: o.side, top: o.top, map: o.map,
    x: Array.from(o.x), y: Array.from(o.y), weight: Array.from(o.weight)}}; }}"""


@dataclass
class Check:
    """What the page showed, and the cohort's truth beside it."""

    slide: str = ""
    truth: dict[str, str] = field(default_factory=dict)  # the example's labels.csv row
    example_warning: str | None = None
    diagnosis_answer: str = ""
    diagnosis_right: bool = False
    weights_map: str = ""
    patches: int = 0
    on_lesion: int = 0  # patches the lesion overlaps at all
    top_patch: int = -1
    top_coverage: float = 0.0
    page_auc: float = float("nan")
    describe_answer: str = ""
    describe_facts: dict[str, bool] = field(default_factory=dict)
    elsewhere: str = ""
    elsewhere_warning: str | None = None
    card_auc: float | None = None  # what the build's own check measured on this slide, where it did
    card_answers: dict[str, str] = field(default_factory=dict)


def demo_engine(folder: Path, features_dir: Path) -> AppEngine:
    """An engine serving the demo build in `folder`, made as `AppEngine.load` makes the cached demo's.

    `AppEngine.load` takes only the cached build (`ensure_demo_model`); this is its demo branch with the
    folder given. The features go to `features_dir`, empty, so the page extracts the example itself as it
    does on a newcomer's first start (the build's own features are not the page's to reuse).
    """
    from chatexaonepath.chat.provenance import serving_extractor
    from chatexaonepath.chat.session import load_chat_model
    from chatexaonepath.synthetic.demo_model import load_ready

    demo = load_ready(folder)
    if demo is None:
        raise ChatEXAONEPathError(f"{folder} holds no finished demo build (no demo.json).")
    config = AppConfig(features_dir=str(features_dir))
    model = load_chat_model(str(demo.model_dir), config.llm)
    extractor, mismatch = serving_extractor(
        model.config, encoder=config.encoder, encoder_weights=config.encoder_weights, stain_norm=config.stain_norm,
        stain_target=config.stain_target, allow_feature_mismatch=config.allow_feature_mismatch, device=config.device)
    engine = AppEngine(model, extractor, config, demo=demo)
    if mismatch:
        engine.card.warnings.append(mismatch)
    return engine


def page_answer(page) -> str:
    """The latest answer in the chat, in one line."""
    return " ".join(page.evaluate(ANSWER_JS).split())


def page_warning(page) -> str | None:
    """The typicality warning over the chat, None when the page shows none."""
    text = page.evaluate(WARNING_JS)
    return " ".join(text.split()).lstrip("⚠ ") if text else None


def score_heatmap(check: Check, overlay: dict, mask: np.ndarray) -> None:
    """The page's weights against the lesion mask: is its most-weighted patch on the lesion, and the strict AUC.

    Strict as the build's check counts it: every patch the lesion overlaps at all is positive.
    """
    from chatexaonepath.synthetic.lesion_slides import patch_lesion_coverage
    from chatexaonepath.synthetic.scores import localisation_auc

    coords = np.stack([overlay["x"], overlay["y"]], 1)
    weights = np.asarray(overlay["weight"], np.float64)
    coverage = patch_lesion_coverage(coords, int(overlay["side"]), mask)
    check.weights_map, check.patches, check.on_lesion = overlay["map"], len(weights), int((coverage > 0).sum())
    # The page's own first patch (its "top" list, ranked by weight): the one its Top patches tab shows first.
    check.top_patch = int(overlay["top"][0])
    check.top_coverage = float(coverage[check.top_patch])
    check.page_auc = localisation_auc(weights, coverage, min_coverage=0.0)


def from_card(check: Check, card: dict) -> None:
    """What the build's own check measured on the example (its AUC, its answers), to set beside the page's."""
    measured = card.get("check") or {}
    check.card_auc = (measured.get("per_slide_auc") or {}).get(check.slide)
    for answer in measured.get("answers") or []:
        if answer["slide"] == check.slide:
            check.card_answers[answer["category"]] = answer["answer"]


def run_page(engine: AppEngine, url: str, check: Check, elsewhere: Path, shot: Path | None) -> None:
    """Drive the page through the example, its two questions and the slide from elsewhere."""
    from playwright.sync_api import sync_playwright

    from chatexaonepath.synthetic.lesions import DESCRIBE_QUESTIONS, QUESTIONS, read_lesion_mask
    from chatexaonepath.synthetic.scores import answer_correct, description_facts

    cohort = engine.demo.folder / "cohort"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = open_page(browser, url, SIZE)
            load_example(page)
            shown = page.evaluate(f"{V}.config.name")
            if shown != engine.example_path.name:  # the check would score another slide against this one's truth
                raise ChatEXAONEPathError(f"The page shows {shown}, not the demo's example {engine.example_path.name}.")
            check.example_warning = page_warning(page)
            ask(page, QUESTIONS["diagnosis"][0], 1)
            check.diagnosis_answer = page_answer(page)
            check.diagnosis_right = answer_correct(check.diagnosis_answer, check.truth["diagnosis"], "diagnosis")
            score_heatmap(check, page.evaluate(OVERLAY_JS), read_lesion_mask(cohort / "masks" / f"{check.slide}.png"))
            if shot is not None:
                page.check("#viewer .cxp-heat")  # on by default; the picture must show it whatever the default
                settle(page)
                page.screenshot(path=str(shot))
            # A fresh conversation, as the build's check asks each question: after an answer in the context the
            # description would measure the model's second turn, which it was neither trained nor scored on.
            page.click("#clear")
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 0")
            ask(page, DESCRIBE_QUESTIONS[0], 1)
            check.describe_answer = page_answer(page)
            check.describe_facts = description_facts(check.describe_answer, check.truth)
            build_case(page, [elsewhere])  # through the upload box; it replaces the example (not "adding")
            check.elsewhere_warning = page_warning(page)
        finally:
            browser.close()


def short(text: str, width: int) -> str:
    """`text` cut to `width` characters for a table cell."""
    return textwrap.shorten(text, width, placeholder="…") if text else "—"


def beside_card(answer: str, card_answer: str | None) -> str:
    """How the page's answer compares with the build's check's on the same slide (the same model, greedy).

    The check asks for fewer tokens (24, 64 for the description) than the page (256): a longer page answer
    that starts with the check's is the same answer.
    """
    if card_answer is None:
        return "the build's check did not ask it"
    card_answer = " ".join(card_answer.split())
    if answer == card_answer:
        return "as the build's check"
    if answer.startswith(card_answer):
        return "as the build's check, then longer"
    return f"the build's check answered {short(repr(card_answer), 40)}"


def table(check: Check) -> str:
    """The findings as a small fixed-width table: what the page showed, and what it is measured against."""
    truth, facts = check.truth, check.describe_facts
    auc = f"{check.page_auc:.3f}" if not math.isnan(check.page_auc) else "n/a"
    card_auc = f"{check.card_auc:.3f}" if check.card_auc is not None else "not measured"
    diagnosis = (f"{truth['diagnosis']}: {'right' if check.diagnosis_right else 'WRONG'} "
                 f"({beside_card(check.diagnosis_answer, check.card_answers.get('diagnosis'))})")
    organ, finding = ("named" if facts.get(c) else "NOT named" for c in ("organ", "diagnosis"))
    described = (f"organ {truth['organ']}: {organ}; finding {truth['diagnosis']}: {finding} "
                 f"({beside_card(check.describe_answer, check.card_answers.get('description'))})")
    rows = [
        ("check", "the page showed", "against"),
        ("example slide", f"{check.slide}.tiff",
         f"held-out {truth['diagnosis']}, {truth['organ']}, lesion {float(truth['lesion_fraction']):.1%}"),
        ("typicality warning", short(check.example_warning or "none", 44), "none expected"),
        ("What is the diagnosis?", short(f'"{check.diagnosis_answer}"', 44), diagnosis),
        ("most-weighted patch", f"#{check.top_patch} of {check.patches}, {check.top_coverage:.1%} lesion",
         f"{'on' if check.top_coverage > 0 else 'OFF'} the lesion ({check.on_lesion} patches touch it)"),
        (f"heatmap AUC ({check.weights_map})", f"{auc} (strict)", f"build's check on this slide: {card_auc}"),
        ("Describe the slide.", short(f'"{check.describe_answer}"', 44), described),
        (f"upload {check.elsewhere}", short(check.elsewhere_warning or "no warning", 44), "warning expected"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def final_lines(check: Check) -> list[str]:
    """The `name: value` lines that close the output."""
    auc = f"{check.page_auc:.3f}" if not math.isnan(check.page_auc) else "nan"
    return [f"example_diagnosis_right: {int(check.diagnosis_right)}",
            f"example_top_patch_on_lesion: {int(check.top_coverage > 0)}",
            f"example_page_auc: {auc}",
            f"describe_names_organ: {int(bool(check.describe_facts.get('organ')))}",
            f"describe_names_finding: {int(bool(check.describe_facts.get('diagnosis')))}",
            f"example_flagged_unlike: {int(check.example_warning is not None)}",
            f"elsewhere_flagged_unlike: {int(check.elsewhere_warning is not None)}"]


def main(argv: list[str] | None = None) -> None:
    """Serve the build, drive the page, print the table and the final lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="A finished demo build folder (with demo.json).")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="Where --screenshot writes app.png.")
    parser.add_argument("--screenshot", action="store_true", help="Save <out>/app.png (from a full-size build).")
    args = parser.parse_args(argv)
    from chatexaonepath.synthetic.lesions import read_lesion_labels
    from chatexaonepath.synthetic.unlike import ihc_slide

    started = time.perf_counter()
    shot = None
    if args.screenshot:
        args.out.mkdir(parents=True, exist_ok=True)
        shot = args.out / "app.png"
    with tempfile.TemporaryDirectory(prefix="demo-check-") as folder:
        folder = Path(folder)
        engine = demo_engine(args.demo.expanduser(), folder / "features")
        try:
            check = Check(slide=engine.demo.card["example"]["slide"])
            check.truth = read_lesion_labels(engine.demo.folder / "cohort" / "labels.csv")[check.slide]
            from_card(check, engine.demo.card)
            elsewhere = ihc_slide(folder / f"ihc-{check.slide}.tiff", engine.example_slide())
            check.elsewhere = elsewhere.name
            demo, url = launch_app(engine, quiet=True)
            engine.start_warm_up()  # as `chatexaonepath app` does: the example's features start at once
            try:
                run_page(engine, url, check, elsewhere, shot)
            finally:
                demo.close()
        finally:
            engine.close()
    print(table(check))
    # Whole for a model that learned (a sentence or three); a model that did not may fill its 256 tokens.
    print(f"\nanswers — diagnosis: {short(repr(check.diagnosis_answer), 300)}\n"
          f"          description: {short(repr(check.describe_answer), 300)}")
    if check.elsewhere_warning:
        print(f"warning on {check.elsewhere}: {check.elsewhere_warning!r}")
    if shot is not None:
        print(f"screenshot: {shot}")
    print(f"checked in {time.perf_counter() - started:.0f} s, on {args.demo}")
    print("\n".join(final_lines(check)))


if __name__ == "__main__":
    try:
        main()
    except ChatEXAONEPathError as e:  # a folder that is no build, a page that shows another slide: one sentence
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
