"""Deep-zoom tiles (webapp/tiles.py): what they show, what they cost to read, the cache, and who may see them."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.webapp import pyramid as pyramid_module
from chatexaonepath.webapp.tiles import (SlidePyramid, TileCache, TileForbidden, TileNotFound, TileRegistry,
                                         _dense_pyramid)


def decode(data: bytes) -> np.ndarray:
    assert data[:3] == b"\xff\xd8\xff"  # JPEG
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


class Owner:
    """A stand-in for a browser session (weak references to it must work)."""


def published(path, mpp=None, registry=None):
    registry = TileRegistry() if registry is None else registry
    owner = Owner()
    return registry, owner, registry.publish(owner, lambda: open_slide(path, mpp))


def level_image(path, mpp, downsample: int) -> np.ndarray:
    """The whole slide at `downsample`× by area averaging, from level 0 (the reference tiles must match)."""
    import cv2

    with open_slide(path, mpp) as slide:
        full = slide.read_level(0)
    w, h = -(-full.shape[1] // downsample), -(-full.shape[0] // downsample)
    return cv2.resize(full, (w, h), interpolation=cv2.INTER_AREA).astype(np.int16)


@pytest.mark.parametrize("name, mpp", [("tumor", None), ("png", 0.5)])
def test_tiles_show_the_slide_at_every_level(slides, name, mpp):
    _, _, tiles = published(slides[name], mpp)
    geometry = tiles.geometry()
    with open_slide(slides[name], mpp) as slide:
        width, height = slide.dimensions
        full = slide.read_region((0, 0), 0, (256, 256)).astype(np.int16)
    assert (geometry["width"], geometry["height"]) == (width, height)
    assert geometry["levels"] == int(np.ceil(np.log2(max(width, height)))) + 1  # the Deep Zoom convention
    top = geometry["levels"] - 1
    tile = decode(tiles.tile(top, 0, 0))
    assert tile.shape == (255, 255, 3)  # 254 + the overlap on its right and bottom edges
    assert np.abs(tile - full[:255, :255]).mean() < 6  # JPEG at quality 80
    for down in (2, 4):  # coarser levels: the slide shrunk, whatever the file's own pyramid looks like
        reference = level_image(slides[name], mpp, down)
        tile = decode(tiles.tile(top - int(np.log2(down)), 0, 0))
        h, w = min(tile.shape[0], reference.shape[0]), min(tile.shape[1], reference.shape[1])
        assert np.abs(tile[:h, :w] - reference[:h, :w]).mean() < 8, down


def test_pyramids_are_used_as_they_are_only_when_dense(slides):
    with open_slide(slides["tumor"]) as pyramid, open_slide(slides["png"], 0.5) as plain:
        assert _dense_pyramid(pyramid.handle) and not _dense_pyramid(plain.handle)


def test_a_flat_image_never_decodes_more_than_the_read_budget_per_tile(tmp_path, monkeypatch):
    from chatexaonepath.synthetic.slides import render_synthetic_image

    path = tmp_path / "flat.png"
    Image.fromarray(render_synthetic_image("tumor", (1200, 900), mpp=0.5, seed=3)).save(path)
    monkeypatch.setattr(pyramid_module, "READ_PIXELS", 300_000)  # so the coarse levels need the held ones
    monkeypatch.setattr(pyramid_module, "HELD_LEVEL_PIXELS", 100_000)
    slide = open_slide(path, 0.5)
    reads = []
    real = slide.read_region

    def counted(location, level, size):
        reads.append(size[0] * size[1])
        return real(location, level, size)

    slide.read_region = counted
    pyramid = SlidePyramid(slide)
    from openslide.deepzoom import DeepZoomGenerator

    generator = DeepZoomGenerator(pyramid, 254, 1)
    generator.get_tile(0, (0, 0))  # builds the held levels once, reading the slide in strips (read_at_downsample)
    assert len(pyramid._held) >= 1
    reads.clear()
    for level in range(generator.level_count):
        cols, rows = generator.level_tiles[level]
        for col in range(cols):
            for row in range(rows):
                tile = generator.get_tile(level, (col, row))
                assert tile.size == generator.get_tile_coordinates(level, (col, row))[2] or tile.size[0] <= 256
    assert reads and max(reads) <= 300_000  # no tile reads more than the budget from the file
    assert sum(a.size for a in pyramid._held.values()) // 3 <= 100_000 * 4 // 3 + 1
    slide.close()


def test_the_cache_serves_repeats_and_stays_within_its_bytes(slides):
    registry = TileRegistry(cache_bytes=200_000)
    _, _, tiles = published(slides["tumor"], registry=registry)
    top = tiles.geometry()["levels"] - 1
    first = tiles.tile(top, 0, 0)
    assert tiles.tile(top, 0, 0) is first and registry.cache.hits == 1
    for col in range(8):
        for row in range(8):
            tiles.tile(top, col, row)
    assert registry.cache.bytes <= 200_000 and 0 < len(registry.cache) < 64
    with pytest.raises(TileNotFound):
        tiles.tile(top, 9, 0)  # 2048 px = 9 tiles of 254: columns 0–8
    with pytest.raises(TileNotFound):
        tiles.tile(top + 1, 0, 0)


def test_lru_cache_drops_the_oldest_and_forgets_a_slide():
    cache = TileCache(max_bytes=10)
    cache.put(("a", 0, 0, 0), b"12345")
    cache.put(("b", 0, 0, 0), b"12345")
    cache.get(("a", 0, 0, 0))  # "a" is now the most recent
    cache.put(("b", 0, 0, 1), b"123")
    assert cache.get(("b", 0, 0, 0)) is None and cache.get(("a", 0, 0, 0)) == b"12345" and cache.bytes == 8
    cache.drop("a")
    assert cache.get(("a", 0, 0, 0)) is None and cache.bytes == 3


def test_only_the_right_key_finds_a_slide_and_only_while_it_is_published(slides):
    registry, owner, tiles = published(slides["tumor"])
    assert registry.find(tiles.token, tiles.key) is tiles
    with pytest.raises(TileForbidden):
        registry.find(tiles.token, "not-the-key")
    with pytest.raises(TileForbidden):
        registry.find(tiles.token, None)
    with pytest.raises(TileNotFound):
        registry.find("guessed-token", tiles.key)
    again = registry.publish(owner, lambda: open_slide(slides["stroma"]))  # the owner shows another slide
    assert again.token != tiles.token and again.key != tiles.key
    with pytest.raises(TileNotFound):
        registry.find(tiles.token, tiles.key)
    assert registry.published(owner) is again
    registry.revoke(owner)
    with pytest.raises(TileNotFound):
        registry.find(again.token, again.key)
    assert len(registry) == 0


def test_a_slide_whose_session_ended_is_not_served(slides):
    registry = TileRegistry()
    alive = threading.Event()
    alive.set()
    tiles = registry.publish(Owner(), lambda: open_slide(slides["tumor"]), alive=alive.is_set)
    assert registry.find(tiles.token, tiles.key) is tiles
    alive.clear()
    with pytest.raises(TileNotFound):
        registry.find(tiles.token, tiles.key)
    assert tiles.revoked and not tiles.is_open


def test_at_most_max_open_slides_stay_open_and_closed_ones_reopen(slides):
    registry = TileRegistry(max_open=2)
    published_tiles = [registry.publish(Owner(), lambda name=name: open_slide(slides[name]))
                       for name in ("tumor", "stroma", "normal_20x")]
    for tiles in published_tiles:
        registry.find(tiles.token, tiles.key).tile(8, 0, 0)
    assert registry.open_count == 2 and not published_tiles[0].is_open
    first = registry.find(published_tiles[0].token, published_tiles[0].key)
    assert decode(first.tile(9, 0, 0)).shape[2] == 3 and first.is_open  # reopened on demand
    assert registry.open_count == 2


def test_a_slide_closes_only_after_the_reads_in_flight(slides):
    _, _, tiles = published(slides["tumor"])

    def read_while_released(slide):
        tiles.release()  # the registry evicts it meanwhile
        assert tiles.is_open
        return slide.read_region((0, 0), 0, (16, 16)).shape

    assert tiles.with_slide(read_while_released) == (16, 16, 3)
    assert not tiles.is_open
    tiles.revoke()
    with pytest.raises(TileNotFound):
        tiles.tile(0, 0, 0)


def test_regions_are_full_resolution_when_small_and_shrunk_when_large(slides):
    _, _, tiles = published(slides["tumor"])
    with open_slide(slides["tumor"]) as slide:
        reference = slide.read_region((300, 500), 0, (400, 300)).astype(np.int16)
    exact = decode(tiles.region(300, 500, 400, 300, max_side=512))
    assert exact.shape == (300, 400, 3) and np.abs(exact - reference).mean() < 6
    thumbnail = decode(tiles.region(0, 0, 2048, 1024, max_side=160))
    assert max(thumbnail.shape[:2]) == 160 and thumbnail.shape[1] == 2 * thumbnail.shape[0]
    clipped = decode(tiles.region(1900, 1900, 500, 500, max_side=512))
    assert clipped.shape == (148, 148, 3)  # only the part inside the 2048² slide
    with pytest.raises(TileNotFound):
        tiles.region(5000, 5000, 10, 10, max_side=64)


def other_formats(root) -> dict:
    """An Aperio SVS, a Hamamatsu VMS (one JPEG: OpenSlide without a pyramid), a stripped TIFF and a JPEG."""
    import tifffile

    from chatexaonepath.synthetic.slides import make_synthetic_slide, render_synthetic_image
    from tests.vision_tower.test_slide import write_vms

    pixels = render_synthetic_image("tumor", (1024, 768), mpp=0.5, seed=8)
    Image.fromarray(pixels).save(root / "plain.jpg", quality=95)
    tifffile.imwrite(root / "flat.tif", pixels, rowsperstrip=16, compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    # Hamamatsu VMS image files are JPEGs with restart markers.
    Image.fromarray(pixels).save(root / "scan.jpg", quality=95, subsampling=0, restart_marker_rows=1)
    return {"svs": (make_synthetic_slide(root / "case.svs", "stroma", (2048, 1024), mpp=0.25, seed=4, aperio=True),
                    None, "aperio"),
            "vms": (write_vms(root / "case.vms", "scan.jpg"), 0.5, "hamamatsu"),
            "flat": (root / "flat.tif", None, "tiff"), "jpeg": (root / "plain.jpg", 0.5, "image")}


@pytest.mark.parametrize("name", ["svs", "vms", "flat", "jpeg"])
def test_every_format_the_app_opens_has_tiles(tmp_path, name):
    path, mpp, vendor = other_formats(tmp_path)[name]
    _, _, tiles = published(path, mpp)
    geometry = tiles.geometry()
    with open_slide(path, mpp) as slide:
        assert slide.vendor == vendor
        reference = slide.read_region((253, 0), 0, (256, 255)).astype(np.int16)  # 1 px of overlap each side
    top = geometry["levels"] - 1
    tile = decode(tiles.tile(top, 1, 0))  # the second tile of the full-resolution row: overlap on both sides
    assert tile.shape == (255, 256, 3) and np.abs(tile - reference).mean() < 10  # JPEG at quality 80
    assert decode(tiles.tile(0, 0, 0)).shape == (1, 1, 3) and decode(tiles.tile(top - 3, 0, 0)).shape[2] == 3
