"""One extraction job over many GPUs and nodes, on the launchers that already exist.

`torchrun` and `accelerate launch` start one process per GPU and describe it in the environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE). A `Shard` reads that description: each rank takes
a fixed share of the sorted slide list and its own GPU, and at the end the ranks meet once (a
gloo gather, no GPU collectives) so that rank 0 can report the whole job. Slide ownership is
decided by rank, so no lock has to be shared across hosts.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

# How long a rank that finished its share waits for the slowest one at the final gather.
JOB_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Shard:
    """This process's place in a launched job; the default is a job of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Shard":
        """The shard torchrun / accelerate launch describe in the environment (one process when unset)."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
            raw = environ.get(name)
            try:
                values[name] = default if raw in (None, "") else int(raw)
            except ValueError as e:
                raise ChatEXAONEPathError(f"The environment variable {name}={raw!r} is not an integer; "
                                          "start the job with torchrun or accelerate launch.") from e
        rank, world, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        local_world = values["LOCAL_WORLD_SIZE"] or 1  # torchrun sets it; other launchers may not
        if world < 1 or not 0 <= rank < world or local_rank < 0 or local_world < 1:
            raise ChatEXAONEPathError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank} do not describe "
                                      "a process of a job; start the job with torchrun or accelerate launch.")
        return cls(rank, world, local_rank, local_world)

    @property
    def distributed(self) -> bool:
        """True for a job of several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 saves the job's config and reports the merged summary."""
        return self.rank == 0

    def select(self, slides: list[Path]) -> list[Path]:
        """This rank's share: every world_size-th slide of the sorted list, starting at its rank."""
        if not self.distributed:
            return list(slides)
        return sorted(slides, key=str)[self.rank :: self.world_size]

    def place(self, config: Any) -> Any:
        """`config` (an ExtractConfig) with this rank's GPU and its share of the host's loader cores."""
        if not self.distributed:
            return config
        import torch

        from .extraction import default_num_workers, resolve_device

        changes = {}
        if config.device in ("auto", "cuda") and torch.cuda.is_available():
            changes["device"] = f"cuda:{self.local_rank % torch.cuda.device_count()}"
            # The DataLoader's pin-memory thread uses the current device: without this every rank
            # would also open a CUDA context on GPU 0.
            torch.cuda.set_device(changes["device"])
        if config.num_workers is None:
            device = resolve_device(changes.get("device", config.device))
            changes["num_workers"] = default_num_workers(device, processes=self.local_world_size)
        return replace(config, **changes)

    @contextmanager
    def process_group(self) -> Iterator[None]:
        """A gloo process group for the final gather, when this is a job of several processes."""
        if not self.distributed:
            yield
            return
        import torch.distributed as dist

        created = not dist.is_initialized()
        if created:
            try:
                dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=JOB_TIMEOUT)
            except (RuntimeError, ValueError) as e:
                raise ChatEXAONEPathError(f"Could not join the job's process group ({e}); launch every rank with "
                                          "torchrun or accelerate launch so MASTER_ADDR and MASTER_PORT are set.") from e
        try:
            yield
            if created:
                # A rank that tears gloo down while another still talks to it can abort at exit
                # ("terminate called without an active exception"): the job then fails after its work is
                # done. Only on success: after a failure the other ranks may never arrive.
                dist.barrier()
        finally:
            if created and dist.is_initialized():
                dist.destroy_process_group()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0 (in rank order), None on the others; waits for all ranks."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
