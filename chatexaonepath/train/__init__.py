"""Two-phase training: alignment with a frozen LLM, then LoRA instruction tuning (training issue)."""
