import pickle

import numpy as np
import pytest

from chatexaonepath.errors import MissingMppError, SlideError
from chatexaonepath.vision_tower.slide import find_slides, open_slide, slide_fingerprint


def test_opens_pyramidal_tiff_with_mpp_from_metadata(slides):
    with open_slide(slides["tumor"]) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == "metadata"
        assert slide.dimensions == (2048, 2048)
        assert slide.level_count >= 2
        assert slide.level_downsamples[1] == pytest.approx(4.0)
        region = slide.read_region((100, 200), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_missing_mpp_names_the_flag(slides):
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(slides["no_mpp"])


def test_mpp_override_is_used_and_recorded(slides):
    with open_slide(slides["no_mpp"], mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"
    with open_slide(slides["tumor"], mpp=0.26) as slide:
        assert slide.mpp == 0.26


def test_implausible_mpp_override_is_rejected(slides):
    with pytest.raises(SlideError, match="plausible"):
        open_slide(slides["tumor"], mpp=254.0)


def test_png_needs_mpp_and_then_reads(slides):
    with pytest.raises(MissingMppError):
        open_slide(slides["png"])
    with open_slide(slides["png"], mpp=0.5) as slide:
        assert slide.dimensions == (1024, 1024)
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["truncated", "text_as_svs"])
def test_broken_files_raise_one_sentence_slide_error(slides, name):
    with pytest.raises(SlideError) as info:
        with open_slide(slides[name]) as slide:  # a truncation past the header fails on read
            for y in range(0, slide.dimensions[1], 512):
                slide.read_region((0, y), 0, (slide.dimensions[0], 512))
    message = str(info.value)
    assert str(slides[name]) in message and "\n" not in message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    empty = tmp_path / "empty.ndpi"
    empty.touch()
    with pytest.raises(SlideError, match="empty"):
        open_slide(empty)


def test_slide_pickles_by_path_and_reopens(slides):
    with open_slide(slides["tumor"]) as slide:
        expected = slide.read_region((512, 512), 0, (32, 32))
        clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_region((512, 512), 0, (32, 32)), expected)
    clone.close()


def test_best_level_never_upsamples(slides):
    with open_slide(slides["tumor"]) as slide:  # levels at 1× and 4×
        assert slide.best_level_for_downsample(2.0) == 0
        assert slide.best_level_for_downsample(4.0) == 1
        assert slide.best_level_for_downsample(100.0) == slide.level_count - 1


def test_read_at_downsample_gives_requested_scale(slides):
    with open_slide(slides["tumor"]) as slide:
        image, downsample = slide.read_at_downsample(32)
    assert image.shape == (64, 64, 3) and downsample == pytest.approx(32)


def test_fingerprint_changes_with_content(tmp_path, slides):
    copy = tmp_path / "copy.tiff"
    copy.write_bytes(slides["tumor"].read_bytes())
    assert slide_fingerprint(copy) == slide_fingerprint(slides["tumor"])
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert slide_fingerprint(copy) != slide_fingerprint(slides["tumor"])


def test_fingerprint_covers_every_byte_not_samples(tmp_path):
    """A copy keeping the size and the first, middle and last MiB but rewriting the rest is another slide."""
    import hashlib

    data = np.random.default_rng(3).integers(0, 255, 6 << 20, np.uint8).tobytes()
    original, poisoned = tmp_path / "victim.tiff", tmp_path / "copy.tiff"
    original.write_bytes(data)
    changed = bytearray(data)
    changed[(3 << 19):(5 << 19)] = bytes(1 << 20)  # 1.5–2.5 MiB: between the head and the middle MiB
    poisoned.write_bytes(bytes(changed))
    assert slide_fingerprint(poisoned) != slide_fingerprint(original)
    assert slide_fingerprint(original) == "sha256:" + hashlib.sha256(data).hexdigest()  # as `sha256sum` says


def test_find_slides_expands_folders_and_rejects_missing(slides, tmp_path):
    found = find_slides([slides["tumor"].parent])
    assert slides["tumor"] in found and slides["png"] in found
    with pytest.raises(SlideError, match="not found"):
        find_slides([tmp_path / "missing"])
    with pytest.raises(SlideError, match="No slides"):
        find_slides([tmp_path])


def test_16_bit_images_are_rejected_not_clipped(tmp_path):
    from PIL import Image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(path)
    with pytest.raises(SlideError, match="8-bit RGB"):
        open_slide(path, mpp=0.5)


def test_greyscale_images_are_rejected_with_a_reason(tmp_path):
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(path)
    with pytest.raises(SlideError, match="greyscale"):
        open_slide(path, mpp=0.5)


