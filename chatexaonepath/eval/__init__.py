"""Seven-criteria LLM-judge evaluation (evaluation issue)."""
