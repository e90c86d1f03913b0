import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_in_step_with_ddp(dataset_dir, tiny_llm, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(Path(__file__).with_name("ddp_worker.py")),
               str(dataset_dir / "captions.json"), str(dataset_dir / "features"), str(tiny_llm), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["before"] == ranks[1]["before"]  # same seed, same start
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]  # one step, all-reduced gradients
    assert (out / "config.json").is_file() and not (out / ".final.tmp").exists()  # rank 0 saved the final model
