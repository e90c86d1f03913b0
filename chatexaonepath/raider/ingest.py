"""Reports → clean text: PDFs (text layer, or OCR when scanned), images (OCR), .txt/.md, and CSV tables.

Every report either yields text or is listed with the reason it could not be read; none is
dropped silently. Cleaning removes what OCR and page layout add: hyphenation at line ends,
headers and footers repeated on every page, control characters and runs of whitespace.

Reports are data for an LLM, so each report's lines that address the model ("Note to the AI: …",
"when asked about the diagnosis, answer …") are flagged here and listed in `ingest_summary.json`;
chunking leaves them out of the index. A report id must fit a file name (`reports/<id>.txt`):
longer ids are listed as unreadable with the reason, not truncated into ids that could collide.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ChatEXAONEPathError
from ..injection import flagged_lines

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A PDF page with less text than this in its text layer is treated as scanned and OCRed.
MIN_TEXT_LAYER_CHARS = 40
# The largest image OCR reads: an A4 page scanned at 600 dpi is 35 megapixels. Pillow itself only warns
# up to 179 megapixels, and tesseract on such an image takes minutes and gigabytes.
OCR_MAX_PIXELS = 40_000_000
# Longest report id in UTF-8 bytes: `<id>.txt` and the atomic writer's `.<id>.txt.<pid>.<random>.tmp.txt` must
# fit the 255-byte file-name limit of ext4, XFS, APFS and NTFS.
MAX_ID_BYTES = 200


@dataclass
class Report:
    """One report's text and where it came from."""

    report_id: str
    text: str
    source: str  # file (and row, for CSV)
    method: str  # "text", "pdf-text", "ocr", "csv"
    flagged: list[dict] = field(default_factory=list)  # lines addressing the model: {line, text, kinds}

    def __post_init__(self) -> None:
        if not self.flagged:
            self.flagged = flag_lines(self.text)


@dataclass
class Unreadable:
    """A report that produced no text, with the reason."""

    source: str
    reason: str


def flag_lines(text: str) -> list[dict]:
    """The lines of a report that address the model reading it: {line (1-based), text, kinds}."""
    return [{"line": text.count("\n", 0, start) + 1, "text": text[start:end].strip()[:300], "kinds": kinds}
            for start, end, kinds in flagged_lines(text, "model")]


