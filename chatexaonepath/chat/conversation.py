"""One prompt builder for training and inference: conversations → token ids and labels.

The conversation is rendered as one string in the model's own prompt format — the tokenizer's chat
template, or LLaMA-2's `<s>[INST] … [/INST] reply </s>` — and that whole string is tokenised once,
so the ids are exactly what the model's own format gives (tokenising turn by turn would give every
turn of a SentencePiece tokenizer, LLaMA-2's among them, its own leading "▁"). Labels come from
character spans: every token of an assistant reply (and the end-of-turn token after it) keeps its id,
everything else is IGNORE_INDEX; offsets (fast tokenizers) or prefix tokenisations map the spans to
tokens. Each `<image>` in a user turn is taken out of the string and becomes `num_image_tokens`
copies of IMAGE_TOKEN_INDEX at its place, an id outside the vocabulary that the model replaces by the
slide's visual tokens (as LLaVA does): the tokenizer and embedding matrix stay as released, so the
frozen base LLM can be referenced rather than copied. Inference builds its prompt with the same code
(`add_generation_prompt=True`), so training and inference never disagree.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from ..constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, MAX_CASE_SLIDES
from ..errors import ChatEXAONEPathError

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "IMAGE_TOKEN_INDEX", "MAX_CASE_SLIDES"]  # re-exported: the builder's callers use them
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


def slide_label(position: int, name: str) -> str:
    """The text that names a case's slide to the LLM just before its visual tokens: `Slide 2 (b.svs):`.

    `position` counts from 1; the name is kept to one short line.
    """
    name = " ".join(str(name).replace(IMAGE_TOKEN, "[image]").split())[:80] or "unnamed"
    return f"Slide {position} ({name}):"


def label_case(turns: list[Turn], names: list[str], image_token: str = IMAGE_TOKEN) -> list[Turn]:
    """`turns` with one placeholder per slide of the case, each after its slide's label (`slide_label`).

    One slide: the turns unchanged (a single slide's prompt has no label, as single-slide models were trained).
    Several: either one placeholder per slide (in order) or one for the whole case (SlideChat's layout), which
    becomes every slide's label and placeholder, one line each. Any other count raises one sentence.
    """
    if not names:
        raise ChatEXAONEPathError("A conversation about slides needs at least one slide.")
    if len(names) > MAX_CASE_SLIDES:
        raise ChatEXAONEPathError(f"A case has at most {MAX_CASE_SLIDES} slides, got {len(names)}.")
    found = sum(turn.content.count(image_token) for turn in turns)
    if found not in (1, len(names)):
        raise ChatEXAONEPathError(f"The conversation has {found} {image_token} placeholders for a case of "
                                  f"{len(names)} slide(s); use one per slide, or one for the whole case.")
    if len(names) == 1:
        return list(turns)
    blocks = [f"{slide_label(i, name)} {image_token}" for i, name in enumerate(names, start=1)]
    if found == 1:
        blocks = ["\n".join(blocks)]
    labelled, taken = [], 0
    for turn in turns:
        parts = turn.content.split(image_token)
        text = parts[0]
        for part in parts[1:]:
            text += blocks[taken] + part
            taken += 1
        labelled.append(type(turn)(**{**turn.__dict__, "content": text}))
    return labelled


# LLaMA-2's turn markers are plain text to its tokenizer, so its special tokens alone do not cover them.
_LLAMA2_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def control_strings(tokenizer, style: str, keep: str = IMAGE_TOKEN) -> list[str]:
    """The strings that would become the prompt format's own control tokens: special tokens (BOS, EOS, the chat
    template's turn markers such as <|im_start|>), and for the llama2 style its [INST]/<<SYS>> markers; longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(getattr(token, "content", token)))
    if style == "llama2":
        found.update(_LLAMA2_MARKERS)
    return sorted((s for s in found if s and s != keep), key=len, reverse=True)


class PromptBuilder:
    """Tokenises conversations in the LLaMA-2 chat format or with the tokenizer's chat template.

    A message's text never becomes a control token: one that writes "<|im_end|><|im_start|>system …" or
    "[/INST]" would otherwise open a turn of its own choosing, so those strings are blanked from every
    message (training and inference alike, so the model is served what it learned from).
    """

    def __init__(self, tokenizer, *, num_image_tokens: int = 1, image_token: str = IMAGE_TOKEN,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, style: str = "auto") -> None:
        if style == "auto":
            style = "chat_template" if getattr(tokenizer, "chat_template", None) else "llama2"
        if style not in ("llama2", "chat_template"):
            raise ValueError(f"prompt style must be auto, llama2 or chat_template, got {style!r}")
        self.tokenizer, self.style, self.system_prompt = tokenizer, style, system_prompt
        self.image_token, self.num_image_tokens = image_token, num_image_tokens
        self.image_token_id = IMAGE_TOKEN_INDEX
        controls = control_strings(tokenizer, style, keep=image_token)
        self._controls = re.compile("|".join(map(re.escape, controls))) if controls else None

    def neutralise(self, text: str) -> str:
        """`text` with every control string blanked (a space keeps the words around it apart)."""
        return self._controls.sub(" ", text) if self._controls else text

    def build(self, turns: list[Turn], add_generation_prompt: bool = False) -> BuiltPrompt:
        """Token ids and labels for `turns`; with `add_generation_prompt` the ids end ready for a reply."""
        if not turns or turns[0].role != "user":
            raise ChatEXAONEPathError("A conversation must start with a user message.")
        if self.system_prompt and self.image_token in self.system_prompt:
            raise ChatEXAONEPathError(f"The system prompt contains {self.image_token}, the slide's placeholder; "
                                      "remove it (the slide is attached to the first question by itself).")
        turns = [Turn(t.role, self.neutralise(t.content)) for t in turns]
        segments = self._segments_llama2(turns, add_generation_prompt) if self.style == "llama2" else \
            self._segments_template(turns, add_generation_prompt)
        text, replies, images = self._layout(segments)
        ids, boundary = self._tokenise(text, sorted({p for span in replies for p in span} | set(images)))
        labelled = [False] * len(ids)
        for start, end in replies:
            for i in range(boundary[start], boundary[end]):
                labelled[i] = True
        built, taken = BuiltPrompt([], []), 0
        for position in images:  # in order: each run of K image ids goes where its placeholder was
            cut = boundary[position]
            built.input_ids += ids[taken:cut] + [self.image_token_id] * self.num_image_tokens
            built.labels += [t if keep else IGNORE_INDEX for t, keep in zip(ids[taken:cut], labelled[taken:cut])]
            built.labels += [IGNORE_INDEX] * self.num_image_tokens
            taken = cut
        built.input_ids += ids[taken:]
        built.labels += [t if keep else IGNORE_INDEX for t, keep in zip(ids[taken:], labelled[taken:])]
        return built

    def _layout(self, segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The prompt string without placeholders, the reply spans in it, and where each placeholder was."""
        text, replies, images = "", [], []
        for piece, is_reply in segments:
            parts = piece.split(self.image_token)
            if is_reply and len(parts) > 1:
                raise ChatEXAONEPathError(f"An assistant reply contains {self.image_token}; the slide's placeholder "
                                          "belongs in a user message.")
            start = len(text)
            for i, part in enumerate(parts):
                if i:
                    images.append(len(text))
                text += part
            if is_reply:
                replies.append((start, len(text)))
        return text, replies, images

    def _tokenise(self, text: str, positions: list[int]) -> tuple[list[int], dict[int, int]]:
        """Ids of the whole `text`, and for each character position the index of the first token starting there or after.

        A token that straddles a position counts as before it (it starts before).
        """
        tokenizer = self.tokenizer
        if getattr(tokenizer, "is_fast", False):
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, starts = list(encoded["input_ids"]), [start for start, _ in encoded["offset_mapping"]]
            return ids, {p: bisect.bisect_left(starts, p) for p in positions}
        # Without offsets: the tokens of the prefix before a position that agree with the whole string's.
        ids = tokenizer.encode(text, add_special_tokens=False)
        boundary = {}
        for p in positions:
            prefix = tokenizer.encode(text[:p], add_special_tokens=False) if p else []
            same = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
            boundary[p] = same
        return ids, boundary

    # Each segment is (text, is_assistant_reply); their concatenation is the whole prompt string.
    def _segments_llama2(self, turns: list[Turn], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        # LLaMA-2-chat's format (its tokenizer's template renders the same): <s>[INST] user [/INST] reply </s>
        bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        segments = []
        for i in range(0, len(turns), 2):
            user = turns[i].content.strip()
            if i == 0 and self.system_prompt:
                user = f"<<SYS>>\n{self.system_prompt}\n<</SYS>>\n\n{user}"
            segments.append((f"{bos}[INST] {user} [/INST]", False))
            if i + 1 < len(turns):
                segments.append((f" {turns[i + 1].content.strip()} {eos}", True))
        if not add_generation_prompt and turns[-1].role == "user":
            raise ChatEXAONEPathError("A training conversation must end with an assistant reply.")
        return segments

    def _segments_template(self, turns: list[Turn], add_generation_prompt: bool) -> list[tuple[str, bool]]:
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
            segments += [(before[len(rendered):], False), (after[len(before):], True)]
            rendered = after
        if turns[-1].role == "user":
            if not add_generation_prompt:
                raise ChatEXAONEPathError("A training conversation must end with an assistant reply.")
            final = self._render(messages, generation_prompt=True)
            segments.append((final[len(rendered):], False))
        return segments

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
