import pytest
import torch

from chatexaonepath.chat.conversation import IGNORE_INDEX, IMAGE_TOKEN, PromptBuilder, turns_from_llava
from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM

K = 2


@pytest.fixture
def model(tiny_llm_dir):
    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), num_visual_tokens=K,
                                  aggregator={"in_dim": 32, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.0},
                                  projector={"num_heads": 4}, prompt_style="llama2")
    torch.manual_seed(0)
    return ChatEXAONEPathForCausalLM.build(config, dtype="fp32").eval()  # exact comparisons below


def encode(model, question="What is the diagnosis?", answer="Carcinoma."):
    builder = PromptBuilder(model.tokenizer, num_image_tokens=K, style="llama2", system_prompt="Be brief.")
    turns = turns_from_llava([{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}])
    built = builder.build(turns)
    return torch.tensor([built.input_ids]), torch.tensor([built.labels])


def with_trained_looking_lora(model) -> None:
    """Enable LoRA and give it non-zero B matrices, so the adapter actually changes the logits."""
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)


def lora_logits(model, patches: int):
    """Give the model a non-trivial adapter; return its inputs, slide features and logits."""
    with_trained_looking_lora(model)
    input_ids, _ = encode(model)
    features = [torch.randn(patches, 32)]
    with torch.no_grad():
        return input_ids, features, model(input_ids, slide_features=features).logits


def test_visual_tokens_land_exactly_on_the_placeholders(model):
    input_ids, labels = encode(model)
    features = [torch.randn(30, 32)]
    tokens = model.get_slide_tokens(features).visual_tokens
    embeds, merged_labels = model.merge_visual_tokens(input_ids, tokens, labels)
    positions = (input_ids[0] == model.config.image_token_index).nonzero().flatten()
    assert len(positions) == K
    torch.testing.assert_close(embeds[0, positions], tokens[0])
    text = (input_ids[0] != model.config.image_token_index).nonzero().flatten()
    torch.testing.assert_close(embeds[0, text], model.llm.get_input_embeddings()(input_ids[0, text]))
    assert (merged_labels[0, positions] == IGNORE_INDEX).all()
    assert torch.equal(merged_labels[0, text], labels[0, text])


def test_placeholder_count_mismatch_raises_with_both_numbers(model):
    input_ids, _ = encode(model)
    short = input_ids[:, input_ids[0] != model.config.image_token_index][:, :-1]  # no placeholders
    with pytest.raises(ValueError, match=r"\[0\].*1 slide\(s\) × 2 visual tokens"):
        model(short, slide_features=[torch.randn(5, 32)])
    with pytest.raises(ValueError, match="2 slide"):
        model(input_ids, slide_features=[torch.randn(5, 32), torch.randn(6, 32)])


def test_batch_of_slides_with_different_patch_counts(model):
    input_ids, labels = encode(model)
    batch_ids, batch_labels = input_ids.repeat(2, 1), labels.repeat(2, 1)
    features = [torch.randn(12, 32), torch.randn(40, 32)]
    out = model(batch_ids, slide_features=features, labels=batch_labels)
    assert torch.isfinite(out.loss) and out.patch_attention.shape == (2, 40)
    assert out.patch_mask.sum(1).tolist() == [12, 40]
    alone = model(input_ids, slide_features=features[:1])
    torch.testing.assert_close(out.logits[0], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_loss_only_counts_the_reply(model):
    input_ids, labels = encode(model)
    features = [torch.randn(10, 32)]
    out = model(input_ids, slide_features=features, labels=labels)
    logits = out.logits[0, :-1]
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def padded_pair(model):
    """Two samples with replies of different lengths, right-padded into one batch."""
    a, la = encode(model, answer="Carcinoma.")
    b, lb = encode(model, question="Which organ?", answer="Colon, with a lesion that reaches the margin.")
    width = max(a.shape[1], b.shape[1])
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    ids = torch.cat([pad(a, model.tokenizer.pad_token_id or 0), pad(b, model.tokenizer.pad_token_id or 0)])
    labels = torch.cat([pad(la, IGNORE_INDEX), pad(lb, IGNORE_INDEX)])
    mask = torch.cat([pad(torch.ones_like(a), 0), pad(torch.ones_like(b), 0)])
    return ids, labels, mask


@pytest.mark.parametrize("num_items", [None, 7])
def test_supervised_logits_only_gives_the_same_loss_and_gradients(model, num_items):
    # Training projects onto the vocabulary only where a reply is scored; the loss and what the tower
    # and LoRA learn from it must be exactly the full-logits path's.
    with_trained_looking_lora(model)
    model.train()
    ids, labels, mask = padded_pair(model)
    features = [torch.randn(12, 32), torch.randn(30, 32)]
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for only in (False, True):
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout masks in the tower
        out = model(ids, attention_mask=mask, slide_features=features, labels=labels, use_cache=False,
                    supervised_logits_only=only, **extra)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.logits.shape, grads))
    (full_loss, full_shape, full_grads), (loss, shape, grads) = results
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)
    assert shape[1] < full_shape[1]  # fewer positions projected
    assert grads.keys() == full_grads.keys() and any("lora_" in n for n in grads) and any("tower" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-4)


