"""One rank of the two-process DDP test (launched by torchrun from test_ddp.py): phase 1 for one step.

Each rank writes `rank<N>.json` with a digest of its trainable weights before and after the step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatexaonepath.train.data import DataConfig
from chatexaonepath.train.phases import PhaseConfig, train_phase


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            h.update(name.encode())
            h.update(param.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class RecordWeights(TrainerCallback):
    def __init__(self, out: Path) -> None:
        self.out, self.record = out, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record.update(world_size=args.world_size, rank=args.process_index, before=digest(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record["after"] = digest(model)
        (self.out / f"rank{args.process_index}.json").write_text(json.dumps(self.record))


def main() -> None:
    data, features, llm, out = sys.argv[1:5]
    Path(out).mkdir(parents=True, exist_ok=True)
    config = PhaseConfig(phase=1, out=out, llm=llm, batch_size=2, gradient_accumulation=1, max_steps=1,
                         report_to="none", precision="fp32", learning_rate=1e-2, warmup_ratio=0.0)
    train_phase(config, DataConfig(data=[data], features_dir=features, val_fraction=0.0),
                callbacks=[RecordWeights(Path(out))])


if __name__ == "__main__":
    main()
