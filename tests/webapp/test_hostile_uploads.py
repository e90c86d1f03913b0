"""Hostile uploads, each built small inside the test: refused quickly, in one sentence, leaving nothing behind."""

import struct
import time
import zipfile
import zlib

import pytest

from chatexaonepath.errors import BudgetExceededError, OutsideReferenceError, SlideError
from chatexaonepath.webapp.config import UploadLimits
from chatexaonepath.webapp.messages import user_message
from chatexaonepath.webapp.uploads import declared_member_count, folder_bytes, take_upload
from tests.webapp.conftest import gradio_upload

MB = 1024**2


def empty_members_zip(path, count, **kwargs):
    with zipfile.ZipFile(path, "w", **kwargs) as zf:
        for i in range(count):
            zf.writestr(f"m/{i}.txt", b"")
    return path


def tiny_png_declaring(path, width, height):
    """A PNG of a few hundred bytes that declares `width` × `height` pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def leftovers(session):
    """Files left in a session folder and Gradio's upload cache (the app's own copy of uploads)."""
    gradio = session.uploads_root / "gradio"
    return [p for root in (session.folder, gradio) if root.exists() for p in root.rglob("*") if p.is_file()]


def test_a_zip_of_many_empty_members_is_refused_from_its_end_record(make_engine, tmp_path, monkeypatch):
    engine = make_engine()
    session = engine.session("tab")
    bomb = empty_members_zip(tmp_path / "many.zip", 3_000)
    assert declared_member_count(bomb) == 3_000 and bomb.stat().st_size < 1 * MB
    parsed = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: parsed.append(1))
    upload = gradio_upload(engine.work_dir, bomb)
    started = time.perf_counter()
    with pytest.raises(BudgetExceededError, match=r"3,000 members, more than the 2,000 allowed \(--max-zip-members\)"):
        session.load_upload(upload)
    assert time.perf_counter() - started < 1.0 and not parsed  # the zip's directory was never read
    assert leftovers(session) == []  # neither the archive nor Gradio's copy of it stays


def test_the_member_count_of_a_zip64_archive_is_read_too(tmp_path):
    archive = empty_members_zip(tmp_path / "zip64.zip", 70_000)  # past 65,535: counted in the zip64 record
    assert declared_member_count(archive) == 70_000
    limits = UploadLimits(10 * MB, 20 * MB)
    with pytest.raises(BudgetExceededError, match="70,000 members"):
        take_upload(archive, tmp_path / "session", limits)


def test_an_end_record_that_understates_the_members_is_caught_after_parsing(tmp_path):
    archive = empty_members_zip(tmp_path / "lying.zip", 50)
    data = bytearray(archive.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)  # claims one member
    archive.write_bytes(bytes(data))
    limits = UploadLimits(10 * MB, 20 * MB, max_zip_members=10)
    with pytest.raises(BudgetExceededError, match="50 members"):
        take_upload(archive, tmp_path / "session", limits)


@pytest.mark.parametrize("member, expected", [
    ("a/b/c/d/e/f/g/h/i/slide.tiff", "10 folders deep, more than the 8 allowed"),
    ("inner.zip", "holds another archive"),
])
def test_deep_and_nested_zips_are_refused(tmp_path, slides, member, expected):
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(slides["tumor"], member)
    with pytest.raises(SlideError, match=expected):
        take_upload(archive, tmp_path / "session", UploadLimits(50 * MB, 100 * MB))
    assert folder_bytes(tmp_path / "session") == 0


def test_refused_zips_leave_nothing_however_often_they_come(make_engine, slides, tmp_path):
    session = make_engine().session("tab")
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.write(slides["tumor"], "a.tiff")
        zf.write(slides["stroma"], "b.tiff")
    for _ in range(3):
        with pytest.raises(SlideError, match="holds 2 slides"):
            session.load_upload(gradio_upload(session.uploads_root, two))
    assert leftovers(session) == [] and folder_bytes(session.folder) == 0


def test_the_session_disk_budget_counts_what_it_already_holds(tmp_path):
    session_dir = tmp_path / "session"
    (session_dir / "earlier").mkdir(parents=True)
    (session_dir / "earlier" / "slide.svs").write_bytes(b"\0" * MB)
    upload = tmp_path / "next.svs"
    upload.write_bytes(b"\0" * MB)
    limits = UploadLimits(max_bytes=2 * MB, max_session_bytes=int(1.5 * MB))
    with pytest.raises(BudgetExceededError, match=r"past its .* of disk \(--max-session-gb\)"):
        take_upload(upload, session_dir, limits)
    unpacks = tmp_path / "unpacks.zip"
    with zipfile.ZipFile(unpacks, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.svs", b"\0" * (MB // 2 + MB // 4))  # fits the upload limit, not the disk left
    with pytest.raises(BudgetExceededError, match="left of this session's"):
        take_upload(unpacks, session_dir, limits)
    assert sorted(p.name for p in session_dir.rglob("*") if p.is_file()) == ["slide.svs"]


def test_an_image_bomb_upload_is_refused_at_once_and_removed(make_engine, tmp_path):
    session = make_engine().session("tab")
    bomb = tiny_png_declaring(tmp_path / "bomb.png", 20_000, 20_000)
    started = time.perf_counter()
    with pytest.raises(BudgetExceededError) as info:
        session.load_upload(gradio_upload(session.uploads_root, bomb))
    assert time.perf_counter() - started < 2.0
    message = user_message(info.value, "loading the slide", session.upload_folders())
    assert message.startswith("bomb.png needs 20,000×20,000 = 400 megapixels") and "(--max-pixels)" in message
    assert leftovers(session) == []


def test_a_vms_reaching_into_another_folder_is_refused_without_naming_server_paths(make_engine, tmp_path):
    engine = make_engine()
    secret = engine.work_dir / "sessions" / "0-other" / "abc" / "theirs.jpg"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"\xff\xd8\xff another user's upload")
    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("case.vms", "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                                "ImageFile=../../../0-other/abc/theirs.jpg\nMapFile=../../../0-other/abc/theirs.jpg\n")
    session = engine.session("tab")
    with pytest.raises(OutsideReferenceError) as info:
        session.load_upload(gradio_upload(session.uploads_root, archive), mpp=0.5)
    message = user_message(info.value, "loading the slide", session.upload_folders())
    assert message.startswith("case.vms refers to a file outside its folder (ImageFile=../../../0-other/")
    assert str(tmp_path) not in message and str(engine.work_dir) not in message
    assert leftovers(session) == []


def test_a_slide_with_too_many_patches_is_refused_before_extraction(make_engine, slides, monkeypatch):
    engine = make_engine(max_patches_per_slide=5)
    session = engine.session("tab")
    monkeypatch.setattr(engine.extractor, "iter_features", lambda *a: pytest.fail("patches were read"))
    with pytest.raises(BudgetExceededError, match=r"more than the 5 allowed per slide \(--max-patches-per-slide\)"):
        session.load(slides["tumor"])
    assert session.view is None
    with engine.model_slot():  # the slot was given back
        pass


def test_two_uploads_at_once_in_one_session_cannot_both_pass_its_disk_budget(make_engine, slides, monkeypatch):
    """Taking an upload checks the session's disk and moves the file as one step: two at once are not both let in."""
    import shutil as shutil_module
    import threading

    from chatexaonepath.webapp import uploads as uploads_module
    from chatexaonepath.webapp.uploads import folder_bytes

    size = slides["tumor"].stat().st_size
    budget_gb = 1.5 * size / 1024**3  # one upload fits, two do not
    engine = make_engine(max_upload_gb=budget_gb, max_session_gb=budget_gb)
    session = engine.session("tab")
    arrived, real_move = threading.Barrier(2, timeout=2), shutil_module.move

    def move_once_both_checked(source, target):
        try:
            arrived.wait()  # without a lock both uploads have passed the budget check by now
        except threading.BrokenBarrierError:  # with it, the other waits for this one: go on alone
            pass
        return real_move(source, target)

    monkeypatch.setattr(uploads_module.shutil, "move", move_once_both_checked)
    copies = [gradio_upload(engine.work_dir, slides["tumor"], name=f"case-{i}.tiff") for i in range(2)]
    outcomes = []

    def load(path):
        try:
            session.load_upload(path)
            outcomes.append("loaded")
        except BudgetExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=load, args=(path,)) for path in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["loaded", "refused"]
    assert folder_bytes(session.folder) <= engine.config.max_session_bytes
