"""Uploaded files → a slide path inside a session's private folder.

A MIRAX slide (`.mrxs` plus its data folder) and a DICOM slide (a folder of `.dcm` files) are
more than one file, so they arrive as one `.zip`. A zip is checked before anything is written —
member count (from the archive's end record, before its directory is even parsed), folder depth,
nested archives, total unpacked size against the upload and the session's disk budgets, names
that would leave the folder — and a refused or failed upload leaves nothing behind.
"""

from __future__ import annotations

import logging
import shutil
import struct
import uuid
import zipfile
from pathlib import Path

from ..errors import BudgetExceededError, SlideError
from ..vision_tower.slide import SLIDE_SUFFIXES
from .config import GB, UploadLimits

logger = logging.getLogger(__name__)

ACCEPTED_SUFFIXES = (*SLIDE_SUFFIXES, ".zip")
ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz")


class UploadTooLargeError(BudgetExceededError):
    """An upload (or the contents of an uploaded zip) is larger than the app accepts."""


def format_gb(size: float) -> str:
    """Bytes as gigabytes for messages ("4 GB", "0.25 GB")."""
    return f"{size / GB:.3g} GB"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def take_upload(upload: str | Path, session_dir: Path, limits: UploadLimits, *, owned: bool = False) -> Path:
    """Move an uploaded file into its own folder in `session_dir` (unpacking a zip); return the slide to open.

    `owned`: the upload is the app's own copy (Gradio's cache in the app folder), deleted when refused.
    """
    upload = Path(upload)
    if not upload.is_file():
        raise SlideError(f"The upload {upload.name} is gone before it could be read; upload it again.")
    try:
        _check_upload(upload, session_dir, limits)
    except BaseException:
        if owned:
            upload.unlink(missing_ok=True)
        raise
    folder = session_dir / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    try:
        target = folder / upload.name
        try:
            # Same filesystem as Gradio's upload cache (cli.py puts it under the app's private folder): a rename.
            shutil.move(upload, target)
        except FileNotFoundError as e:  # another session uploading identical bytes shares Gradio's cache path
            raise SlideError(f"The upload {upload.name} is gone before it could be read; upload it again.") from e
        if target.suffix.lower() != ".zip":
            return target
        room = limits.max_session_bytes - folder_bytes(session_dir)  # the archive counts until it is deleted
        slide = unpack_slide_zip(target, folder / target.stem, limits, room)
        target.unlink()
        return slide
    except BaseException:  # a refused or broken upload leaves nothing: not the archive, not a partial unpack
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_upload(upload: Path, session_dir: Path, limits: UploadLimits) -> None:
    suffix = upload.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise SlideError(f"{upload.name} is not a slide format the app reads ({', '.join(SLIDE_SUFFIXES)}); "
                         "a MIRAX .mrxs slide or a DICOM folder goes in one .zip.")
    size = upload.stat().st_size
    if size > limits.max_bytes:
        raise UploadTooLargeError(f"{upload.name} is {format_gb(size)}; this app accepts slides up to "
                                  f"{format_gb(limits.max_bytes)} (the --max-upload-gb option raises the limit).")
    held = folder_bytes(session_dir)
    if held + size > limits.max_session_bytes:
        raise UploadTooLargeError(
            f"{upload.name} ({format_gb(size)}) would take this session past its {format_gb(limits.max_session_bytes)} "
            f"of disk (--max-session-gb); it already holds {format_gb(held)}.")


def unpack_slide_zip(archive: Path, out_dir: Path, limits: UploadLimits, room: int | None = None) -> Path:
    """Unpack a zip holding one slide (MIRAX, DICOM folder or a single slide file); return its path.

    `room`: bytes the unpacked files may take (the session's disk left); the upload limit applies too.
    """
    declared = declared_member_count(archive)
    if declared is not None and declared > limits.max_zip_members:
        raise _too_many_members(archive, declared, limits)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _checked_members(archive, zf, limits, room)
            root = out_dir.resolve()
            for member in members:
                dest = (root / member.filename).resolve()
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as e:
        raise SlideError(f"{archive.name} is not a readable zip archive ({e}).") from e
    return _the_slide_in(out_dir, archive.name)


def _checked_members(archive: Path, zf: zipfile.ZipFile, limits: UploadLimits, room: int | None) -> list:
    """The members to unpack, after every check that needs only the zip's directory."""
    infos = zf.infolist()
    if len(infos) > limits.max_zip_members:  # the end record can understate the directory
        raise _too_many_members(archive, len(infos), limits)
    members = [m for m in infos if not m.is_dir() and not _is_junk(m.filename)]
    root = Path("/unpacked")
    for member in members:
        name = Path(member.filename)
        if not (root / name).resolve().is_relative_to(root) or name.is_absolute():
            raise SlideError(f"{archive.name} has a member outside its folder ({member.filename}); "
                             "zip the slide's files with relative paths.")
        if len(name.parts) > limits.max_zip_depth:
            raise SlideError(f"{archive.name} nests {member.filename} {len(name.parts)} folders deep, more than the "
                             f"{limits.max_zip_depth} allowed (--max-zip-depth).")
        if name.suffix.lower() in ARCHIVE_SUFFIXES:
            raise SlideError(f"{archive.name} holds another archive ({member.filename}); zip the slide's own "
                             "files, not an archive of them.")
    total = sum(m.file_size for m in members)
    if total > limits.max_bytes:  # a zip bomb, or just too big: refuse before writing anything
        raise UploadTooLargeError(
            f"{archive.name} unpacks to {format_gb(total)}; this app accepts slides up to "
            f"{format_gb(limits.max_bytes)} (the --max-upload-gb option raises the limit).")
    if room is not None and total > room:
        raise UploadTooLargeError(
            f"{archive.name} unpacks to {format_gb(total)}, more than the {format_gb(max(room, 0))} left of this "
            f"session's {format_gb(limits.max_session_bytes)} of disk (--max-session-gb).")
    return members


def _too_many_members(archive: Path, count: int, limits: UploadLimits) -> BudgetExceededError:
    return BudgetExceededError(
        f"{archive.name} has {count:,} members, more than the {limits.max_zip_members:,} allowed (--max-zip-members); "
        "a slide's zip holds its own files only.")


def declared_member_count(archive: Path) -> int | None:
    """The member count in a zip's end-of-central-directory record (zip64 too), read without parsing the directory.

    None when the record is not found (zipfile then says what is wrong).
    """
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        f.seek(max(0, size - (22 + 0xFFFF)))  # the record, plus the longest comment it may carry
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    count = struct.unpack("<H", tail[at + 10:at + 12])[0]
    locator = at - 20
    if count == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        offset = struct.unpack("<Q", tail[locator + 8:locator + 16])[0]
        with open(archive, "rb") as f:
            f.seek(offset)
            record = f.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            count = struct.unpack("<Q", record[32:40])[0]
    return count


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