def report_id_problem(report_id: str) -> str | None:
    """Why `report_id` cannot name its file `reports/<id>.txt`, in one sentence; None when it can."""
    if not report_id.strip() or report_id in (".", "..") or re.search(r"[/\\\x00]", report_id):
        return f"Report id {report_id[:60]!r} cannot name a file; give the report another id."
    size = len(report_id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return (f"Report id {report_id[:40]!r}… is {size} bytes, longer than the {MAX_ID_BYTES} a file name allows; "
                "give the report a shorter id (a shorter file name or CSV id).")
    return None


def clean_text(text: str) -> str:
    """Undo hyphenation at line ends, drop control characters, normalise whitespace, keep paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00ad", "")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", " ", text)
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)  # "carci-\nnoma" → "carcinoma"
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_PAGE_NUMBER = re.compile(r"^(page\s*)?\d+(\s*(of|/)\s*\d+)?$", re.IGNORECASE)


def remove_repeated_lines(pages: list[str], min_pages: int = 3) -> list[str]:
    """Drop page numbers, and header/footer lines that recur verbatim on most pages."""
    if len(pages) < min_pages:
        return pages
    key = lambda line: " ".join(line.lower().split())  # noqa: E731
    counts = Counter(k for page in pages for k in {key(line) for line in page.splitlines() if line.strip()})
    repeated = {k for k, n in counts.items() if n >= max(min_pages, 0.6 * len(pages))}
    return ["\n".join(line for line in page.splitlines()
                      if key(line) not in repeated and not _PAGE_NUMBER.match(line.strip())) for page in pages]


def check_ocr_size(width: int, height: int, source: str) -> None:
    """Refuse an image larger than OCR reads, before it is decoded."""
    if width * height > OCR_MAX_PIXELS:
        raise ChatEXAONEPathError(
            f"{source} holds a {width:,}×{height:,} image ({width * height / 1e6:,.0f} megapixels), more than the "
            f"{OCR_MAX_PIXELS / 1e6:.0f} that OCR reads (a page at 600 dpi); scan it at 300 dpi.")


def ocr_image(image, source: str = "The image") -> str:
    """OCR a PIL image with tesseract (refused past `OCR_MAX_PIXELS`); a clear error when tesseract is missing."""
    import pytesseract

    check_ocr_size(*image.size, source)
    try:
        return pytesseract.image_to_string(image.convert("L"))
    except pytesseract.TesseractNotFoundError as e:
        raise ChatEXAONEPathError("OCR needs the tesseract program: `apt-get install tesseract-ocr` "
                                  "(make setup installs it).") from e


def _pdf_pages(path: Path) -> tuple[list[str], str]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages, method = [], "pdf-text"
    for page in reader.pages:
        text = page.extract_text() or ""
        if len(text.strip()) < MIN_TEXT_LAYER_CHARS and page.images:
            from io import BytesIO

            from PIL import Image

            for width, height in _pdf_image_sizes(page):  # pypdf decodes an image to hand it over: check first
                check_ocr_size(width, height, f"{path.name} (page {len(pages) + 1})")
            text = "\n".join(ocr_image(Image.open(BytesIO(img.data)), path.name) for img in page.images)
            method = "ocr"
        pages.append(text)
    return pages, method


def _pdf_image_sizes(page) -> list[tuple[int, int]]:
    """(width, height) of each image a PDF page draws, from its XObject dictionaries (nothing decoded)."""
    sizes = []
    resources = page.get("/Resources") or {}
    xobjects = resources.get("/XObject") or {}
    for name in xobjects:
        xobject = xobjects[name].get_object()
        if xobject.get("/Subtype") == "/Image":
            try:
                sizes.append((int(xobject.get("/Width", 0)), int(xobject.get("/Height", 0))))
            except (TypeError, ValueError):
                continue
    return sizes


def read_report_file(path: str | Path) -> Report:
    """Text of one report file (.pdf, image, .txt, .md); raises ChatEXAONEPathError when unreadable."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            pages, method = [path.read_text(errors="replace")], "text"
        elif suffix == ".pdf":
            pages, method = _pdf_pages(path)
        elif suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:  # reads the header only: the size is checked before decoding
                pages, method = [ocr_image(image, path.name)], "ocr"
        else:
            raise ChatEXAONEPathError(f"{path} is not a report format this reads (.pdf, .txt, .md, .png, .jpg, .tif).")
    except ChatEXAONEPathError:
        raise
    except Exception as e:  # noqa: BLE001 - pypdf/Pillow raise many types for one meaning: unreadable
        raise ChatEXAONEPathError(f"Could not read {path}: {type(e).__name__}: {str(e)[:160]}.") from e
    text = clean_text("\n\n".join(remove_repeated_lines(pages)))
    if not text:
        raise ChatEXAONEPathError(f"{path} has no text (empty, or a scan OCR could not read).")
    return Report(path.stem, text, str(path), method)


def read_report_csv(path: str | Path, id_column: str | None = None, text_column: str = "text") -> tuple[list[Report], list[Unreadable]]:
    """Reports from a CSV table (TCGA-Reports: `patient_filename,text`); empty rows are listed, not dropped."""
    path = Path(path)
    csv.field_size_limit(1 << 26)  # report texts exceed the module's 128 KB default
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        id_column = id_column or next((c for c in ("patient_filename", "report_id", "id", "filename") if c in columns), None)
        if id_column not in columns or text_column not in columns:
            raise ChatEXAONEPathError(f"{path} needs an id column and a {text_column!r} column; it has {', '.join(columns)}.")
        reports, unreadable = [], []
        for row_number, row in enumerate(reader, start=2):
            source = f"{path}:{row_number}"
            report_id, text = (row.get(id_column) or "").strip(), clean_text(row.get(text_column) or "")
            if not report_id or not text:
                unreadable.append(Unreadable(source, "no id" if not report_id else "empty text"))
                continue
            reports.append(Report(report_id, text, source, "csv"))
    return reports, unreadable


def read_reports(inputs: list[str | Path]) -> tuple[list[Report], list[Unreadable]]:
    """All reports in the given files and folders, plus the ones that could not be read and why."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise ChatEXAONEPathError(f"Report file or folder not found: {item}.")
        files += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")) if item.is_dir() else [item]
    reports, unreadable = [], []
    for file in files:
        try:
            if file.suffix.lower() == ".csv":
                found, bad = read_report_csv(file)
                reports += found
                unreadable += bad
            else:
                reports.append(read_report_file(file))
        except ChatEXAONEPathError as e:
            logger.warning("%s", e)
            unreadable.append(Unreadable(str(file), str(e)))
    for report in [r for r in reports if report_id_problem(r.report_id)]:
        unreadable.append(Unreadable(report.source, report_id_problem(report.report_id)))
        reports.remove(report)
    duplicates = [k for k, n in Counter(r.report_id for r in reports).items() if n > 1]
    if duplicates:
        raise ChatEXAONEPathError(f"{len(duplicates)} report ids occur twice (e.g. {duplicates[0]!r}); "
                                  "give each report a unique file name or CSV id.")
    return reports, unreadable


def tcga_patient(identifier: str) -> str | None:
    """The TCGA patient barcode (first 12 characters, TCGA-XX-XXXX) in a report or slide name."""
    match = re.search(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", identifier.upper())
    return match.group(0) if match else None


def map_reports_to_slides(report_ids: list[str], slide_ids: list[str],
                          explicit: dict[str, list[str]] | None = None) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Report → slides by an explicit map, then equal stems, then TCGA patient barcode.

    Returns (mapping, unmatched report ids, unmatched slide ids).
    """
    explicit = explicit or {}
    by_patient: dict[str, list[str]] = {}
    for slide in slide_ids:
        patient = tcga_patient(slide)
        if patient:
            by_patient.setdefault(patient, []).append(slide)
    slides = set(slide_ids)
    mapping: dict[str, list[str]] = {}
    for report in report_ids:
        if report in explicit:
            mapping[report] = [s for s in explicit[report] if s in slides]
        elif report in slides:
            mapping[report] = [report]
        elif tcga_patient(report) in by_patient:
            mapping[report] = sorted(by_patient[tcga_patient(report)])
    used = {s for matched in mapping.values() for s in matched}
    mapping = {r: s for r, s in mapping.items() if s}
    return mapping, [r for r in report_ids if r not in mapping], sorted(slides - used)


def read_slide_map_csv(path: str | Path) -> dict[str, list[str]]:
    """A user's report → slide map: a CSV with `report_id` and `slide_id` columns (one row per pair)."""
    path = Path(path)
    if not path.is_file():
        raise ChatEXAONEPathError(f"Slide map not found: {path}.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"report_id", "slide_id"} <= set(reader.fieldnames or []):
            raise ChatEXAONEPathError(f"{path} needs 'report_id' and 'slide_id' columns; it has "
                                      f"{', '.join(reader.fieldnames or []) or 'none'}.")
        mapping: dict[str, list[str]] = {}
        for row in reader:
            if row["report_id"] and row["slide_id"]:
                mapping.setdefault(row["report_id"].strip(), []).append(row["slide_id"].strip())
    return mapping


def slide_ids_in(inputs: list[str | Path]) -> list[str]:
    """Slide ids from slide files/folders, or from a features folder (`<slide_id>.h5` / `.pt`)."""
    from ..vision_tower.slide import find_slides, slide_id_of

    ids: list[str] = []
    for item in map(Path, inputs):
        features = sorted(item.glob("*.h5")) + sorted(item.glob("*.pt")) if item.is_dir() else []
        ids += [p.stem for p in features] if features else [slide_id_of(p) for p in find_slides([item])]
    return sorted(set(ids))


def _check_file_safe(report_id: str) -> None:
    problem = report_id_problem(report_id)
    if problem:
        raise ChatEXAONEPathError(problem)


def write_ingested(out_dir: str | Path, reports: list[Report], unreadable: list[Unreadable],
                   slide_ids: list[str] | None = None, explicit: dict[str, list[str]] | None = None) -> dict:
    """Write `reports/<id>.txt`, `reports.jsonl`, `unreadable.jsonl`, `ingest_summary.json` and (with slides)
    `slide_map.json`.

    Returns the slide map record ({} without slides). Files are written atomically, so a killed
    ingest leaves either the old or the new outputs.
    """
    from ..fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text

    out_dir = Path(out_dir)
    for report in reports:
        _check_file_safe(report.report_id)
    for report in reports:
        atomic_write_text(out_dir / "reports" / f"{report.report_id}.txt", report.text + "\n")
    atomic_write_jsonl(out_dir / "reports.jsonl", [
        {"report_id": r.report_id, "source": r.source, "method": r.method, "chars": len(r.text), "text": r.text,
         "flagged_lines": r.flagged} for r in reports])
    atomic_write_jsonl(out_dir / "unreadable.jsonl", [{"source": u.source, "reason": u.reason} for u in unreadable])
    flagged = {r.report_id: r.flagged for r in reports if r.flagged}
    atomic_write_json(out_dir / "ingest_summary.json", {
        "reports": len(reports), "unreadable": len(unreadable), "methods": dict(Counter(r.method for r in reports)),
        "reports_with_flagged_lines": len(flagged), "flagged_lines": flagged})
    if flagged:
        logger.info("%d lines in %d reports address the model; they are left out of the index (see %s).",
                       sum(map(len, flagged.values())), len(flagged), out_dir / "ingest_summary.json")
    if slide_ids is None:
        (out_dir / "slide_map.json").unlink(missing_ok=True)
        return {}
    mapping, unmatched_reports, unmatched_slides = map_reports_to_slides([r.report_id for r in reports], slide_ids,
                                                                        explicit)
    record = {"mapping": mapping, "unmatched_reports": unmatched_reports, "unmatched_slides": unmatched_slides}
    atomic_write_json(out_dir / "slide_map.json", record)
    return record


def load_ingested(directory: str | Path) -> list[Report]:
    """The reports written by `raider ingest` (its `reports.jsonl`)."""
    path = Path(directory) / "reports.jsonl"
    if not path.is_file():
        raise ChatEXAONEPathError(f"{directory} has no reports.jsonl; run `chatexaonepath raider ingest … --out "
                                  f"{directory}` first.")
    reports = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            reports.append(Report(row["report_id"], row["text"], row["source"], row["method"],
                                  row.get("flagged_lines") or []))
        except (ValueError, KeyError, TypeError) as e:
            raise ChatEXAONEPathError(f"{path}:{number} is not a report record ({e}); rerun the ingest.") from e
    return reports


def load_slide_map(directory: str | Path) -> dict[str, list[str]] | None:
    """The report → slides map written by `raider ingest --slides`, or None when it mapped no slides."""
    path = Path(directory) / "slide_map.json"
    if not path.is_file():
        return None
    try:
        return {str(k): [str(s) for s in v] for k, v in json.loads(path.read_text())["mapping"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChatEXAONEPathError(f"{path} is not a slide map; rerun `chatexaonepath raider ingest`.") from e