def frozen_step(model, ids, labels, mask, features, use_prefix: bool):
    """One phase-1 style training step; returns the loss, the tower's gradients and the LLM calls' lengths."""
    if not use_prefix:
        model._prefix_cache_ok = False
    elif model._prefix_cache_ok is False:
        model._prefix_cache_ok = None  # checked again on first use
    lengths = []
    hook = model.llm.register_forward_pre_hook(lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]),
                                               with_kwargs=True)
    model.zero_grad()
    try:
        out = model(ids, attention_mask=mask, slide_features=features, labels=labels, use_cache=False,
                    supervised_logits_only=True)
        out.loss.backward()
    finally:
        hook.remove()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.tower.named_parameters()}, lengths


def test_a_frozen_llm_runs_the_shared_prompt_prefix_once_and_learns_the_same(model):
    # Phase 1: the LLM is frozen, so the system turn every sample starts with is computed once and
    # later steps run only what follows it; what the tower learns must not change.
    for p in model.llm.parameters():
        p.requires_grad_(False)
    model.train()
    ids, labels, mask = padded_pair(model)
    features = [torch.randn(12, 32), torch.randn(30, 32)]
    full_loss, full_grads, full_lengths = frozen_step(model, ids, labels, mask, features, use_prefix=False)
    assert full_lengths == [ids.shape[1]]
    loss, grads, first = frozen_step(model, ids, labels, mask, features, use_prefix=True)
    assert model._prefix_cache_ok is True  # checked against the full forward on first use
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-4)
    first_image = int((ids[0] == model.config.image_token_index).nonzero()[0])
    prefix, rest, check = first
    assert 8 <= prefix <= first_image and rest == ids.shape[1] - prefix and check == ids.shape[1]
    loss, _, later = frozen_step(model, ids, labels, mask, features, use_prefix=True)
    assert later == [rest] and len(model._prefix_cache) == 1  # later steps: only what follows the prefix
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)


def test_the_cached_prefix_follows_the_llms_weights(model):
    # A frozen LLM whose weights change in place (a merged adapter, a reload) must not be served an old prefix.
    for p in model.llm.parameters():
        p.requires_grad_(False)
    ids, labels, mask = padded_pair(model)
    features = [torch.randn(12, 32), torch.randn(30, 32)]
    frozen_step(model, ids, labels, mask, features, use_prefix=True)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.mul_(1.5)
    full_loss, _, _ = frozen_step(model, ids, labels, mask, features, use_prefix=False)
    model._prefix_cache_ok = True
    loss, _, lengths = frozen_step(model, ids, labels, mask, features, use_prefix=True)
    assert lengths[-1] < ids.shape[1]
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)


def test_a_trainable_llm_always_runs_the_whole_prompt(model):
    with_trained_looking_lora(model)
    ids, labels, mask = padded_pair(model)
    _, _, lengths = frozen_step(model, ids, labels, mask, [torch.randn(12, 32), torch.randn(30, 32)], use_prefix=True)
    assert lengths == [ids.shape[1]] and not model._prefix_cache and model._prefix_cache_ok is None


def test_an_llm_whose_cache_fails_trains_on_the_whole_prompt(model, monkeypatch, caplog):
    for p in model.llm.parameters():
        p.requires_grad_(False)
    ids, labels, mask = padded_pair(model)
    features = [torch.randn(12, 32), torch.randn(30, 32)]
    full_loss, _, _ = frozen_step(model, ids, labels, mask, features, use_prefix=False)
    model._cache_kwarg = "no_such_argument"  # an LLM that takes its cache some other way
    loss, _, lengths = frozen_step(model, ids, labels, mask, features, use_prefix=True)
    assert model._prefix_cache_ok is False and "whole prompt" in caplog.text
    assert lengths[-1] == ids.shape[1]
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)


def test_a_reloaded_adapter_still_projects_only_the_scored_positions(model, tmp_path):
    with_trained_looking_lora(model)
    reloaded = ChatEXAONEPathForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "ckpt"), dtype="fp32",
                                                         trainable=True)
    ids, labels, mask = padded_pair(reloaded)
    out = reloaded(ids, attention_mask=mask, slide_features=[torch.randn(5, 32)] * 2, labels=labels,
                   use_cache=False, supervised_logits_only=True)
    assert out.logits.shape[1] < ids.shape[1]


def test_save_and_load_roundtrip_with_lora_gives_identical_logits(model, tmp_path):
    input_ids, features, before = lora_logits(model, 25)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert (path / "adapter" / "adapter_config.json").exists() and (path / "tower.safetensors").exists()
    assert not list(path.glob("model*.safetensors"))  # the base LLM is referenced, not copied
    reloaded = ChatEXAONEPathForCausalLM.from_pretrained(path, dtype="fp32")
    with torch.no_grad():
        after = reloaded(input_ids, slide_features=features).logits
    assert torch.equal(before, after)
    reloaded.merge_lora()
    with torch.no_grad():
        merged = reloaded(input_ids, slide_features=features).logits
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)


