"""Multi-file slide formats name other files; every one of them must lie inside the slide's own folder.

A Hamamatsu `.vms`/`.vmu` key file lists its JPEG, map and optimisation files, a MIRAX
`Slidedat.ini` its data and index files, and OpenSlide reads a DICOM slide as every file in its
folder. OpenSlide joins those names to the slide's folder as given, so `../../x` (or a symbolic
link) would make it read a file elsewhere on the machine. `check_references` refuses such a slide
before OpenSlide opens it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import OutsideReferenceError, SlideError

logger = logging.getLogger(__name__)

# Key files are a few kB; anything far larger is not one (OpenSlide caps Slidedat.ini at 1 MiB too).
MAX_KEY_FILE_BYTES = 1 << 20
# Keys whose values are file names: Hamamatsu ImageFile, ImageFile(x,y), MapFile, OptimisationFile,
# MacroImage; MIRAX FILE_<n> and INDEXFILE. Matched loosely, so a variant spelling is checked too.
VMS_FILE_KEY = re.compile(r"^\s*(ImageFile|MapFile|OptimisationFile|MacroImage)[^=]*=(.*)$", re.IGNORECASE)
MIRAX_FILE_KEY = re.compile(r"^\s*(FILE_\d+|INDEXFILE)\s*=(.*)$", re.IGNORECASE)


def default_root(path: Path) -> Path:
    """The folder a slide's files must stay in: a DICOM folder itself, else the file's folder."""
    return path if path.is_dir() else path.parent


def check_references(path: Path, root: Path | None = None) -> None:
    """Raise `OutsideReferenceError` when `path`, or a file its format names, resolves outside `root`."""
    root = (root or default_root(path)).resolve()
    _inside(path, root, path, "the slide itself")
    suffix = path.suffix.lower()
    if path.is_dir():  # a DICOM folder: OpenSlide reads every file in it as part of the series
        for member in path.iterdir():
            _inside(member, root, path, f"{member.name} in the DICOM folder")
    elif suffix in (".vms", ".vmu"):
        for key, value in _file_keys(path, VMS_FILE_KEY):
            _inside(_named(path.parent, value), root, path, f"{key}={value}")
    elif suffix == ".mrxs":
        data_dir = path.with_suffix("")
        _inside(data_dir, root, path, f"its data folder {data_dir.name}")
        slidedat = data_dir / "Slidedat.ini"
        if slidedat.is_file():
            _inside(slidedat, root, path, "Slidedat.ini")
            for key, value in _file_keys(slidedat, MIRAX_FILE_KEY):
                _inside(_named(data_dir, value), root, path, f"Slidedat.ini {key}={value}")
        if data_dir.is_dir():
            for member in data_dir.rglob("*"):  # a symbolic link inside the data folder counts too
                _inside(member, root, path, f"{member.relative_to(data_dir)} in its data folder")


def _file_keys(key_file: Path, pattern: re.Pattern) -> list[tuple[str, str]]:
    """(key, value) pairs naming files, from an INI-style key file (read as bytes: any encoding)."""
    if not key_file.is_file():
        return []
    size = key_file.stat().st_size
    if size > MAX_KEY_FILE_BYTES:
        raise SlideError(f"{key_file} is {size:,} bytes, too large for a slide's key file.")
    text = key_file.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    found = []
    for line in text.splitlines():
        match = pattern.match(line)
        if match and match.group(2).strip():
            found.append((match.group(1).strip(), match.group(2).strip()))
    return found


def _inside(candidate: Path, root: Path, slide: Path, what: str) -> None:
    if not candidate.resolve().is_relative_to(root):  # resolve() follows symbolic links and `..`
        raise OutsideReferenceError(
            f"{slide} refers to a file outside its folder ({what}); every file a slide uses must be "
            "inside the slide's own folder (or zip).")


def _named(folder: Path, value: str) -> Path:
    """The file a key file's value names; an absolute name stays absolute, so it is judged as such."""
    value = value.strip().strip('"').replace("\\", "/")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        return Path("/") / value.lstrip("/")  # nothing a scanner writes needs one: outside by definition
    return folder / value
