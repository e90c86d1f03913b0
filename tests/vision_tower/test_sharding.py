"""Sharded extraction under torchrun (two CPU processes, gloo): exactly once, merged report, resumable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.vision_tower.features import read_attrs
from chatexaonepath.vision_tower.sharding import Shard

WORKER = Path(__file__).with_name("extract_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    """Six tiny 40× slides, alternately Aperio-like SVS (DCT decoder) and generic TIFF."""
    from chatexaonepath.synthetic.slides import make_synthetic_slide

    root = tmp_path_factory.mktemp("cohort")
    return [make_synthetic_slide(root / f"s{i}.{'svs' if i % 2 else 'tiff'}", "tumor", (1024, 1024), mpp=0.25,
                                 seed=i, coverage=0.9, aperio=bool(i % 2)) for i in range(6)]


def torchrun(inputs: list[Path], out: Path, record: Path, **env: str) -> subprocess.CompletedProcess:
    record.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(record), "slide", "extract", *map(str, inputs),
               "--out", str(out), "--encoder", "tiny-vit-test", "--device", "cpu"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env}
    # The CLI reports on stderr (rich console); stdout stays free for data.
    return subprocess.run(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)


def extracted_by_rank(record: Path) -> dict[int, list[str]]:
    return {rank: [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
            if (record / f"rank{rank}.jsonl").exists() else [] for rank in (0, 1)}


def test_shards_are_the_sorted_list_dealt_by_rank():
    slides = [Path(f"/d/s{i}.svs") for i in (3, 0, 5, 1, 4, 2)]
    shards = [Shard(rank, 2).select(slides) for rank in (0, 1)]
    assert [p.stem for p in shards[0]] == ["s0", "s2", "s4"] and [p.stem for p in shards[1]] == ["s1", "s3", "s5"]
    assert Shard().select(slides) == slides  # one process keeps the caller's order
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert Shard.from_env(env) == Shard(1, 2, 1, 2) and Shard.from_env({}) == Shard()
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ChatEXAONEPathError):
            Shard.from_env(bad)


@pytest.mark.slow
def test_every_slide_is_extracted_once_and_rank0_reports_the_job(cohort, tmp_path):
    bad = tmp_path / "bad.svs"  # sorts first, so rank 0 owns it
    bad.write_text("not a slide\n" * 100)
    out = tmp_path / "out"
    done = torchrun([*cohort, bad], out, tmp_path / "run1")
    assert done.returncode == 1, done.stdout[-3000:]  # rank 0 fails the job for the failed slide
    assert done.stdout.count("extracted 6, skipped (already done) 0, locked by another process 0, failed 1") == 1
    ranks = extracted_by_rank(tmp_path / "run1")
    ids = sorted(p.stem for p in cohort)
    assert sorted(ranks[0] + ranks[1]) == ids and not set(ranks[0]) & set(ranks[1])
    assert {read_attrs(out / f"{i}.h5")["decoder"] for i in ids} == {"dct"}  # both layouts allow it at 2×
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["slide"] for e in errors] == [str(bad)] and not list(out.glob("errors.rank*.jsonl"))

    again = torchrun([*cohort, bad], out, tmp_path / "run2")
    assert "extracted 0, skipped (already done) 6, locked by another process 0, failed 1" in again.stdout
    assert extracted_by_rank(tmp_path / "run2") == {0: [], 1: []}
    assert len((out / "errors.jsonl").read_text().splitlines()) == 1  # merged, not duplicated


@pytest.mark.slow
def test_a_killed_rank_and_a_rerun_extract_only_the_missing_slides(cohort, tmp_path):
    out = tmp_path / "out"
    killed = torchrun(cohort, out, tmp_path / "run1", KILL_RANK="1", KILL_AT="2")
    assert killed.returncode != 0
    first = extracted_by_rank(tmp_path / "run1")
    assert first[1] == ["s1"]  # rank 1 finished one slide, then died on its second
    present = {p.stem for p in out.glob("*.h5")}
    assert present == set(first[0] + first[1]) and {"s3", "s5"}.isdisjoint(present)

    rerun = torchrun(cohort, out, tmp_path / "run2")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    second = extracted_by_rank(tmp_path / "run2")
    assert sorted(second[0] + second[1]) == sorted({p.stem for p in cohort} - present)
    missing = 6 - len(present)
    assert f"extracted {missing}, skipped (already done) {len(present)}, locked by another process 0, failed 0" in rerun.stdout
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.lock"))


class RankZeroOfTwo(Shard):
    """Rank 0 of a two-rank job whose other rank had nothing to do: no process group needed."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)

    def process_group(self):
        from contextlib import nullcontext

        return nullcontext()

    def gather(self, value):
        return [value, []]


def test_rank0_merges_leftover_rank_logs_and_clears_what_is_now_done(slides, tmp_path, extractor):
    from chatexaonepath.vision_tower.batch import extract_slides

    out = tmp_path / "out"
    out.mkdir()
    # A killed job of another size left rank 1's log, with a failure of a slide rank 0 now owns.
    (out / "errors.rank1.jsonl").write_text(json.dumps({"slide": str(slides["tumor"]), "error": "old", "time": 1.0})
                                            + "\n" + json.dumps({"slide": "/gone/x.svs", "error": "bad", "time": 2.0})
                                            + "\n")
    summary = extract_slides([slides["tumor"]], out, extractor.config, extractor=extractor, shard=RankZeroOfTwo())
    assert summary.world_size == 2 and [r.status for r in summary.results] == ["extracted"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["slide"] for e in errors] == ["/gone/x.svs"] and not list(out.glob("errors.rank*.jsonl"))