def test_generate_returns_new_tokens(model):
    builder = PromptBuilder(model.tokenizer, num_image_tokens=K, style="llama2")
    prompt = builder.build(turns_from_llava([{"from": "human", "value": f"{IMAGE_TOKEN}\nDiagnosis?"}])[:1],
                           add_generation_prompt=True)
    ids = model.generate(torch.tensor([prompt.input_ids]), [torch.randn(8, 32)], max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 4)


def test_config_validates():
    with pytest.raises(ValueError):
        ChatEXAONEPathConfig(num_visual_tokens=0)
    with pytest.raises(ValueError, match="prompt_style"):
        ChatEXAONEPathConfig(prompt_style="vicuna")


def test_merged_export_is_self_contained_and_equal(model, tmp_path):
    input_ids, features, before = lora_logits(model, 9)
    model.merge_lora()
    path = model.save_pretrained(tmp_path / "export", save_llm=True)
    assert (path / "llm" / "config.json").exists() and not (path / "adapter").exists()
    reloaded = ChatEXAONEPathForCausalLM.from_pretrained(path, dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids, slide_features=features).logits, before, atol=1e-4, rtol=1e-4)


def test_merged_lora_cannot_be_saved_without_its_llm_and_export_needs_a_merge(model, tmp_path):
    with_trained_looking_lora(model)
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path / "a", save_llm=True)
    model.merge_lora()
    with pytest.raises(ValueError, match="save_llm=True"):
        model.save_pretrained(tmp_path / "b")


def test_reloaded_adapter_can_be_trained(model, tmp_path):
    with_trained_looking_lora(model)
    path = model.save_pretrained(tmp_path / "ckpt")
    frozen = ChatEXAONEPathForCausalLM.from_pretrained(path, dtype="fp32")
    trainable = ChatEXAONEPathForCausalLM.from_pretrained(path, dtype="fp32", trainable=True)
    count = lambda m: sum(p.requires_grad for n, p in m.llm.named_parameters() if "lora_" in n)  # noqa: E731
    assert count(frozen) == 0 and count(trainable) > 0


def test_prompt_style_is_decided_once_and_saved(tiny_llm_dir, tmp_path):
    config = ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm_dir), aggregator={"in_dim": 32, "hidden_dim": 16,
                                  "attention_dim": 8}, projector={"num_heads": 4})
    model = ChatEXAONEPathForCausalLM.build(config, dtype="fp32")
    assert model.config.prompt_style == "chat_template"  # the embedded tokenizer has a template
    reloaded = ChatEXAONEPathForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "c"), dtype="fp32")
    assert reloaded.config.prompt_style == "chat_template"


def test_text_only_samples_and_padding_guard(model):
    ids = torch.tensor([model.tokenizer.encode("Hello there")])
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.patch_attention is None
    input_ids, _ = encode(model)
    with pytest.raises(ValueError, match="no slide_features"):
        model(input_ids)
    mask = torch.ones_like(input_ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids, [torch.randn(4, 32)], attention_mask=mask, max_new_tokens=2)


def test_forward_returns_the_llms_own_cache_and_it_continues_decoding(model):
    """The LLM's cache field comes through under the installed transformers' name and is usable.

    transformers 5.24 renamed `past_key_values` to `cache` in every ModelOutput; a re-declared field broke
    `forward` (TypeError) on the day it was released.
    """
    input_ids, _ = encode(model)
    features = [torch.randn(9, 32)]
    llm_out = model.llm(input_ids=input_ids[:, -3:], use_cache=True)
    cache_names = [name for name in llm_out.keys() if name not in ("logits", "loss")]
    assert cache_names, "the LLM returned no cache"
    with torch.no_grad():
        full = model(input_ids, slide_features=features)
        prefix = model(input_ids[:, :-1], slide_features=features, use_cache=True)
        assert all(name in prefix for name in cache_names)
        cache = prefix[cache_names[0]]
        step = model.llm(input_ids=input_ids[:, -1:], **{cache_names[0]: cache})
    assert full.visual_tokens.shape[:2] == (1, K) and full.patch_attention.shape == (1, 9)
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], atol=1e-4, rtol=1e-4)


def test_generate_under_the_installed_transformers(model):
    input_ids, _ = encode(model)
    prompt = input_ids[:, :-3]
    features = [torch.randn(7, 32)]
    new = model.generate(prompt, features, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert new.shape == (1, 5) and new.dtype == torch.long
    again = model.generate(prompt, features, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(new, again)
    # Greedy decoding with the cache equals step-by-step argmax of full forwards without one.
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            logits = model(ids, slide_features=features).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(new[0], ids[0, prompt.shape[1]:])
