#!/usr/bin/env bash
# GPU extraction benchmark, one script, at most 8 minutes on one H100/H200 with 16 cores:
#   1. builds (once, cached) a synthetic 40× Aperio-like JPEG slide: an 8192² block laid out 8 × 8
#      (65536² px at 0.25 µm/px, ~1 GB, ~10k tissue patches at 0.5 µm/px);
#   2. loader-only patches/s with the DCT and the OpenSlide decoder at 1, 4 and 15 workers;
#   3. encoder-only patches/s (ViT-B/16, fp32 and bf16) at batch 64 and 256;
#   4. end to end slide → .h5 patches/s (15 workers, batch 256, bf16, decoder auto → dct), peak GPU memory.
# Final line: `gpu_patches_per_s: X` (target ≥ 3,000 on one H100/H200).
#
#   bash bench/gpu_extract.sh                 # on the GPU host
#   BENCH_ON_CPU=1 bash bench/gpu_extract.sh  # the same steps, small and slow, on a CPU (a dry run)
#
# Overrides: PYTHON, ENCODER (default random-vit-b16: same FLOPs as EXAONEPath), ENCODER_WEIGHTS,
# BLOCK, REPEAT, WORKERS, BATCH_SIZES, BATCH, CACHE, TIME_LIMIT (seconds, default 480).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${BENCH_ON_CPU:-0}" == 1 ]]; then
  DEVICE=cpu
  : "${BLOCK:=2048}" "${REPEAT:=2}" "${WORKERS:=1 2}" "${BATCH_SIZES:=4 8}" "${BATCH:=8}"
  EXTRA=(--encoder-batches 1 --repeats 1 --loader-patches-per-worker 50)
else
  DEVICE=cuda
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA GPU visible to $PYTHON; run on a GPU host, or set BENCH_ON_CPU=1 for a dry run" >&2
    exit 2
  fi
  "$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")'
  : "${BLOCK:=8192}" "${REPEAT:=8}" "${WORKERS:=1 4 15}" "${BATCH_SIZES:=64 256}" "${BATCH:=256}"
  EXTRA=(--encoder-batches 3 --repeats 2 --loader-patches-per-worker 400)
fi
echo "cores: $(nproc); python: $PYTHON"

WORKER_ARGS=(${WORKERS})
LAST_WORKERS=${WORKER_ARGS[-1]}
ENCODER_ARGS=(--encoder "${ENCODER:-random-vit-b16}")
[[ -n "${ENCODER_WEIGHTS:-}" ]] && ENCODER_ARGS+=(--encoder-weights "$ENCODER_WEIGHTS")

timeout --signal=INT "${TIME_LIMIT:-480}" "$PYTHON" bench/extract.py \
  --layout aperio --block "$BLOCK" --repeat "$REPEAT" --device "$DEVICE" "${ENCODER_ARGS[@]}" \
  --decoders dct openslide --workers "${WORKER_ARGS[@]}" --encoder-batch-sizes ${BATCH_SIZES} \
  --batch-size "$BATCH" --num-workers "$LAST_WORKERS" --decoder auto \
  --cache "${CACHE:-${TMPDIR:-/tmp}/chatexaonepath-bench}" --gpu-report "${EXTRA[@]}"
