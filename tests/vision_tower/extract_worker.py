"""One rank of the sharded-extraction tests (launched by torchrun from test_sharding.py).

It registers a tiny random ViT as `tiny-vit-test` and runs the real `slide extract` command line,
so the test exercises what `torchrun -m chatexaonepath slide extract …` does, minus ViT-B's cost.
Each rank appends the slide ids it extracted to `<record>/rank<N>.jsonl`. With KILL_RANK=r and
KILL_AT=k, rank r kills itself (SIGKILL, no cleanup) as it starts encoding its k-th slide.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from chatexaonepath import cli
from chatexaonepath.vision_tower import extraction
from chatexaonepath.vision_tower.encoder import (PatchEncoder, ViTClassTokenEncoder, _state_sha256,
                                                  register_encoder, vit_b16_config)


@register_encoder("tiny-vit-test")
def _tiny(weights=None, seed=0) -> PatchEncoder:
    torch.manual_seed(seed)
    config = vit_b16_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = ViTClassTokenEncoder(config).eval().requires_grad_(False)
    return PatchEncoder("tiny-vit-test", model, 64, _state_sha256(model), f"random(seed={seed})")


def main() -> None:
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    kill_rank, kill_at = int(os.environ.get("KILL_RANK", -1)), int(os.environ.get("KILL_AT", 0))
    started = []
    extract = extraction.FeatureExtractor.extract

    def recording_extract(self, slide, out_dir, progress=None, prepared=None):
        started.append(slide.slide_id)
        if rank == kill_rank and len(started) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # what an OOM kill or a lost node does
        result = extract(self, slide, out_dir, progress, prepared)
        with open(record_dir / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(result.slide_id) + "\n")
        return result

    extraction.FeatureExtractor.extract = recording_extract
    sys.argv = ["chatexaonepath", *argv]
    cli.main()


if __name__ == "__main__":
    main()
