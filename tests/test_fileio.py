"""Atomic writes through one helper (unique temp names, nothing left on failure) and whole-file hashes."""

import hashlib
import os
import threading

import pytest

from chatexaonepath.fileio import atomic_write_text, atomic_write_with, file_sha256, remember_sha256


def test_two_writers_of_one_file_at_once_both_finish_with_a_complete_file(tmp_path):
    """Two app starts on one cache write the same example at once: neither may crash on the other's temp file."""
    target = tmp_path / "example.tiff"
    started, errors = threading.Barrier(2), []

    def write(tmp):
        started.wait()  # both writers are inside their write at the same moment
        with open(tmp, "wb") as f:
            f.write(os.urandom(1 << 16))

    def run():
        try:
            atomic_write_with(target, write)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and target.stat().st_size == 1 << 16
    assert [p.name for p in tmp_path.iterdir()] == ["example.tiff"]  # no temp file left behind


def test_a_failed_write_leaves_neither_the_file_nor_its_temp(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(tmp_path / "out.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_the_temp_name_keeps_the_suffix_and_mode_is_applied(tmp_path):
    seen = []
    atomic_write_with(tmp_path / "thumb.png", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")), mode=0o600)
    assert seen[0].startswith(".thumb.png.") and seen[0].endswith(".tmp.png")
    assert (tmp_path / "thumb.png").stat().st_mode & 0o777 == 0o600
    assert atomic_write_text(tmp_path / "a.txt", "é\n").read_text(encoding="utf-8") == "é\n"


def test_a_hash_taken_while_writing_is_used_and_follows_a_rename(tmp_path):
    path = tmp_path / "upload.svs"
    path.write_bytes(b"slide bytes")
    assert not remember_sha256(path, "0" * 64, size=5)  # the size does not match: not taken
    assert remember_sha256(path, "ab" * 32, size=11)
    (tmp_path / "session").mkdir()
    moved = path.rename(tmp_path / "session" / "upload.svs")
    assert file_sha256(moved) == "ab" * 32  # no second read: the file's identity is unchanged by a rename
    moved.write_bytes(b"other bytes!")  # rewritten: hashed again from its content
    assert file_sha256(moved) == hashlib.sha256(b"other bytes!").hexdigest()
