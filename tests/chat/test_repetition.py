"""The embedded LLM, asked about a slide, must not loop: the generation defaults guard against it.

Without them (repetition_penalty 1.0, no n-gram blocking) the untrained model's 256-token answer to
"Describe this slide." is one sentence repeated 19 times ("It is a complete-slide image of a tissue section.").
"""

from collections import Counter

import pytest
import torch

from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
from chatexaonepath.chat.session import (
    DEFAULT_NO_REPEAT_NGRAM_SIZE, DEFAULT_REPETITION_PENALTY, ChatSession, repetition_defaults,
)
from chatexaonepath.vision_tower.features import SlideFeatures


def most_repeated_ngram(ids: list[int], n: int = 8) -> int:
    """How often the most frequent n-gram of `ids` occurs."""
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


@pytest.fixture(scope="module")
def embedded_model():
    torch.manual_seed(0)
    return ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path="embedded")).eval()


def answer_ids(model, **guards) -> list[int]:
    session = ChatSession(model, max_new_tokens=256, **guards)
    torch.manual_seed(1)
    session.use_features(SlideFeatures(torch.randn(32, 768), torch.zeros(32, 2, dtype=torch.long)))
    text = session.ask("Describe this slide.").text
    return model.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_a_256_token_answer_of_the_embedded_llm_repeats_no_8gram_three_times(embedded_model):
    ids = answer_ids(embedded_model)
    assert most_repeated_ngram(ids) < 3, embedded_model.tokenizer.decode(ids)


def test_the_llms_own_generation_config_wins_over_the_defaults():
    class Generation:
        repetition_penalty, no_repeat_ngram_size = 1.3, 4

    class LLM:
        generation_config = Generation()

    assert repetition_defaults(LLM()) == (1.3, 4)
    Generation.repetition_penalty, Generation.no_repeat_ngram_size = 1.0, 0  # transformers' "unset" values
    assert repetition_defaults(LLM()) == (DEFAULT_REPETITION_PENALTY, DEFAULT_NO_REPEAT_NGRAM_SIZE)
    assert repetition_defaults(object()) == (DEFAULT_REPETITION_PENALTY, DEFAULT_NO_REPEAT_NGRAM_SIZE)
