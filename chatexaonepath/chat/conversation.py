"""One prompt builder for training and inference: conversations → token ids and labels.

Labels are built turn by turn while tokenising: every assistant reply (and the end-of-turn token
after it) keeps its ids, everything else is IGNORE_INDEX. Inference builds its prompt with the
same code (`add_generation_prompt=True`), so the two can never disagree. Each `<image>` in a user
turn becomes `num_image_tokens` copies of IMAGE_TOKEN_INDEX, an id outside the vocabulary that the
model replaces by the slide's visual tokens (as LLaVA does): the tokenizer and the LLM's embedding
matrix stay exactly as released, so the frozen base LLM can be referenced rather than copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from ..errors import ChatEXAONEPathError

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "IMAGE_TOKEN_INDEX"]  # re-exported: the builder's callers use them
DEFAULT_SYSTEM_PROMPT = (
    "You are ChatEXAONEPath, an assistant for pathologists. You are shown a whole-slide image of an "
    "H&E-stained tissue section. Answer questions about it concisely in professional pathology language. "
    "If the image does not show something, say so; never invent measurements or patient details."
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Turn:
    """One message of a conversation."""

    role: str  # "user" or "assistant"
    content: str


@dataclass
class BuiltPrompt:
    """Token ids of a conversation and their labels (IGNORE_INDEX outside assistant replies)."""

    input_ids: list[int]
    labels: list[int] = field(default_factory=list)


def turns_from_llava(conversations: list[dict]) -> list[Turn]:
    """LLaVA `conversations` ([{"from": "human"|"gpt", "value": …}, …]) → turns, validated."""
    if not isinstance(conversations, list) or not conversations:
        raise ChatEXAONEPathError("A record's 'conversations' must be a non-empty list of {from, value} messages.")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or message.get("from") not in ROLES or not isinstance(message.get("value"), str):
            raise ChatEXAONEPathError(f"Message {i} of a conversation is not {{'from': 'human'|'gpt', 'value': str}}: "
                                      f"{str(message)[:80]}.")
        turns.append(Turn(ROLES[message["from"]], message["value"]))
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ChatEXAONEPathError(f"Message {i} is from the {turn.role}; conversations must alternate, user first.")
    return turns


class PromptBuilder:
    """Tokenises conversations in the LLaMA-2 chat format or with the tokenizer's chat template."""

    def __init__(self, tokenizer, *, num_image_tokens: int = 1, image_token: str = IMAGE_TOKEN,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, style: str = "auto") -> None:
        if style == "auto":
            style = "chat_template" if getattr(tokenizer, "chat_template", None) else "llama2"
        if style not in ("llama2", "chat_template"):
            raise ValueError(f"prompt style must be auto, llama2 or chat_template, got {style!r}")
        self.tokenizer, self.style, self.system_prompt = tokenizer, style, system_prompt
        self.image_token, self.num_image_tokens = image_token, num_image_tokens
        self.image_token_id = IMAGE_TOKEN_INDEX

    # -- tokenising text with image placeholders ---------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(self.image_token)):
            if i:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def build(self, turns: list[Turn], add_generation_prompt: bool = False) -> BuiltPrompt:
        """Token ids and labels for `turns`; with `add_generation_prompt` the ids end ready for a reply."""
        if not turns or turns[0].role != "user":
            raise ChatEXAONEPathError("A conversation must start with a user message.")
        segments = self._segments_llama2(turns, add_generation_prompt) if self.style == "llama2" else \
            self._segments_template(turns, add_generation_prompt)
        built = BuiltPrompt([], [])
        for text, is_reply, specials in segments:
            ids = specials[0] + self._encode(text) + specials[1]
            built.input_ids.extend(ids)
            built.labels.extend(ids if is_reply else [IGNORE_INDEX] * len(ids))
        return built

    # Each segment is (text, is_assistant_reply, (ids before, ids after)).
    def _segments_llama2(self, turns: list[Turn], add_generation_prompt: bool):
        bos, eos = [self.tokenizer.bos_token_id], [self.tokenizer.eos_token_id]
        segments = []
        for i in range(0, len(turns), 2):
            user = turns[i].content.strip()
            if i == 0 and self.system_prompt:
                user = f"<<SYS>>\n{self.system_prompt}\n<</SYS>>\n\n{user}"
            segments.append((f"[INST] {user} [/INST]", False, (bos, [])))
            if i + 1 < len(turns):
                segments.append((f" {turns[i + 1].content.strip()} ", True, ([], eos)))
        if not add_generation_prompt and turns[-1].role == "user":
            raise ChatEXAONEPathError("A training conversation must end with an assistant reply.")
        return segments

    def _segments_template(self, turns: list[Turn], add_generation_prompt: bool):
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        segments, rendered = [], ""
        for turn in turns:
            messages.append({"role": turn.role, "content": turn.content})
            if turn.role == "user":
                continue
            before = self._render(messages[:-1], generation_prompt=True)
            after = self._render(messages, generation_prompt=False)
            if not (before.startswith(rendered) and after.startswith(before)):
                raise ChatEXAONEPathError("The tokenizer's chat template does not render conversations "
                                          "incrementally; use the llama2 prompt style for this model.")
            segments += [(before[len(rendered):], False, ([], [])), (after[len(before):], True, ([], []))]
            rendered = after
        if turns[-1].role == "user":
            if not add_generation_prompt:
                raise ChatEXAONEPathError("A training conversation must end with an assistant reply.")
            final = self._render(messages, generation_prompt=True)
            segments.append((final[len(rendered):], False, ([], [])))
        return segments

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
