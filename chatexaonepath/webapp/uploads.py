"""Uploaded files → a slide path inside a session's private folder.

A MIRAX slide (`.mrxs` plus its data folder) and a DICOM slide (a folder of `.dcm` files) are
more than one file, so they arrive as one `.zip`; it is unpacked with the same size limit as
any upload, and without letting member names escape the folder.
"""

from __future__ import annotations

import logging
import shutil
import uuid
import zipfile
from pathlib import Path

from ..errors import SlideError
from ..vision_tower.slide import SLIDE_SUFFIXES

logger = logging.getLogger(__name__)

ACCEPTED_SUFFIXES = (*SLIDE_SUFFIXES, ".zip")
GB = 1024**3


class UploadTooLargeError(SlideError):
    """An upload (or the contents of an uploaded zip) is larger than the app accepts."""


def format_gb(size: float) -> str:
    """Bytes as gigabytes for messages ("4 GB", "0.25 GB")."""
    return f"{size / GB:.3g} GB"


def take_upload(upload: str | Path, session_dir: Path, max_bytes: int) -> Path:
    """Move an uploaded file into `session_dir` (unpacking a zip) and return the slide to open."""
    upload = Path(upload)
    if not upload.is_file():
        raise SlideError(f"The upload {upload.name} is gone before it could be read; upload it again.")
    suffix = upload.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise SlideError(f"{upload.name} is not a slide format the app reads ({', '.join(SLIDE_SUFFIXES)}); "
                         "a MIRAX .mrxs slide or a DICOM folder goes in one .zip.")
    size = upload.stat().st_size
    if size > max_bytes:
        raise UploadTooLargeError(f"{upload.name} is {format_gb(size)}; this app accepts slides up to "
                                  f"{format_gb(max_bytes)} (the --max-upload-gb option raises the limit).")
    folder = session_dir / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    target = folder / upload.name
    try:
        # Same filesystem as Gradio's upload cache (cli.py puts it under the app's private folder): a rename.
        shutil.move(upload, target)
    except FileNotFoundError as e:  # another session uploading identical bytes shares Gradio's cache path
        raise SlideError(f"The upload {upload.name} is gone before it could be read; upload it again.") from e
    if suffix != ".zip":
        return target
    slide = unpack_slide_zip(target, folder / target.stem, max_bytes)
    target.unlink()
    return slide


def unpack_slide_zip(archive: Path, out_dir: Path, max_bytes: int) -> Path:
    """Unpack a zip holding one slide (MIRAX, DICOM folder or a single slide file); return its path."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not _is_junk(m.filename)]
            total = sum(m.file_size for m in members)
            if total > max_bytes:  # a zip bomb, or just too big: refuse before writing anything
                raise UploadTooLargeError(
                    f"{archive.name} unpacks to {format_gb(total)}; this app accepts slides up to "
                    f"{format_gb(max_bytes)} (the --max-upload-gb option raises the limit).")
            root = out_dir.resolve()
            for member in members:
                dest = (root / member.filename).resolve()
                if not dest.is_relative_to(root):
                    raise SlideError(f"{archive.name} has a member outside its folder ({member.filename}); "
                                     "zip the slide's files with relative paths.")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise SlideError(f"{archive.name} is not a readable zip archive ({e}).") from e
    return _the_slide_in(out_dir, archive.name)


def _is_junk(name: str) -> bool:
    parts = Path(name).parts
    return any(p.startswith("__MACOSX") or p.startswith("._") or p == ".DS_Store" for p in parts)


def _the_slide_in(folder: Path, archive_name: str) -> Path:
    """The one slide in an unpacked folder: a .mrxs, else a folder of .dcm files, else one slide file."""
    mirax = sorted(folder.rglob("*.mrxs"))
    if mirax:
        candidates = mirax
    else:
        dicom = sorted({p.parent for p in folder.rglob("*.dcm")})
        other = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                       and p.suffix.lower() != ".dcm")
        candidates = dicom + other
    if not candidates:
        raise SlideError(f"{archive_name} holds no slide ({', '.join(SLIDE_SUFFIXES)}).")
    if len(candidates) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in candidates[:4])
        raise SlideError(f"{archive_name} holds {len(candidates)} slides ({names}); upload one slide at a time.")
    return candidates[0]
