import pytest

from chatexaonepath.chat.conversation import (
    IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, PromptBuilder, Turn, turns_from_llava,
)
from chatexaonepath.llm import embedded_llm_dir
from chatexaonepath.errors import ChatEXAONEPathError

CONVERSATION = [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is the diagnosis?"},
    {"from": "gpt", "value": "Invasive ductal carcinoma."},
    {"from": "human", "value": "What grade?"},
    {"from": "gpt", "value": "Grade 2."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_llm_dir())


def reply_spans(labels):
    """Contiguous runs of labelled (non-ignored) positions."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("style", ["llama2", "chat_template"])
def test_labels_cover_exactly_the_replies(tokenizer, style):
    builder = PromptBuilder(tokenizer, num_image_tokens=3, style=style)
    built = builder.build(turns_from_llava(CONVERSATION))
    assert len(built.input_ids) == len(built.labels)
    for i, label in enumerate(built.labels):  # labels are the ids themselves or ignored, token by token
        assert label in (IGNORE_INDEX, built.input_ids[i])
    spans = reply_spans(built.labels)
    assert len(spans) == 2
    replies = [tokenizer.decode(built.input_ids[a:b]) for a, b in spans]  # no image ids inside replies
    assert "Invasive ductal carcinoma." in replies[0] and "Grade 2." in replies[1]
    end = tokenizer.eos_token if style == "llama2" else "<|im_end|>"
    assert all(end in reply for reply in replies)  # the model learns to stop
    assert "diagnosis" not in "".join(replies) and "grade?" not in "".join(replies)
    # the image placeholder became exactly K image tokens, never labelled
    positions = [i for i, t in enumerate(built.input_ids) if t == IMAGE_TOKEN_INDEX]
    assert len(positions) == 3 and positions == list(range(positions[0], positions[0] + 3))
    assert all(built.labels[i] == IGNORE_INDEX for i in positions)


@pytest.mark.parametrize("style", ["llama2", "chat_template"])
def test_inference_prompt_is_the_training_prefix(tokenizer, style):
    """What the model sees at inference is exactly what it was trained on before each reply."""
    builder = PromptBuilder(tokenizer, style=style)
    turns = turns_from_llava(CONVERSATION)
    train = builder.build(turns)
    second_reply_start = reply_spans(train.labels)[1][0]
    infer = builder.build(turns[:3], add_generation_prompt=True)
    assert infer.input_ids == train.input_ids[:second_reply_start]
    assert infer.labels == train.labels[:second_reply_start]


def test_llama2_format_and_system_prompt(tokenizer):
    builder = PromptBuilder(tokenizer, style="llama2", system_prompt="Be brief.")
    text = tokenizer.decode(builder.build([Turn("user", "Hi")], add_generation_prompt=True).input_ids)  # no image
    assert "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]" in text


@pytest.mark.parametrize("bad", [
    [], [{"from": "gpt", "value": "x"}], [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "robot", "value": "x"}], [{"from": "human"}], "not a list",
])
def test_malformed_conversations_raise(bad):
    with pytest.raises(ChatEXAONEPathError):
        turns_from_llava(bad)


def test_training_conversation_must_end_with_a_reply(tokenizer):
    with pytest.raises(ChatEXAONEPathError, match="end with an assistant"):
        PromptBuilder(tokenizer, style="llama2").build([Turn("user", "Hi")])