def test_single_level_slides_are_read_in_strips(tmp_path, monkeypatch):
    """Without a pyramid, a thumbnail is assembled strip by strip and matches the one-piece read."""
    from chatexaonepath.vision_tower import slide as slide_module
    from chatexaonepath.synthetic.slides import make_synthetic_slide

    path = make_synthetic_slide(tmp_path / "flat.tiff", "stroma", (2048, 1536), mpp=0.5, seed=9, downsample=1000)
    with open_slide(path) as slide:
        assert slide.level_count == 1
        whole, ds_whole = slide.read_at_downsample(16)
        monkeypatch.setattr(slide_module, "STRIP_PIXELS", 2048 * 100)  # force ~16 strips
        strips, ds_strips = slide.read_at_downsample(16)
    assert strips.shape == whole.shape == (96, 128, 3) and ds_whole == ds_strips
    assert np.abs(strips.astype(int) - whole.astype(int)).mean() < 2.0


# -- hostile input: budgets checked before anything is decoded -------------------------------------------
def tiff_of_empty_strips(path, width, height, rows_per_strip, mpp=0.5):
    """A stripped RGB TIFF declaring `width` × `height` whose strips hold no bytes: ~8 bytes per strip on disk."""
    import struct

    strips = -(-height // rows_per_strip)
    ifd_size = 2 + 13 * 12 + 4
    data = bytearray()

    def blob(payload: bytes) -> bytes:  # an out-of-line tag value: its offset, as the tag's 4 bytes
        offset = 8 + ifd_size + len(data)
        data.extend(payload + b"\0" * (len(payload) % 2))
        return struct.pack("<I", offset)

    short, long_ = (lambda v: struct.pack("<HH", v, 0)), (lambda v: struct.pack("<I", v))
    empty = struct.pack(f"<{strips}I", *([0] * strips))
    resolution = blob(struct.pack("<2I", round(1e4 / mpp), 1))
    tags = [(256, 4, 1, long_(width)), (257, 4, 1, long_(height)), (258, 3, 3, blob(struct.pack("<3H", 8, 8, 8))),
            (259, 3, 1, short(1)), (262, 3, 1, short(2)), (273, 4, strips, blob(empty)), (277, 3, 1, short(3)),
            (278, 4, 1, long_(rows_per_strip)), (279, 4, strips, blob(empty)), (282, 5, 1, resolution),
            (283, 5, 1, resolution), (284, 3, 1, short(1)), (296, 3, 1, short(3))]  # 296: centimetres
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHI", *t[:3]) + t[3] for t in tags) + b"\0" * 4
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(data))
    return path


def test_a_tiny_tiff_declaring_a_huge_level_is_refused_before_reading(tmp_path):
    """10 kB of empty strips declaring 10,000 × 1,200,000 px: reading it whole would take a minute, refused at once."""
    import time

    from chatexaonepath.errors import BudgetExceededError

    attack = tiff_of_empty_strips(tmp_path / "huge.tif", 10_000, 1_200_000, 1_000)
    assert attack.stat().st_size < 12_000
    started = time.perf_counter()
    with pytest.raises(BudgetExceededError, match=r"12,000 megapixels at its smallest level.*--max-level-pixels"):
        open_slide(attack)
    assert time.perf_counter() - started < 1.0


def test_long_whole_level_reads_stop_at_their_checkpoint(tmp_path):
    """Reads of a whole level in strips call the slide's checkpoint before each strip; raising there stops them."""
    from chatexaonepath.vision_tower import slide as slide_module

    calls = []

    def checkpoint():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    path = tiff_of_empty_strips(tmp_path / "flat.tif", 4_000, 40_000, 500)  # 160 MP: ten 16-MP strips
    with open_slide(path) as slide:
        slide.checkpoint = checkpoint
        with pytest.raises(KeyboardInterrupt):
            slide.read_at_downsample(64)
    assert len(calls) == 3
    assert slide_module.STRIP_PIXELS * 3 < 4_000 * 40_000  # it stopped well before the end


def test_a_level_over_the_area_budget_is_read_from_a_coarser_one(slides):
    from chatexaonepath.vision_tower.slide import SlideLimits

    with open_slide(slides["tumor"], limits=SlideLimits(max_level_pixels=1_000_000)) as slide:  # level 0: 4.2 MP
        image, downsample = slide.read_at_downsample(2)
    assert image.shape == (1024, 1024, 3) and downsample == pytest.approx(2)


