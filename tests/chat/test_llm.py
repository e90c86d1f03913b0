import pytest
import torch

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.llm import choose_dtype, embedded_llm_dir, load_llm


@pytest.mark.slow
def test_embedded_llm_loads_offline_and_is_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = embedded_llm_dir()
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    model, tokenizer = load_llm("embedded")
    assert embedded_llm_dir() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    ids = tokenizer("The tissue shows", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 and tokenizer.pad_token is not None


def test_local_folder_loads_on_cpu(tiny_llm_dir):
    model, tokenizer = load_llm(str(tiny_llm_dir))
    assert model.dtype == choose_dtype("auto", torch.device("cpu")) and model.device.type == "cpu"
    assert not model.training
    assert load_llm(str(tiny_llm_dir), dtype="fp32")[0].dtype == torch.float32
    assert tokenizer.pad_token is not None


def test_missing_model_is_one_sentence_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ChatEXAONEPathError, match="Could not load the LLM"):
        load_llm(str(tmp_path / "no-such-model"))


def test_quantization_needs_cuda_and_dtype_is_checked(tiny_llm_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ChatEXAONEPathError, match="CUDA"):
            load_llm(str(tiny_llm_dir), quantization="4bit")
    with pytest.raises(ChatEXAONEPathError, match="llm-dtype"):
        choose_dtype("int3", torch.device("cpu"))
    assert choose_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
