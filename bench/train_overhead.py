"""Benchmark: what does the vision tower add to a phase-2 training step?

On the embedded LLM (SmolLM2-135M), one optimizer step (forward, backward, AdamW) of:
  (a) phase 2: ChatEXAONEPath with LoRA (r=64, α=16 on q, k, v, o) + trainable aggregator and
      projector, on batches built by the training collator (slide bags of --patches patches,
      conversations tokenised by the prompt builder, system prompt included);
  (b) a plain PEFT LoRA step of the bare LLM on the same token ids (the image placeholders
      replaced by an ordinary token), the same labels and the same LoRA configuration.
Steps alternate (a, b); each repeat compares the fastest of its --steps steps on each side, and the
table shows medians over repeats (the machine may be shared: the fastest step is the least disturbed).
Final line: `phase2_step_overhead: (a)/(b)` (target ≤ 1.20).

    python bench/train_overhead.py [--repeats 5] [--steps 3] [--batch 4] [--patches 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import chatexaonepath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatexaonepath.chat.conversation import IMAGE_TOKEN_INDEX, PromptBuilder, turns_from_llava
from chatexaonepath.llm import load_llm
from chatexaonepath.chat.modeling import LORA_TARGETS, ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.train.data import SlideCollator
from chatexaonepath.train.phases import freeze_for_phase

ANSWERS = ["Invasive ductal carcinoma, grade 2.", "Benign fibrous stroma.", "Necrotic tumour with lymphoid infiltrate.",
           "Normal breast glands."]


def batch_items(builder: PromptBuilder, batch: int, patches: int, dim: int) -> list[dict]:
    """What the training dataset yields: token ids, labels and a feature bag per sample."""
    items = []
    for i in range(batch):
        turns = turns_from_llava([{"from": "human", "value": "<image>\nWhat is the diagnosis?"},
                                  {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}])
        built = builder.build(turns)
        items.append({"input_ids": built.input_ids, "labels": built.labels,
                      "slide_features": torch.randn(patches, dim).half()})
    return items


def timed(step) -> float:
    """Seconds one step takes."""
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per side in each repeat")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patches", type=int, default=1024, help="patches per slide (a --max-patches bag)")
    parser.add_argument("--llm", default="embedded")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=args.llm, aggregator={"in_dim": 768}))
    model.enable_lora(64, 16, 0.05, LORA_TARGETS)
    freeze_for_phase(model, 2)
    model.train()
    builder = PromptBuilder(model.tokenizer, num_image_tokens=model.config.num_visual_tokens,
                            system_prompt=model.config.system_prompt, style=model.config.prompt_style)
    batch = SlideCollator(model.tokenizer.pad_token_id)(batch_items(builder, args.batch, args.patches, 768))

    from peft import LoraConfig, get_peft_model

    bare, _ = load_llm(args.llm)
    bare = get_peft_model(bare, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
                                           task_type="CAUSAL_LM"))
    bare.train()
    # Same length, same labels: the placeholders become an ordinary token (its label is ignored either way).
    text_ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, model.tokenizer.eos_token_id)

    mllm_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-5)

    # The Trainer autocasts to the LLM's half precision (phases.training_arguments); both steps do the same here.
    half = model.llm.dtype if model.llm.dtype in (torch.bfloat16, torch.float16) else None
    autocast = lambda: torch.autocast(model.device.type, dtype=half or torch.float32, enabled=half is not None)  # noqa: E731

    def mllm_step() -> None:
        with autocast():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        slide_features=batch["slide_features"], slide_mask=batch["slide_mask"], use_cache=False)
        out.loss.backward()
        mllm_opt.step()
        mllm_opt.zero_grad(set_to_none=True)

    def bare_step() -> None:
        with autocast():
            out = bare(input_ids=text_ids, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False)
        out.loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    mllm_step(), bare_step()  # warm-up: allocator, oneDNN kernels
    mllm_times, bare_times, ratios = [], [], []
    for _ in range(args.repeats):
        # Steps alternate within a repeat, and each side keeps its fastest: on a shared machine a burst of
        # load from elsewhere then lands on both sides or on neither.
        pairs = [(timed(mllm_step), timed(bare_step)) for _ in range(args.steps)]
        m, b = min(p[0] for p in pairs), min(p[1] for p in pairs)
        mllm_times.append(m)
        bare_times.append(b)
        ratios.append(m / b)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bare_trainable = sum(p.numel() for p in bare.parameters() if p.requires_grad)
    rows = [
        ("batch × tokens", f"{args.batch} × {batch['input_ids'].shape[1]}"),
        ("patches per slide", str(args.patches)),
        ("LLM dtype, autocast", f"{model.llm.dtype}, {half}"),
        ("trainable params: phase 2 / bare LoRA", f"{trainable:,} / {bare_trainable:,}"),
        ("step s: phase 2 (median)", f"{statistics.median(mllm_times):.3f}"),
        ("step s: bare LLM LoRA (median)", f"{statistics.median(bare_times):.3f}"),
        ("ratios per repeat", ", ".join(f"{r:.3f}" for r in ratios)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"phase2_step_overhead: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
