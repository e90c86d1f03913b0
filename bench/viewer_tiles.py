"""Benchmark: how fast does the slide viewer get its tiles, and does asking about a region cost more than the whole slide?

(1) Tile latency over a scripted pan and zoom of a synthetic 40× slide (Aperio-like SVS, 0.25 µm/px,
    about 49k × 41k px): the app's own tile routes served by uvicorn on 127.0.0.1, requested over
    HTTP six at a time (what a browser does per host) with the session's key cookie. The script is
    what a 1280 × 800 viewer fetches: the overview, zooming in 2× at a time to full resolution, a pan
    across the tissue there, and zooming back out. It runs twice: cold (new tile cache, slide just
    opened) and warm (the same path again: the LRU serves it).
(2) Time to first token of a question about a drawn region versus the same question about the whole
    slide (embedded SmolLM2, random ViT-B/16 features of a smaller synthetic slide, greedy,
    alternating, median): a region's tokens come from the tower on its cached features only.
Targets on the 2-core dev machine: warm p95 ≤ 50 ms, cold p95 ≤ 200 ms, region/whole TTFT ≤ 1.2.
Final line: `tile_p95_ms: X` (warm).

    python bench/viewer_tiles.py [--repeats 5] [--new-tokens 16] [--skip-ttft]
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.vision_tower.slide import open_slide
from chatexaonepath.synthetic.slides import make_synthetic_slide
from chatexaonepath.webapp.tiles import TILE_SIZE, TileRegistry
from chatexaonepath.webapp.viewer import COOKIE, viewer_routes

VIEW = (1280, 800)  # the viewer's size on screen
PARALLEL = 6  # a browser's connections per host
QUESTION = "What is the most likely diagnosis, and which features support it?"


class Owner:
    """Stands in for the browser session that published the slide."""


def visible_tiles(levels: int, size: tuple[int, int], centre: tuple[float, float], scale: float) -> list[tuple]:
    """The deep-zoom tiles a `VIEW`-sized viewer needs at `scale` (screen px per level-0 px) around `centre`."""
    top = levels - 1
    level = max(0, min(top, top + math.ceil(math.log2(scale)) if scale < 1 else top))  # the first level ≥ screen
    down = 2 ** (top - level)
    width, height = math.ceil(size[0] / down), math.ceil(size[1] / down)
    half_w, half_h = VIEW[0] / scale / 2 / down, VIEW[1] / scale / 2 / down
    cx, cy = centre[0] / down, centre[1] / down
    cols = range(max(0, int((cx - half_w) // TILE_SIZE)), min(math.ceil(width / TILE_SIZE), int((cx + half_w) // TILE_SIZE) + 1))
    rows = range(max(0, int((cy - half_h) // TILE_SIZE)), min(math.ceil(height / TILE_SIZE), int((cy + half_h) // TILE_SIZE) + 1))
    return [(level, col, row) for row in rows for col in cols]


def scripted_path(levels: int, size: tuple[int, int]) -> list[list[tuple]]:
    """Viewports as tile lists: overview, zoom in 2× steps to 1:1 at the tissue, pan, zoom out."""
    fit = min(VIEW[0] / size[0], VIEW[1] / size[1])
    centre = (size[0] * 0.45, size[1] * 0.55)
    steps, scale = [], fit
    while scale < 1.0:
        steps.append((centre, scale))
        scale = min(1.0, scale * 2)
    for k in range(8):  # pan half a screen at a time at full resolution
        steps.append(((centre[0] + k * VIEW[0] / 2, centre[1] + (k % 3) * VIEW[1] / 3), 1.0))
    scale = 0.5
    while scale > fit:
        steps.append(((centre[0] + 4 * VIEW[0] / 2, centre[1]), scale))
        scale /= 2
    return [visible_tiles(levels, size, c, s) for c, s in steps]


def serve(registry: TileRegistry) -> tuple[str, object]:
    """The viewer's routes on 127.0.0.1 (a free port) in a thread; returns (base URL, server)."""
    import uvicorn
    from starlette.applications import Starlette

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=viewer_routes(registry)), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def run_path(base: str, tiles, path: list[list[tuple]]) -> list[float]:
    """Fetch every viewport's tiles (six at a time, the next viewport after the last tile); ms per tile."""
    import httpx

    latencies: list[float] = []
    with httpx.Client(cookies={COOKIE: tiles.key}, limits=httpx.Limits(max_connections=PARALLEL)) as client:
        def fetch(address) -> float:
            level, col, row = address
            started = time.perf_counter()
            response = client.get(f"{base}/viewer/s/{tiles.token}/tiles/{level}/{col}_{row}.jpeg")
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200 or response.headers["content-type"] != "image/jpeg":
                raise RuntimeError(f"tile {address}: HTTP {response.status_code}")
            return elapsed

        with ThreadPoolExecutor(PARALLEL) as pool:
            for viewport in path:
                latencies += list(pool.map(fetch, viewport))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def tile_benchmark(folder: Path) -> tuple[float, float]:
    """Cold and warm tile latency; prints the table, returns (cold p95, warm p95) in ms."""
    started = time.perf_counter()
    slide_path = make_synthetic_slide(folder / "slide40x.svs", "tumor", (4096, 4096), mpp=0.25, seed=3,
                                      aperio=True, repeat=(12, 10))
    with open_slide(slide_path) as slide:
        size, mpp = slide.dimensions, slide.mpp
    print(f"slide: {size[0]:,} × {size[1]:,} px at {mpp} µm/px (40×), made in {time.perf_counter() - started:.0f} s")
    registry = TileRegistry()
    owner = Owner()
    tiles = registry.publish(owner, lambda: open_slide(slide_path))
    base, server = serve(registry)
    levels = tiles.geometry()["levels"]
    path = scripted_path(levels, size)
    cold = run_path(base, tiles, path)
    warm = run_path(base, tiles, path)
    server.should_exit = True
    print(f"\n{'pass':<6}{'viewports':>10}{'tiles':>7}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for name, values in (("cold", cold), ("warm", warm)):
        print(f"{name:<6}{len(path):>10}{len(values):>7}{statistics.median(values):>9.1f}"
              f"{percentile(values, 95):>9.1f}{max(values):>9.1f}")
    print(f"cache: {len(registry.cache)} tiles, {registry.cache.bytes / 1e6:.1f} MB, {registry.cache.hits} hits")
    registry.close()
    return percentile(cold, 95), percentile(warm, 95)


def ttft_benchmark(folder: Path, repeats: int, new_tokens: int) -> float:
    """Median time to first token, region over whole slide; prints both."""
    import torch

    from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
    from chatexaonepath.chat.session import ChatSession
    from chatexaonepath.vision_tower.encoder import build_encoder
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor

    torch.manual_seed(0)
    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path="embedded"))
    encoder = build_encoder("random-vit-b16")
    config = ExtractConfig(encoder=encoder.name)
    session = ChatSession(model, config, features_dir=folder / "features", extractor=FeatureExtractor(config, encoder),
                          max_new_tokens=new_tokens)
    slide = make_synthetic_slide(folder / "ttft.tiff", "tumor", (6144, 6144), mpp=0.25, seed=7)
    loaded = session.load_slide(slide)
    width, height = int(loaded.features.attrs["level0_width"]), int(loaded.features.attrs["level0_height"])
    region = (width // 4, height // 4, width // 2, height // 2)
    whole, part, patches = [], [], 0
    session.ask(QUESTION)  # warm-up: the first generation pays one-off costs
    for _ in range(repeats):
        for scope, times in ((None, whole), (region, part)):
            session.reset()
            answer = session.ask(QUESTION, region=scope)
            times.append(answer.first_token_seconds)
            if scope is not None:
                patches = len(answer.coords)
    ratio = statistics.median(part) / statistics.median(whole)
    print(f"\nTTFT on {len(loaded.features)} patches, embedded LLM, median of {repeats}: whole slide "
          f"{statistics.median(whole) * 1000:.0f} ms, region of {patches} patches {statistics.median(part) * 1000:.0f} ms")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-ttft", action="store_true", help="Only the tile latency (no LLM).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as folder:
        cold, warm = tile_benchmark(Path(folder))
        ratio = None if args.skip_ttft else ttft_benchmark(Path(folder), args.repeats, args.new_tokens)
    print(f"\ntargets: warm p95 {warm:.1f} ≤ 50 ms {'ok' if warm <= 50 else 'MISSED'}; "
          f"cold p95 {cold:.1f} ≤ 200 ms {'ok' if cold <= 200 else 'MISSED'}"
          + ("" if ratio is None else f"; region/whole TTFT {ratio:.2f} ≤ 1.2 {'ok' if ratio <= 1.2 else 'MISSED'}"))
    print(f"cold_p95_ms: {cold:.1f}")
    if ratio is not None:
        print(f"region_ttft_ratio: {ratio:.2f}")
    print(f"tile_p95_ms: {warm:.1f}")


if __name__ == "__main__":
    main()