def png_declaring(path, width, height):
    """A few-hundred-byte PNG whose header declares `width` × `height` RGB pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\xff" * (3 * min(width, 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * 4))
                     + chunk(b"IEND", b""))
    return path


def jpeg_declaring(path, width, height):
    """A small JPEG whose frame header is rewritten to declare `width` × `height`."""
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 170)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("maker, suffix", [(png_declaring, ".png"), (jpeg_declaring, ".jpg")])
def test_an_image_bomb_is_refused_from_its_header(tmp_path, maker, suffix):
    import time

    from PIL import Image

    from chatexaonepath.errors import BudgetExceededError

    bomb = maker(tmp_path / f"bomb{suffix}", 60_000, 60_000)
    assert bomb.stat().st_size < 2_000
    pillow_limit = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with pytest.raises(BudgetExceededError) as info:
        open_slide(bomb, mpp=0.5)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert "3,600 megapixels" in message and "100 allowed (--max-pixels)" in message
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's own guard is never switched off


def test_a_plain_image_within_the_budget_reads_and_is_decoded_lazily(tmp_path):
    from PIL import Image

    from chatexaonepath.errors import BudgetExceededError
    from chatexaonepath.vision_tower.slide import SlideLimits

    pixels = np.random.default_rng(0).integers(0, 255, (1200, 1000, 3), np.uint8)
    path = tmp_path / "export.png"
    Image.fromarray(pixels).save(path)
    with pytest.raises(BudgetExceededError, match=r"1,000×1,200 = 1.2 megapixels decoded at once \(a PNG is decoded whole\), more than the 1 allowed"):
        open_slide(path, mpp=0.5, limits=SlideLimits(max_pixels=1_000_000))
    with open_slide(path, mpp=0.5) as slide:
        assert slide.handle._decoded is None  # opening read the header only
        np.testing.assert_array_equal(slide.read_region((990, 1190), 0, (20, 20))[:10, :10], pixels[1190:, 990:])
        assert (slide.read_region((990, 1190), 0, (20, 20))[10:] == 255).all()  # outside is white


def test_a_stripped_tiff_is_read_strip_by_strip(tmp_path):
    import tifffile

    from chatexaonepath.vision_tower import images

    pixels = np.random.default_rng(1).integers(0, 255, (3000, 2500, 3), np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, pixels, rowsperstrip=8, compression="zlib", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.dimensions == (2500, 3000) and slide.vendor == "tiff"
        for x, y in ((0, 0), (1234, 2001), (2400, 2950)):
            np.testing.assert_array_equal(slide.read_region((x, y), 0, (100, 50)), pixels[y:y + 50, x:x + 100])
        image, _ = slide.read_at_downsample(8)
        assert image.shape == (375, 312, 3)
        cached = sum(s.shape[0] * s.shape[1] for s in slide.handle._cache.values())
        assert cached <= images.SEGMENT_CACHE_PIXELS  # memory bounded by the cache, not by the image


def test_a_tiff_strip_or_tile_larger_than_the_budget_is_refused(tmp_path):
    import tifffile

    from chatexaonepath.errors import BudgetExceededError
    from chatexaonepath.vision_tower.slide import SlideLimits

    pixels = np.zeros((1200, 1000, 3), np.uint8)
    one_strip = tmp_path / "one_strip.tif"
    tifffile.imwrite(one_strip, pixels)  # the whole image in a single strip
    tiled = tmp_path / "big_tiles.tif"
    tifffile.imwrite(tiled, np.zeros((2048, 2048, 3), np.uint8), tile=(2048, 2048))  # OpenSlide's generic TIFF
    limits = SlideLimits(max_pixels=1_000_000)
    with pytest.raises(BudgetExceededError, match="one strip"):
        open_slide(one_strip, mpp=0.5, limits=limits)
    with pytest.raises(BudgetExceededError, match="2,048×2,048-pixel tiles"):
        open_slide(tiled, mpp=0.5, limits=limits)


def test_implausible_mpp_in_a_tag_counts_as_missing(tmp_path):
    import tifffile

    path = tmp_path / "coarse.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256),
                     resolution=(1e4 / 50, 1e4 / 50), resolutionunit="CENTIMETER")  # claims 50 µm/px
    with pytest.raises(MissingMppError):
        open_slide(path)
    with pytest.raises(SlideError, match="plausible"):
        open_slide(path, mpp=50.0)


# -- containment: files a slide names stay inside its folder ------------------------------------------------
def restartable_jpeg(path):
    """A JPEG with restart markers, as Hamamatsu VMS image files have."""
    from PIL import Image

    pixels = np.random.default_rng(2).integers(0, 255, (512, 512, 3), np.uint8)
    Image.fromarray(pixels).save(path, quality=90, subsampling=0, restart_marker_rows=1)
    return path


def write_vms(path, image_file):
    path.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                    f"ImageFile={image_file}\nMapFile={image_file}\n")
    return path


def test_a_vms_pointing_outside_its_folder_is_refused_before_openslide_reads(tmp_path):
    import openslide

    from chatexaonepath.errors import OutsideReferenceError

    upload, elsewhere = tmp_path / "sessions" / "abc", tmp_path / "private"
    upload.mkdir(parents=True)
    elsewhere.mkdir()
    restartable_jpeg(elsewhere / "secret.jpg")
    restartable_jpeg(upload / "own.jpg")
    with open_slide(write_vms(upload / "good.vms", "own.jpg"), mpp=0.5) as slide:
        assert slide.dimensions == (512, 512)
    hostile = write_vms(upload / "hostile.vms", "../../private/secret.jpg")
    with openslide.OpenSlide(str(hostile)) as raw:  # what OpenSlide alone does: it reads the outside file
        assert raw.dimensions == (512, 512)
    with pytest.raises(OutsideReferenceError, match=r"outside its folder \(ImageFile=../../private/secret.jpg\)"):
        open_slide(hostile, mpp=0.5)
    with pytest.raises(OutsideReferenceError):
        open_slide(write_vms(upload / "absolute.vms", str(elsewhere / "secret.jpg")), mpp=0.5)


def test_mirax_data_and_dicom_folders_must_stay_inside(tmp_path):
    from chatexaonepath.errors import OutsideReferenceError

    secret = tmp_path / "secret.dat"
    secret.write_bytes(b"private")
    case = tmp_path / "upload"
    (case / "slide").mkdir(parents=True)
    (case / "slide.mrxs").write_text("[GENERAL]\n")
    (case / "slide" / "Slidedat.ini").write_text("[DATAFILE]\nFILE_COUNT=1\nFILE_0=../../secret.dat\n")
    with pytest.raises(OutsideReferenceError, match="FILE_0"):
        open_slide(case / "slide.mrxs", mpp=0.5)
    (case / "slide" / "Slidedat.ini").write_text("[DATAFILE]\nFILE_COUNT=1\nFILE_0=Data0000.dat\n")
    (case / "slide" / "Data0000.dat").symlink_to(secret)
    with pytest.raises(OutsideReferenceError, match="Data0000.dat"):
        open_slide(case / "slide.mrxs", mpp=0.5)
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "level0.dcm").symlink_to(secret)
    with pytest.raises(OutsideReferenceError, match="level0.dcm"):
        open_slide(dicom, mpp=0.5)


# -- the patch budget -----------------------------------------------------------------------------------
def test_the_patch_count_is_checked_before_any_patch_is_read(slides):
    from chatexaonepath.errors import BudgetExceededError
    from chatexaonepath.vision_tower.patching import patch_grid
    from chatexaonepath.vision_tower.slide import SlideLimits
    from chatexaonepath.vision_tower.tissue import segment_tissue

    with open_slide(slides["tumor"], limits=SlideLimits(max_patches=5)) as slide:
        tissue = segment_tissue(slide)
        with pytest.raises(BudgetExceededError, match=r"about \d+ tissue patches .*more than the 5 allowed per slide \(--max-patches-per-slide\)"):
            patch_grid(slide, tissue)
        assert len(patch_grid(slide, tissue, max_patches=100)) == 12


def test_a_huge_declared_grid_is_refused_in_bounded_memory():
    """A slide claiming 2M × 2M pixels of tissue: refused after a few bands, never the 15M-cell grid."""
    import tracemalloc
    from types import SimpleNamespace

    from chatexaonepath.errors import BudgetExceededError
    from chatexaonepath.vision_tower.patching import patch_grid
    from chatexaonepath.vision_tower.slide import SlideLimits
    from chatexaonepath.vision_tower.tissue import TissueMask

    huge = SimpleNamespace(path="huge.tiff", slide_id="huge", mpp=0.25, dimensions=(2_000_000, 2_000_000),
                           level_downsamples=[1.0], limits=SlideLimits(),
                           best_level_for_downsample=lambda downsample: 0)
    tissue = TissueMask(mask=np.ones((500, 500), bool), downsample=4000.0, contours=[])
    tracemalloc.start()
    try:
        with pytest.raises(BudgetExceededError, match=r"about 15,2\d\d,\d{3} tissue patches at 0.5 µm/px, more than the 200,000 allowed"):
            patch_grid(huge, tissue)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150e6  # the whole grid would be 15M × 2 int64 coordinates and more


def test_patches_are_not_enlarged_from_a_far_coarser_scan(slides):
    from chatexaonepath.vision_tower.patching import patch_grid
    from chatexaonepath.vision_tower.tissue import segment_tissue

    with open_slide(slides["png"], mpp=4.0) as slide:  # 8× coarser than the patches' 0.5 µm/px
        with pytest.raises(SlideError, match="more than 4× coarser"):
            patch_grid(slide, segment_tissue(slide))
