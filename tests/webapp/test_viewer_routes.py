"""The viewer's HTTP routes (webapp/viewer.py) over a real registry: what each serves, and to whom."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.webapp.tiles import TileRegistry
from chatexaonepath.webapp.viewer import COOKIE, THUMBNAIL_SIDE, library_installed, viewer_routes


class Owner:
    """Stands in for a browser session."""


@pytest.fixture
def served(slides):
    registry = TileRegistry()
    owner = Owner()
    tiles = registry.publish(owner, lambda: open_slide(slides["tumor"]))
    tiles.patch_coords, tiles.patch_side = np.array([[512, 512], [1024, 512]]), 512
    tiles.overlay = {"patch_side": 512, "x": [512, 1024], "y": [512, 512], "weight": [0.7, 0.3], "rank": [1, 2]}
    with TestClient(Starlette(routes=viewer_routes(registry))) as client:
        yield client, registry, owner, tiles
    registry.close()


def url(tiles, rest: str) -> str:
    return f"/viewer/s/{tiles.token}/{rest}"


def keyed(key: str) -> dict:
    """The cookie the page sets for a slide's URLs."""
    return {"cookie": f"{COOKIE}={key}"}


def image(response) -> Image.Image:
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    return Image.open(io.BytesIO(response.content))


def test_tiles_need_the_session_key_and_a_real_token(served):
    client, _, _, tiles = served
    tile = url(tiles, "tiles/11/0_0.jpeg")
    assert image(client.get(tile, headers=keyed(tiles.key))).size == (255, 255)
    assert "private" in client.get(tile, headers=keyed(tiles.key)).headers["cache-control"]
    assert client.get(tile).status_code == 403  # no key: another browser session
    assert client.get(tile, headers=keyed("someone-elses-key")).status_code == 403
    assert client.get(f"/viewer/s/guessed{tiles.token[7:]}/tiles/11/0_0.jpeg",
                      headers=keyed(tiles.key)).status_code == 404
    assert client.get(url(tiles, "tiles/11/99_0.jpeg"), headers=keyed(tiles.key)).status_code == 404
    assert client.get(url(tiles, "tiles/40/0_0.jpeg"), headers=keyed(tiles.key)).status_code == 404


def test_patches_regions_and_the_overlay_are_served_to_the_owner_only(served, slides):
    client, _, _, tiles = served
    key = keyed(tiles.key)
    patch = image(client.get(url(tiles, "patch/1.jpeg"), headers=key))
    with open_slide(slides["tumor"]) as slide:
        reference = slide.read_region((1024, 512), 0, (512, 512)).astype(np.int16)
    assert patch.size == (512, 512)  # full resolution
    assert np.abs(np.asarray(patch.convert("RGB")).astype(np.int16) - reference).mean() < 6
    assert client.get(url(tiles, "patch/2.jpeg"), headers=key).status_code == 404
    thumbnail = image(client.get(url(tiles, "region/0,0,2048,1024.jpeg"), headers=key))
    assert thumbnail.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)
    assert client.get(url(tiles, "region/0,0,0,10.jpeg"), headers=key).status_code == 404
    overlay = client.get(url(tiles, "overlay.json"), headers=key)
    assert overlay.status_code == 200 and overlay.json()["rank"] == [1, 2]
    for rest in ("patch/1.jpeg", "region/0,0,10,10.jpeg", "overlay.json"):
        assert client.get(url(tiles, rest)).status_code == 403


def test_a_slide_no_longer_shown_is_gone(served):
    client, registry, owner, tiles = served
    registry.revoke(owner)
    assert client.get(url(tiles, "tiles/11/0_0.jpeg"), headers=keyed(tiles.key)).status_code == 404


def test_the_viewer_and_its_library_are_served_by_the_app_itself(served):
    client = served[0]
    script = client.get("/viewer/static/viewer.js")
    assert script.status_code == 200 and "CXPViewer" in script.text
    assert client.get("/viewer/static/viewer.css").status_code == 200
    assert client.get("/viewer/static/../tiles.py").status_code == 404
    if not library_installed():
        pytest.skip("OpenSeadragon is not installed (make setup runs npm ci)")
    library = client.get("/viewer/static/vendor/openseadragon/openseadragon.min.js")
    assert library.status_code == 200 and "OpenSeadragon" in library.text[:5000]
    assert client.get("/viewer/static/vendor/openseadragon/LICENSE.txt").status_code == 200


def test_the_conversation_downloads_to_its_owner_only_and_is_never_cached(served):
    client, _, _, tiles = served
    tiles.config = {"name": "case 7.svs"}
    tiles.transcript = lambda: "# Conversation about case 7.svs\n"
    response = client.get(url(tiles, "conversation.md"), headers=keyed(tiles.key))
    assert response.status_code == 200 and response.text.startswith("# Conversation about case 7.svs")
    assert response.headers["content-type"].startswith("text/markdown")
    assert response.headers["cache-control"] == "no-store"  # it changes with every answer
    assert response.headers["content-disposition"] == 'attachment; filename="case_7-conversation.md"'
    assert client.get(url(tiles, "conversation.md")).status_code == 403
