"""`POST /v1/files`' body: a multipart form streamed straight into the app's private folder, checked as it arrives.

The same limits as an upload from the page (upload_gate.py, uploads.py): a length is required and
checked before a byte is read, a file part whose name is not a slide format ends the request at its
headers, and the bytes are counted against `--max-upload-gb` as they come. The file is hashed on
the way in (`fileio.remember_sha256`), so the feature cache's key costs no second read. What happens
next — the zip checks, the session's disk, the slide's budgets — is the page's own code (the load).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from ...fileio import remember_sha256
from ...vision_tower.slide import MPP_RANGE
from ..config import AppConfig
from ..upload_gate import MULTIPART_SLACK
from ..uploads import ACCEPTED_SUFFIXES, format_gb
from .errors import ApiError, bad_request

MAX_PARTS = 16  # a file, its purpose, an mpp, and what an SDK may add (expires_after…)
MAX_FIELD_BYTES = 1024
MAX_NAME_BYTES = 255


@dataclass
class ReceivedUpload:
    """A slide file stored by `receive_upload`, with the form's fields."""

    path: Path
    filename: str
    size: int
    purpose: str
    mpp: float | None


def upload_boundary(headers, config: AppConfig) -> bytes:
    """The multipart boundary of an upload whose declared length is within the limit; else the refusal."""
    from python_multipart.multipart import parse_options_header

    length = headers.get("content-length")
    if length is None or not length.isdigit():
        raise ApiError(411, "An upload must say its length (Content-Length).", "length_required")
    if int(length) > config.max_upload_bytes + MULTIPART_SLACK:
        raise ApiError(413, f"The upload is {format_gb(int(length))}; this server accepts slides up to "
                            f"{format_gb(config.max_upload_bytes)} (--max-upload-gb).", "too_large")
    kind, options = parse_options_header(headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise bad_request("Upload a slide as multipart/form-data with a 'file' part (as OpenAI's clients do).",
                          "invalid_content_type")
    return options[b"boundary"]


def safe_filename(name: str) -> str:
    """A client's file name as a plain name (no folders), or the refusal."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base or base in (".", "..") or "\0" in base or len(base.encode()) > MAX_NAME_BYTES:
        raise bad_request("The uploaded file needs a plain file name (at most 255 bytes), e.g. slide.svs.",
                          "invalid_file_name", "file")
    if Path(base).suffix.lower() not in ACCEPTED_SUFFIXES:
        raise bad_request(f"{base[:80]} is not a slide format this server reads ({', '.join(ACCEPTED_SUFFIXES)}); "
                          "a MIRAX .mrxs slide or a DICOM folder goes in one .zip.", "unsupported_file", "file")
    return base


class _Form:
    """The parts of a multipart body as it streams by: the one file written to `folder`, small fields kept."""

    def __init__(self, boundary: bytes, folder: Path, max_bytes: int) -> None:
        from python_multipart.multipart import MultipartParser

        self.folder, self.max_bytes = folder, max_bytes
        self.fields: dict[str, str] = {}
        self.path: Path | None = None
        self.size, self.parts = 0, 0
        self.error: ApiError | None = None
        self._sha = hashlib.sha256()
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name: str | None = None
        self._buffer: bytearray | None = None
        self._file = None
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._end})

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import FormParserError

        try:
            self._parser.write(chunk)
        except FormParserError as e:
            raise bad_request("The upload is not a well-formed multipart form.", "invalid_form") from e
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            self._fail(bad_request(f"An upload has at most {MAX_PARTS} form parts.", "too_many_parts"))
        self._headers, self._name, self._buffer = {}, None, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if len(self._field) + len(self._value) <= 4096:  # longer headers are not ours to read
            self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._buffer = bytearray()
            return
        if self._name != "file" or self.path is not None:
            self._fail(bad_request("An upload carries one file, in the form part named 'file'.", "invalid_form"))
            return
        try:
            filename = safe_filename(options[b"filename"].decode("utf-8", "replace"))
        except ApiError as e:
            self._fail(e)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / filename
        self._file = open(self.path, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        if self._file is not None:
            self.size += end - start
            if self.size > self.max_bytes:
                self._fail(ApiError(413, f"{self.path.name} is over {format_gb(self.max_bytes)}; this server accepts "
                                         "slides up to that (--max-upload-gb).", "too_large"))
                return
            self._sha.update(data[start:end])
            self._file.write(data[start:end])
        elif self._buffer is not None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                self._fail(bad_request(f"The form field {self._name[:40]!r} is over {MAX_FIELD_BYTES} bytes.",
                                       "invalid_form"))

    def _end(self) -> None:
        if self._file is not None:
            self.close()
        elif self._buffer is not None and self._name:
            self.fields[self._name[:64]] = self._buffer.decode("utf-8", "replace")
        self._buffer = None


async def receive_upload(request, boundary: bytes, folder: Path, config: AppConfig) -> ReceivedUpload:
    """Stream the form's file into `folder` and read its fields; raises `ApiError` (the caller deletes `folder`)."""
    form = _Form(boundary, folder, config.max_upload_bytes)
    try:
        async for chunk in request.stream():
            form.write(chunk)
    finally:
        form.close()
    if form.path is None:
        raise bad_request("The upload has no slide: send it in the form part named 'file'.", "missing_file", "file")
    remember_sha256(form.path, form.sha256(), form.size)
    purpose = form.fields.get("purpose", "")[:64]
    return ReceivedUpload(form.path, form.path.name, form.size, purpose, _mpp(form.fields.get("mpp")))


def _mpp(text: str | None) -> float | None:
    """The optional `mpp` field: the slide's level-0 µm per pixel, for a file that does not record it."""
    if text is None or not text.strip():
        return None
    low, high = MPP_RANGE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise bad_request(f"mpp (the slide's µm per pixel) must be a number from {low} to {high:g}, got "
                          f"{text.strip()[:40]!r}.", "invalid_mpp", "mpp")
    return value
