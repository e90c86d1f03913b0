"""Attention-pool projector: the aggregator's patch embeddings → K visual tokens in the LLM's space.

K learned queries attend over the patch embeddings with the CLAM attention logits added as a bias,
then LayerNorm and a Linear map each pooled vector to the LLM's hidden size. The queries start at
zero, so at initialisation every token is exactly CLAM's attention pooling (of projected values);
training then lets each of the K tokens look at different regions.

The pooling weights softmax(q·k/√d + a) are computed explicitly (not inside a fused kernel) and
returned with the tokens: they are what the heatmap shows, so it shows exactly what the tokens were
pooled with — after training that is no longer CLAM's softmax(a).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ProjectorConfig:
    """Sizes of the attention-pool projector."""

    in_dim: int = 512
    out_dim: int = 4096  # the LLM's hidden size (LLaMA-2-7B: 4096)
    num_tokens: int = 1  # K; the paper uses a single WSI token
    num_heads: int = 8

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}")
        if self.in_dim % self.num_heads:
            raise ValueError(f"in_dim {self.in_dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProjectorOutput:
    """The visual tokens and the per-patch weights they were pooled with."""

    visual_tokens: torch.Tensor  # (B, K, out_dim)
    pooling_weights: torch.Tensor  # (B, N) softmax(q·k/√d + a) averaged over the K queries and the heads; 0 at padding


class AttentionPoolProjector(nn.Module):
    """K learned queries → multi-head attention over patches (CLAM logits as bias) → LayerNorm → Linear."""

    def __init__(self, config: ProjectorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ProjectorConfig()
        self.queries = nn.Parameter(torch.zeros(config.num_tokens, config.in_dim))  # (K, H)
        self.key = nn.Linear(config.in_dim, config.in_dim)
        self.value = nn.Linear(config.in_dim, config.in_dim)
        self.out = nn.Linear(config.in_dim, config.in_dim)
        self.norm = nn.LayerNorm(config.in_dim)
        self.proj = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, patch_embeddings: torch.Tensor, attention_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> ProjectorOutput:
        """(B, N, H) embeddings and (B, N) logits (−inf at padding) → K visual tokens and the pooling weights."""
        batch, patches, hidden = patch_embeddings.shape
        heads, head_dim, k = self.config.num_heads, hidden // self.config.num_heads, self.config.num_tokens
        dtype = self.key.weight.dtype
        x = patch_embeddings.to(dtype)
        split = lambda t: t.view(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731  (B, heads, n, d)
        queries = split(self.queries.unsqueeze(0).expand(batch, k, hidden))  # (B, heads, K, d)
        keys, values = split(self.key(x)), split(self.value(x))  # (B, heads, N, d)
        bias = attention_logits.float()
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        # Scores and softmax in float32 even under autocast: over tens of thousands of patches bf16 weights tie.
        with torch.autocast(x.device.type, enabled=False):
            scores = queries.float() @ keys.float().transpose(-1, -2) / math.sqrt(head_dim)  # (B, heads, K, N)
            weights = (scores + bias[:, None, None, :]).softmax(dim=-1)  # (B, heads, K, N)
        pooled = weights.to(values.dtype) @ values  # (B, heads, K, d)
        pooled = self.out(pooled.transpose(1, 2).reshape(batch, k, hidden))  # (B, K, H)
        tokens = self.proj(self.norm(pooled))  # (B, K, out_dim)
        return ProjectorOutput(tokens, weights.mean(dim=(1, 2)))  # (B, N): the mean over heads and queries
