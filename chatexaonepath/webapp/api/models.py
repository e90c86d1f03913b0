"""`GET /v1/models`: the one model this server runs, with its model card — the page's model panel in JSON.

The card names every part (LLM, patch encoder, vision tower, LoRA), what the tower was trained on,
and carries the page's honesty banner as `warning` when any part is a demo, untrained or random,
so a harness that logs the model it evaluated logs that too.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..engine import AppEngine
from ..messages import redact_paths

logger = logging.getLogger(__name__)


def served_model_id(engine: AppEngine) -> str:
    """The id clients put in `model`: the demo, the checkpoint folder's name, or untrained."""
    if engine.demo is not None:
        return "chatexaonepath-demo"
    if engine.config.model:
        return f"chatexaonepath-{Path(engine.config.model).name}"
    return "chatexaonepath-untrained" if not engine.model.config.tower_trained else "chatexaonepath"


def trained_on(engine: AppEngine) -> str:
    """What the tower (and LoRA) learned from, in one line, as far as the checkpoint records it."""
    if engine.demo is not None:
        return engine.demo.describe()
    if not engine.model.config.tower_trained:
        return "nothing: the vision tower is untrained, so answers do not depend on the slide"
    try:
        run = json.loads((Path(engine.config.model) / "training_args.json").read_text())
        data = run.get("data") or {}
        return (f"phase {run.get('phase', '?')}: {data.get('train_records', '?')} conversations about "
                f"{data.get('train_slides', '?')} slides (data sha256 {str(data.get('data_sha256', '?'))[:12]}…)")
    except (OSError, ValueError, TypeError, AttributeError):
        return "not recorded in the checkpoint"


def model_object(engine: AppEngine, created: int | None = None) -> dict:
    """OpenAI's model object with `card` added."""
    card = engine.card
    llm = engine.model.llm.config
    return {
        "id": served_model_id(engine), "object": "model", "created": created or int(time.time()),
        "owned_by": "chatexaonepath",
        "card": {
            "description": "ChatEXAONEPath: answers questions about a whole-slide image uploaded with POST /v1/files "
                           "(not a medical device; nothing it says is diagnostic)",
            # the page shows these to its users; a remote key holder is not shown the server's folders
            "llm": redact_paths(card.llm), "patch_encoder": redact_paths(card.encoder),
            "vision_tower": redact_paths(card.tower), "lora": redact_paths(card.lora),
            "trained_on": trained_on(engine), "demo": card.is_demo, "warning": card.banner(),
            "warnings": [redact_paths(w) for w in card.warnings],
            "context_tokens": getattr(llm, "max_position_embeddings", None),
            "visual_tokens": engine.model.config.num_visual_tokens,
            "max_new_tokens": engine.config.max_new_tokens_limit,
        },
    }
