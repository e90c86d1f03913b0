"""The ChatEXAONEPath model: vision tower (CLAM aggregator + attention-pool projector) + a causal LLM.

Patch features of a slide become K visual tokens; each run of K image placeholders in the prompt
is replaced by them in `inputs_embeds` (LLaVA-style), after checking that the counts match.
A checkpoint holds the config, the tower weights and the LoRA adapter; the base LLM is referenced
by id or path, never copied.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from ..vision_tower.aggregator import AggregatorConfig, AggregatorOutput, GatedAttentionAggregator, pad_bags
from ..vision_tower.projector import AttentionPoolProjector, ProjectorConfig, ProjectorOutput
from .conversation import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from .typicality import Typicality

logger = logging.getLogger(__name__)

TOWER_WEIGHTS = "tower.safetensors"
ADAPTER_DIR = "adapter"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ChatEXAONEPathConfig(PretrainedConfig):
    """Everything needed to rebuild the model: tower sizes, the base LLM, visual tokens, prompt, features.

    `system_prompt` is the one the model was trained with (None: none, so the chat template's own default,
    if any, applies), which chat and evaluation use too. `feature_provenance` says how the training
    features were made (chat/provenance.py); None when unknown.
    """

    model_type = "chatexaonepath"

    def __init__(self, llm_name_or_path: str = "meta-llama/Llama-2-7b-chat-hf", llm_hidden_size: int | None = None,
                 aggregator: dict | None = None, projector: dict | None = None, num_visual_tokens: int = 1,
                 image_token: str = IMAGE_TOKEN, image_token_index: int = IMAGE_TOKEN_INDEX,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, prompt_style: str = "auto",
                 lora: dict | None = None, tower_trained: bool = False, feature_provenance: dict | None = None,
                 **kwargs) -> None:
        self.llm_name_or_path = llm_name_or_path
        self.llm_hidden_size = llm_hidden_size
        self.aggregator = AggregatorConfig(**(aggregator or {})).to_dict()
        projector = dict(projector or {})
        projector.update(in_dim=self.aggregator["hidden_dim"], num_tokens=num_visual_tokens)
        if llm_hidden_size is not None:
            projector["out_dim"] = llm_hidden_size
        self.projector = ProjectorConfig(**projector).to_dict()  # validates num_tokens, heads
        self.num_visual_tokens = num_visual_tokens
        self.image_token, self.image_token_index = image_token, image_token_index
        self.system_prompt, self.prompt_style = system_prompt, prompt_style
        self.lora = lora  # {"r", "alpha", "dropout", "target_modules"} once LoRA is enabled
        self.tower_trained = tower_trained
        self.feature_provenance = dict(feature_provenance) if feature_provenance else None
        if prompt_style not in ("auto", "llama2", "chat_template"):
            raise ValueError(f"prompt_style must be auto, llama2 or chat_template, got {prompt_style!r}")
        if image_token_index >= 0:
            raise ValueError(f"image_token_index must be negative (outside the vocabulary), got {image_token_index}")
        super().__init__(**kwargs)


@dataclass
class ChatEXAONEPathOutput(ModelOutput):
    """Loss and logits of the LLM, plus what the tower computed (attention is the explanation).

    The LLM's other output fields (its KV cache, hidden states, attentions) are copied in under the names the
    installed transformers gives them (`past_key_values` before 5.24, `cache` since), never re-declared here:
    a renamed field in a new release must not break this class.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None  # (B, K, d_llm)
    pooling_weights: torch.Tensor | None = None  # (B, N_max) what the tokens were pooled with: the heatmap
    patch_attention: torch.Tensor | None = None  # (B, N_max) CLAM's softmax(a) over each slide's patches
    patch_mask: torch.Tensor | None = None  # (B, N_max)


@dataclass
class SlideTokens:
    """What the tower makes of a batch of slides: the visual tokens and the per-patch weights behind them."""

    visual_tokens: torch.Tensor  # (B, K, d_llm)
    pooling_weights: torch.Tensor  # (B, N) softmax(q·k/√d + a), mean over queries and heads; 0 at padding
    aggregated: AggregatorOutput  # CLAM's part: `attention` is softmax(a), a second view of the slide

    @property
    def clam_attention(self) -> torch.Tensor:
        """(B, N) CLAM's gated attention softmax(a): what the tokens were pooled with only before training."""
        return self.aggregated.attention


