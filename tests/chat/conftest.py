import pytest
import torch


def make_tiny_llm(folder):
    """A 2-layer, 64-wide random LLaMA with the embedded model's tokenizer, saved like a hub folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatexaonepath.llm import embedded_llm_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_llm_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llama"))
