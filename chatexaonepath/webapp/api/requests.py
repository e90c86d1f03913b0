"""A chat completion request in OpenAI's shape → the slide, the conversation, the question and its settings.

What is read, and checked before any work starts (each mistake one sentence, `param` naming the field):
- `messages`: system/developer messages (the system prompt; the model's own when there is none), then
  user and assistant turns ending with a user message; consecutive messages of one role are joined.
  Content is a string or a list of parts: `text`; `file` (`{"type": "file", "file": {"file_id": …}}`,
  as OpenAI's SDK sends an uploaded file); `slide` (`{"type": "slide", "slide": {"file_id": …,
  "region": [x, y, w, h]}}`, our own, for a level-0 region). The files the messages name are the
  conversation's slides: one, or a case of several (in order of first appearance, at most the server's
  `max_case_slides`), each labelled to the model as the page labels a case's slides. A user message's
  region is what that message asks about, on the slide its part names; one without a region asks about
  the whole slide (or case).
- `max_tokens` / `max_completion_tokens`, `temperature`, `stop` (up to 4), `seed`, `stream`,
  `stream_options.include_usage`: honoured within the server's limits.
- `n` (1), `top_p` (1), `frequency_penalty` / `presence_penalty` (0), `logprobs` (false), `user`,
  `store`, `metadata`, `response_format` (text), `tool_choice` (none), `tools` (empty),
  `parallel_tool_calls`: accepted only at values that change nothing, so no client is silently given
  something other than it asked for; any other field is refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...chat.conversation import Turn
from ...chat.regions import Region, SlideTurn
from ...errors import ChatEXAONEPathError
from ..config import AppConfig, GenerationSettings
from .errors import bad_request

MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_REGION_VALUE = 2**31  # level-0 pixels: far past any slide, small enough for every sum
HONOURED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "stream",
            "stream_options"}
# Fields accepted only at the value that changes nothing.
NEUTRAL = {"n": 1, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "store": False,
           "tool_choice": "none", "tools": [], "response_format": {"type": "text"}}
IGNORED = {"user", "metadata", "parallel_tool_calls"}  # about the caller, not the answer


@dataclass
class ChatRequest:
    """One chat completion request, checked: what to ask about which slide (or case), with what settings."""

    model: str
    file_ids: list[str]  # the slides, in order of first appearance: one, or a case
    question: str
    region: Region | None
    history: list[SlideTurn]  # each turn's region and the slide (index into file_ids) it belongs to
    settings: GenerationSettings
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    slide: int = 0  # the slide (index into file_ids) the question's region belongs to

    @property
    def file_id(self) -> str:
        """The conversation's first slide: the one slide, or the case's first (its session holds the conversation)."""
        return self.file_ids[0]


def parse_chat_request(body: object, config: AppConfig, default_system_prompt: str | None) -> ChatRequest:
    """Check a decoded JSON body against the API's rules and the server's limits (see the module's docstring)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object with 'model' and 'messages'.")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name the served model (GET /v1/models lists it).", param="model")
    system, turns, file_ids, regions = _conversation(body.get("messages"), config)
    question = turns[-1].content
    history = []
    for i, turn in enumerate(turns[:-1]):
        index, scope = _scope(regions, i)
        history.append(SlideTurn(turn.role, turn.content, scope, slide=index))
    slide, region = _scope(regions, len(turns) - 1)
    settings = _settings(body, config, system if system is not None else default_system_prompt)
    stream = _boolean(body.get("stream", False), "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad_request("'stream_options' takes only include_usage.", param="stream_options")
    return ChatRequest(model, file_ids, question, region, history, settings, _stops(body.get("stop")), stream,
                       _boolean(options.get("include_usage", False), "include_usage"), slide)


def _scope(regions: dict[int, tuple[int, Region]], turn: int) -> tuple[int, Region | None]:
    """(the slide's index, its region) a turn asks about; (0, None): the whole slide or case."""
    return regions.get(turn, (0, None))


def _check_fields(body: dict) -> None:
    for name, value in body.items():
        if name in HONOURED or name in IGNORED:
            continue
        if name not in NEUTRAL:
            raise bad_request(f"This server does not support the field {name[:40]!r}; it takes model, messages, "
                              "max_tokens, temperature, stop, seed and stream.", "unsupported_parameter", name[:40])
        neutral = NEUTRAL[name]
        if value is not None and value != neutral:
            raise bad_request(f"This server supports {name} only at {neutral!r} (or left out), got {str(value)[:40]}.",
                              "unsupported_parameter", name)


def _conversation(messages: object,
                  config: AppConfig) -> tuple[str | None, list[Turn], list[str], dict[int, tuple[int, Region]]]:
    """(system prompt, user/assistant turns ending with a user's, the slides' file ids in order of first appearance,
    (slide index, region) by turn index)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > config.api_max_messages:
        raise bad_request(f"The conversation has {len(messages)} messages; this server takes up to "
                          f"{config.api_max_messages} (--api-max-messages).", "context_length_exceeded", "messages")
    system: list[str] = []
    turns: list[Turn] = []
    regions: dict[int, tuple[str, Region]] = {}
    file_ids: dict[str, None] = {}  # ordered: the case's slides in order of first appearance
    chars = 0
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{number}] must be an object with a 'role' and a 'content'.", param="messages")
        role = message["role"]
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"messages[{number}] has the role {role[:20]!r}; this server takes system, user and "
                              "assistant messages (no tools).", "unsupported_role", "messages")
        if message.get("tool_calls") or message.get("function_call") or message.get("audio"):
            raise bad_request(f"messages[{number}] carries tool calls or audio, which this server does not take.",
                              "unsupported_content", "messages")
        text, slides, region = _content(message.get("content"), number, role)
        chars += len(text)
        if chars > config.api_max_conversation_chars:
            raise bad_request(f"The conversation is over {config.api_max_conversation_chars:,} characters, the most "
                              "this server takes (--api-max-conversation-chars); start a new one.",
                              "context_length_exceeded", "messages")
        file_ids.update(dict.fromkeys(slides))
        if len(file_ids) > config.max_case_slides:  # before the rest is read: the count alone refuses it
            raise bad_request(f"The messages name more than {config.max_case_slides} different slides, the most this "
                              "server takes in one conversation (--max-case-slides).", "too_many_slides", "messages")
        if role in ("system", "developer"):
            system.append(text)
            continue
        if turns and turns[-1].role == role:  # OpenAI allows runs of one role; the prompt alternates
            if region is not None and turns[-1].role == "user" and len(turns) - 1 in regions:
                raise bad_request(f"messages[{number}] names a second region for one question; ask about one "
                                  "region at a time.", "invalid_region", "messages")
            turns[-1] = Turn(role, f"{turns[-1].content}\n\n{text}".strip())
        else:
            turns.append(Turn(role, text))
        if region is not None:
            regions[len(turns) - 1] = region
    if not turns or turns[-1].role != "user":
        raise bad_request("The last message must be the user's question.", param="messages")
    if turns[0].role != "user":  # an assistant opening: the slide rides on an empty first question
        turns.insert(0, Turn("user", ""))
        regions = {index + 1: region for index, region in regions.items()}
    if not turns[-1].content.strip():
        raise bad_request("The last user message has no text to answer.", param="messages")
    if not file_ids:
        raise bad_request("Refer to the slide (or the slides of a case) with a content part "
                          "{\"type\": \"file\", \"file\": {\"file_id\": …}} from POST /v1/files.",
                          "missing_slide", "messages")
    order = {file_id: index for index, file_id in enumerate(file_ids)}
    return ("\n\n".join(system) if system else None), turns, list(file_ids), \
        {turn: (order[file_id], region) for turn, (file_id, region) in regions.items()}


def _content(content: object, number: int, role: str) -> tuple[str, list[str], tuple[str, Region] | None]:
    """A message's text, the file ids its slide parts name (in order) and the one region it asks about, with the
    file id of the slide that region is on (if any)."""
    if isinstance(content, str):
        return content, [], None
    if content is None and role == "assistant":
        return "", [], None
    if not isinstance(content, list):
        raise bad_request(f"messages[{number}].content must be a string or a list of content parts.", param="messages")
    texts: list[str] = []
    file_ids: dict[str, None] = {}
    region: tuple[str, Region] | None = None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("file", "slide") and role == "user":
            file_id, part_region = _slide_part(part, kind, number)
            file_ids[file_id] = None
            if part_region is not None:
                if region is not None:
                    raise bad_request(f"messages[{number}] names a second region; a question asks about one region "
                                      "of one slide at a time.", "invalid_region", "messages")
                region = (file_id, part_region)
        else:
            raise bad_request(f"messages[{number}] has a content part of type {str(kind)[:24]!r}, which this server "
                              f"does not take{' from the ' + role if kind in ('file', 'slide') else ''}: it reads "
                              "text, and a slide uploaded with POST /v1/files as a file or slide part.",
                              "unsupported_content", "messages")
    return "\n".join(texts), list(file_ids), region


def _slide_part(part: dict, kind: str, number: int) -> tuple[str, Region | None]:
    inner = part.get(kind)
    if not isinstance(inner, dict) or not isinstance(inner.get("file_id"), str) or not inner["file_id"]:
        raise bad_request(f"messages[{number}]'s {kind} part needs {{\"file_id\": …}} of a slide uploaded with POST "
                          "/v1/files (inline file_data is not taken: slides are large).", "unsupported_content",
                          "messages")
    region = inner.get("region") if kind == "slide" else None
    return inner["file_id"], (None if region is None else _region(region, number))


def _region(value: object, number: int) -> Region:
    """[x, y, w, h] in level-0 pixels, whole numbers; anything else one sentence."""
    if (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < MAX_REGION_VALUE for v in value)):
        try:
            return Region(*value)
        except ChatEXAONEPathError as e:
            raise bad_request(f"messages[{number}]'s region: {e}", "invalid_region", "messages") from e
    raise bad_request(f"messages[{number}]'s region must be [x, y, width, height], four whole numbers of level-0 "
                      f"pixels, got {str(value)[:60]}.", "invalid_region", "messages")


def _number(value: object, name: str, low: float, high: float, whole: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and whole:
        ok = float(value).is_integer()
    if not ok or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise bad_request(f"'{name}' must be {kind} from {low:g} to {high:g}, got {str(value)[:40]}.", param=name)
    return value


def _boolean(value: object, name: str) -> bool:
    if value is None:  # OpenAI's clients may send null for "not set"
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false.", param=name)
    return value


def _settings(body: dict, config: AppConfig, system_prompt: str | None) -> GenerationSettings:
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad_request("Give max_tokens or max_completion_tokens, not both.", param="max_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    tokens = body.get(name)
    limit = config.max_new_tokens_limit
    if tokens is None:
        tokens = config.max_new_tokens
    elif not (isinstance(tokens, int) and not isinstance(tokens, bool) and 1 <= tokens <= limit):
        raise bad_request(f"'{name}' must be a whole number from 1 to {limit}, this server's limit "
                          f"(--max-new-tokens-limit), got {str(tokens)[:40]}.", param=name)
    temperature = body.get("temperature")
    temperature = config.temperature if temperature is None else _number(temperature, "temperature", 0, 2)
    seed = body.get("seed")
    seed = None if seed is None else int(_number(seed, "seed", 0, 2**63 - 1, whole=True))
    if system_prompt is not None and len(system_prompt) > config.max_system_prompt_chars:
        raise bad_request(f"The system messages have {len(system_prompt):,} characters; this server takes up to "
                          f"{config.max_system_prompt_chars:,} (--max-system-prompt-chars).", param="messages")
    return GenerationSettings(float(temperature), int(tokens), system_prompt, seed)


def _stops(value: object) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad_request(f"'stop' is a string or a list of up to {MAX_STOP} non-empty strings of up to "
                          f"{MAX_STOP_CHARS} characters.", param="stop")
    return stops