@contextlib.contextmanager
def quiet_peft_deprecation() -> Iterator[None]:
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning
    meant for PEFT's developers that users would see at every start. Only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class SlideEncoder(nn.Module):
    """Patch features → visual tokens, with the pooling weights and CLAM's attention (`SlideTokens`)."""

    def __init__(self, config: ChatEXAONEPathConfig) -> None:
        super().__init__()
        in_dim = config.aggregator["in_dim"]
        # Per-dimension standardisation of the patch features, set from the training data when phase 1 starts
        # (identity until then). Encoder features share a large common offset; unscaled, it swamps the small
        # differences between tissues and the tower learns them far more slowly (docs/training.md).
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.aggregator = GatedAttentionAggregator(AggregatorConfig(**config.aggregator))
        self.projector = AttentionPoolProjector(ProjectorConfig(**config.projector))

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise patch features with these per-dimension statistics (of the training bags)."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature statistics of shape {tuple(mean.shape)} do not fit {tuple(self.feature_mean.shape)}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(self, slide_features: list[torch.Tensor] | torch.Tensor,
                mask: torch.Tensor | None = None) -> SlideTokens:
        if isinstance(slide_features, (list, tuple)):
            slide_features, mask = pad_bags(list(slide_features))
        slide_features = (slide_features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        aggregated = self.aggregator(slide_features, mask)
        projected: ProjectorOutput = self.projector(aggregated.patch_embeddings, aggregated.attention_logits,
                                                    aggregated.mask)
        return SlideTokens(projected.visual_tokens, projected.pooling_weights, aggregated)


class ChatEXAONEPathForCausalLM(nn.Module):
    """Vision tower + causal LLM, LLaVA-style: visual tokens spliced in at the image placeholders."""

    def __init__(self, config: ChatEXAONEPathConfig, llm: nn.Module, tokenizer=None) -> None:
        super().__init__()
        hidden = llm.get_input_embeddings().embedding_dim
        if config.llm_hidden_size is None:
            config = ChatEXAONEPathConfig(**{**config.to_dict(), "llm_hidden_size": hidden})
        if config.llm_hidden_size != hidden:
            raise ValueError(f"config says the LLM has hidden size {config.llm_hidden_size}, the LLM has {hidden}")
        if config.prompt_style == "auto" and tokenizer is not None:
            # Decide once and record it: a later tokenizer revision must not switch the format under a trained model.
            config.prompt_style = "chat_template" if getattr(tokenizer, "chat_template", None) else "llama2"
        self.config, self.llm, self.tokenizer = config, llm, tokenizer
        # transformers' causal LMs take `logits_to_keep`; training projects only the scored positions then.
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under a reloaded LoRA adapter
        parameters = inspect.signature(base.forward).parameters
        self._keeps_logits = "logits_to_keep" in parameters
        # The KV-cache argument's name: `cache` since transformers 5.24, `past_key_values` before.
        self._cache_kwarg = next((name for name in ("cache", "past_key_values") if name in parameters), None)
        self._prefix_cache: OrderedDict[tuple, object] = OrderedDict()
        self._prefix_cache_ok: bool | None = None  # None until checked against the full forward once
        self.tower = SlideEncoder(config)
        self.typicality: Typicality | None = None  # how unlike its training slides a slide is (typicality.py)
        self._lora_merged = False

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: ChatEXAONEPathConfig, *, dtype: str = "auto", device: str = "auto") -> "ChatEXAONEPathForCausalLM":
        """A new model with an untrained tower around the LLM named in `config`."""
        from ..llm import load_llm

        llm, tokenizer = load_llm(config.llm_name_or_path, dtype=dtype, device=device)
        model = cls(config, llm, tokenizer)
        return model.to(llm.device)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # -- the splice ------------------------------------------------------------------------------------
    def get_slide_tokens(self, slide_features: list[torch.Tensor] | torch.Tensor,
                         mask: torch.Tensor | None = None) -> SlideTokens:
        """Visual tokens (B, K, d_llm) for a batch of slides, with their pooling weights and CLAM's attention."""
        if isinstance(slide_features, (list, tuple)):
            slide_features, mask = pad_bags([f.to(self.device) for f in slide_features])
        return self.tower(slide_features.to(self.device), None if mask is None else mask.to(self.device))

    def merge_visual_tokens(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor,
                            labels: torch.Tensor | None = None,
                            slides_per_sample: torch.Tensor | list[int] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with each sample's placeholders replaced by its slides' visual tokens, in order.

        `visual_tokens` is (S, K, d): the slides of the whole batch, sample by sample. `slides_per_sample`
        says how many of them each sample (a case) has; None means one each. Every sample needs exactly
        (its slides × K) placeholder ids; a mismatch raises with both numbers.
        """
        is_image = input_ids == self.config.image_token_index  # (B, L)
        slides, k = visual_tokens.shape[:2]
        batch = input_ids.shape[0]
        per_sample = is_image.sum(1)
        if slides_per_sample is None:
            if batch != slides or (per_sample != k).any():
                raise ValueError(f"image placeholders per sample {per_sample.tolist()} do not match {slides} slide(s) "
                                 f"× {k} visual tokens; every sample needs exactly {k} placeholder ids")
        else:
            counts = torch.as_tensor(slides_per_sample, device=input_ids.device).reshape(-1)
            if counts.numel() != batch or int(counts.sum()) != slides or (per_sample != counts * k).any():
                raise ValueError(f"image placeholders per sample {per_sample.tolist()} do not match "
                                 f"{counts.tolist()} slide(s) per sample ({slides} given) × {k} visual tokens; every "
                                 f"sample needs {k} placeholder ids per slide")
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L, d)
        tokens = visual_tokens.to(embeddings.dtype).reshape(-1, embeddings.shape[-1])  # (S*K, d), row-major
        embeddings = embeddings.masked_scatter(is_image.unsqueeze(-1).expand_as(embeddings), tokens)
        if labels is not None:
            labels = labels.masked_fill(is_image, IGNORE_INDEX)
        return embeddings, labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                slide_features: list[torch.Tensor] | torch.Tensor | None = None, labels: torch.Tensor | None = None,
                slide_mask: torch.Tensor | None = None, supervised_logits_only: bool = False,
                slides_per_sample: torch.Tensor | list[int] | None = None, **llm_kwargs) -> ChatEXAONEPathOutput:
        """LLM loss/logits with visual tokens spliced in; labels at image positions become IGNORE_INDEX.

        `slide_features` holds the batch's slides in order; with `slides_per_sample` a sample is a case of
        several of them (each pooled on its own), else each sample has one. The tower's outputs are per slide.

        `supervised_logits_only` (training): the vocabulary projection runs only at the positions some
        sample in the batch is scored on, so `logits` is (B, P, V) there; the loss is the same.
        """
        input_ids = input_ids.to(self.device)
        labels = None if labels is None else labels.to(self.device)
        if slide_features is None:  # a text-only conversation
            if (input_ids == self.config.image_token_index).any():
                raise ValueError("image placeholders in the input but no slide_features were given")
            slide = None
            embeddings = self.llm.get_input_embeddings()(input_ids)
        else:
            slide = self.get_slide_tokens(slide_features, slide_mask)
            embeddings, labels = self.merge_visual_tokens(input_ids, slide.visual_tokens, labels, slides_per_sample)
        attention_mask = None if attention_mask is None else attention_mask.to(self.device)
        if supervised_logits_only and labels is not None and self._keeps_logits:
            out = self._supervised_forward(embeddings, attention_mask, labels, input_ids=input_ids, **llm_kwargs)
        else:
            out = self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        tower = {} if slide is None else {
            "visual_tokens": slide.visual_tokens, "pooling_weights": slide.pooling_weights,
            "patch_attention": slide.aggregated.attention, "patch_mask": slide.aggregated.mask}
        result = ChatEXAONEPathOutput(loss=out.loss, logits=out.logits, **tower)
        for name, value in out.items():  # the LLM's own fields, named as its ModelOutput names them
            if name not in result:
                result[name] = value
        return result

    def _supervised_forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None,
                            labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None,
                            input_ids: torch.Tensor | None = None, **llm_kwargs) -> ModelOutput:
        """The LLM's causal-LM loss with the vocabulary projection only where it is scored.

        A short answer after a long prompt is scored at a few positions, while the (V × d) projection at
        every position is a fifth of a small LLM's step; `logits_to_keep` with those positions skips the
        rest. The loss is transformers' own: shifted labels, mean over scored tokens, or their sum over
        `num_items_in_batch` when the Trainer counts them across gradient accumulation.
        """
        targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position p predicts p + 1
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (P,) scored in some sample
        out = self._prefix_cached_forward(input_ids, embeddings, attention_mask, keep, llm_kwargs) \
            if input_ids is not None else None
        if out is None:
            out = self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, logits_to_keep=keep, **llm_kwargs)
        logits = out.logits.float().flatten(0, 1)  # (B·P, V)
        kept = targets[:, keep].flatten()
        if num_items_in_batch is None:
            loss = nn.functional.cross_entropy(logits, kept, ignore_index=IGNORE_INDEX)
        else:
            total = nn.functional.cross_entropy(logits, kept, ignore_index=IGNORE_INDEX, reduction="sum")
            loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                            else num_items_in_batch)
        out["loss"] = loss
        return out

    # -- the frozen prompt prefix (phase 1) ---------------------------------------------------------------
    _MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache lookup
    _PREFIX_ENTRIES = 8

    def _prefix_cached_forward(self, input_ids: torch.Tensor, embeddings: torch.Tensor,
                               attention_mask: torch.Tensor | None, keep: torch.Tensor,
                               llm_kwargs: dict) -> ModelOutput | None:
        """The LLM's forward over what follows the prompt prefix every sample shares, its keys and values cached.

        While the LLM is frozen (phase 1) the tokens before the slide's visual tokens are the same in
        every sample (the chat template's system turn and the user header: 24 of a 49-token caption
        sample with SmolLM2) and nothing the tower learns changes what the LLM makes of them, so their keys
        and values are computed once, without gradients, and the step runs only on the rest. None when
        it does not apply (a trainable LLM, no shared prefix, gradient checkpointing, an LLM whose
        cache this cannot use); the first use is checked against the full forward, and a mismatch or an
        error turns it off for good, so an unusual LLM trains as before, only slower.
        """
        if self._prefix_cache_ok is False:
            return None
        if self._prefix_cache_ok:
            return self._prefix_forward(input_ids, embeddings, attention_mask, keep, llm_kwargs)
        try:  # the first time it applies, anything unexpected means the plain forward from then on
            out = self._prefix_forward(input_ids, embeddings, attention_mask, keep, llm_kwargs)
        except Exception as error:  # noqa: BLE001 - an LLM whose cache works otherwise must still train
            logger.warning("Training cannot reuse the shared prompt prefix with this LLM (%s); it runs the whole "
                           "prompt (slower, the same result).", error)
            self._prefix_cache_ok = False
            self._prefix_cache.clear()
            return None
        if out is not None:
            self._prefix_cache_ok = self._check_prefix_forward(out.logits, embeddings, attention_mask, keep)
            if not self._prefix_cache_ok:
                self._prefix_cache.clear()
                return None
        return out

    def _prefix_forward(self, input_ids: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor | None,
                        keep: torch.Tensor, llm_kwargs: dict) -> ModelOutput | None:
        """The cached-prefix forward, or None where it does not apply."""
        if self._cache_kwarg is None or not torch.is_grad_enabled() or set(llm_kwargs) - {"use_cache"}:
            return None
        weights = list(self.llm.parameters())
        if any(p.requires_grad for p in weights) or self._llm_checkpoints_activations():
            return None
        length = self._shared_prefix_length(input_ids, attention_mask, int(keep.min()) if len(keep) else 0)
        if length < self._MIN_PREFIX:
            return None
        # Keyed by the weights' identity and in-place version too: a merged adapter or a reload is a new LLM.
        state = hash(tuple((id(p), p._version) for p in weights))
        key = (tuple(input_ids[0, :length].tolist()), input_ids.shape[0], embeddings.dtype, embeddings.device,
               torch.is_autocast_enabled(), state)
        if key not in self._prefix_cache:
            from transformers import DynamicCache

            cache = DynamicCache()
            with torch.no_grad():
                self.llm(inputs_embeds=embeddings[:, :length], use_cache=True, logits_to_keep=1,
                         **{self._cache_kwarg: cache})
            self._prefix_cache[key] = cache
            while len(self._prefix_cache) > self._PREFIX_ENTRIES:
                self._prefix_cache.popitem(last=False)
        self._prefix_cache.move_to_end(key)
        # The cache grows in place during a forward: each step gets its own copy of the prefix's.
        return self.llm(inputs_embeds=embeddings[:, length:], attention_mask=attention_mask, use_cache=False,
                        logits_to_keep=keep - length, **{self._cache_kwarg: copy.deepcopy(self._prefix_cache[key])})

    def _llm_checkpoints_activations(self) -> bool:
        # Recomputed layers would append the prefix's keys twice; transformers 5.24 renamed the flag.
        flag = getattr(self.llm, "is_activation_checkpointing", None)
        return bool(getattr(self.llm, "is_gradient_checkpointing", False) if flag is None else flag)

    def _shared_prefix_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, limit: int) -> int:
        """How many leading tokens every sample has in common, attended, before any image placeholder.

        At most `limit`: the first scored position and those after it stay in the forward.
        """
        same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != self.config.image_token_index)
        if attention_mask is not None:
            same &= attention_mask.bool().all(0)
        differs = (~same).nonzero()
        length = int(differs[0]) if len(differs) else input_ids.shape[1]
        return min(length, limit, input_ids.shape[1] - 1)

    def _check_prefix_forward(self, logits: torch.Tensor, embeddings: torch.Tensor,
                              attention_mask: torch.Tensor | None, keep: torch.Tensor) -> bool:
        """Whether the cached-prefix logits are the full forward's (to the precision the LLM runs in)."""
        with torch.no_grad():
            full = self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False,
                            logits_to_keep=keep).logits
        got, want = logits.detach().float(), full.float()
        tolerance = 1e-3 if full.dtype == torch.float32 and not torch.is_autocast_enabled() else 5e-2
        error = float("inf") if got.shape != want.shape else \
            (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        if error > tolerance:
            logger.warning("The cached prompt prefix changes this LLM's logits (relative error %.2g); training "
                           "without it (slower, the same result).", error)
            return False
        logger.info("Training reuses the shared prompt prefix's keys and values (relative error %.1g).", error)
        return True

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, slide_features: list[torch.Tensor] | torch.Tensor,
                 attention_mask: torch.Tensor | None = None, slides_per_sample: torch.Tensor | list[int] | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """Generated token ids (new tokens only) for prompts that contain the image placeholders.

        With `slides_per_sample`, each prompt is about a case of that many of the slides, in order.
        """
        input_ids = input_ids.to(self.device)
        tokens = self.get_slide_tokens(slide_features).visual_tokens
        embeddings, _ = self.merge_visual_tokens(input_ids, tokens, slides_per_sample=slides_per_sample)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("generate() needs left-padded prompts (the last position of every row must be real)")
        return self.llm.generate(inputs_embeds=embeddings, attention_mask=attention_mask.to(self.device),
                                 **generate_kwargs)

    # -- LoRA ------------------------------------------------------------------------------------------
    def enable_lora(self, r: int = 64, alpha: int = 16, dropout: float = 0.05,
                    target_modules: tuple[str, ...] = LORA_TARGETS) -> None:
        """Wrap the LLM with PEFT LoRA adapters (the paper: r=64, α=16 on q, k, v, o)."""
        from peft import LoraConfig, get_peft_model

        lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
        with quiet_peft_deprecation():
            self.llm = get_peft_model(self.llm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=list(target_modules), task_type="CAUSAL_LM"))
        self.config.lora = lora

    def merge_lora(self) -> None:
        """Fold the LoRA weights into the LLM (for export or faster inference)."""
        if self.config.lora is None:
            raise ValueError("this model has no LoRA adapter to merge")
        self.llm = self.llm.merge_and_unload()
        self.config.lora = None
        self._lora_merged = True  # the base LLM named in the config no longer holds these weights

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, save_llm: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, tower weights, the LoRA adapter and the tokenizer (the base LLM only if asked).

        `state_dict` (this model's keys: `tower.…`, `llm.…`) replaces the live weights: FSDP and DeepSpeed
        gather the full weights into one on the saving rank, while the live modules hold only shards.
        """
        from safetensors.torch import save_file

        if self._lora_merged and not save_llm:
            raise ValueError("the LoRA weights were merged into the LLM; save with save_llm=True or they are lost")
        if save_llm and self.config.lora is not None:
            raise ValueError("merge_lora() before save_pretrained(save_llm=True), so the export is self-contained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config
        if save_llm:  # an exported, self-contained model: the (merged) LLM travels with the tower
            self.llm.save_pretrained(directory / "llm")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory / "llm")
            config = ChatEXAONEPathConfig(**{**config.to_dict(), "llm_name_or_path": "llm"})
        config.to_json_file(directory / "config.json")
        if state_dict is None:
            tower_state, llm_state = self.tower.state_dict(), None
        else:
            tower_state = {k[len("tower."):]: v for k, v in state_dict.items() if k.startswith("tower.")}
            llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
        state = {k: v.detach().contiguous().cpu() for k, v in tower_state.items()}
        save_file(state, str(directory / TOWER_WEIGHTS), metadata={"format": "pt"})
        if self.config.lora is not None:  # PEFT writes adapter_config.json + the adapter weights only
            self.llm.save_pretrained(directory / ADAPTER_DIR, state_dict=llm_state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: str = "auto", device: str = "auto",
                        trainable: bool = False) -> "ChatEXAONEPathForCausalLM":
        """Rebuild a saved model: its base LLM (by reference), tower weights and LoRA adapter.

        `trainable=True` keeps the adapter trainable (to resume or continue training).
        """
        from safetensors.torch import load_file

        from ..llm import load_llm

        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} is not a ChatEXAONEPath checkpoint (no config.json)")
        config = ChatEXAONEPathConfig.from_dict(json.loads((directory / "config.json").read_text()))
        llm_ref = config.llm_name_or_path
        if not Path(llm_ref).is_absolute() and (directory / llm_ref).exists():
            llm_ref = str(directory / llm_ref)  # an exported model carries its LLM inside
        for required in (TOWER_WEIGHTS,):
            if not (directory / required).exists():
                raise FileNotFoundError(f"{directory} lacks {required}; the checkpoint is incomplete")
        llm, tokenizer = load_llm(llm_ref, dtype=dtype, device=device)
        if (directory / "tokenizer_config.json").exists():  # the tokenizer the model was trained with
            from transformers import AutoTokenizer

            # With the LLM's config: read from `directory`, transformers would take our config.json for the
            # tokenizer's model and warn that "chatexaonepath" is not a model type it knows.
            tokenizer = AutoTokenizer.from_pretrained(directory, config=llm.config)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        if (directory / ADAPTER_DIR / "adapter_config.json").exists():
            from peft import PeftModel

            with quiet_peft_deprecation():
                llm = PeftModel.from_pretrained(llm, directory / ADAPTER_DIR, is_trainable=trainable)
        model = cls(config, llm, tokenizer)
        tower_state = load_file(str(directory / TOWER_WEIGHTS))
        for name in ("feature_mean", "feature_std"):  # checkpoints written before feature standardisation existed
            tower_state.setdefault(name, getattr(model.tower, name))
        model.tower.load_state_dict(tower_state, strict=True)
        model.typicality = Typicality.load(directory)  # None for checkpoints trained before it existed
        return model.to(model.device).eval()
