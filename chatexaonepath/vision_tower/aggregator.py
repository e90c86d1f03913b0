"""CLAM gated-attention aggregator (Lu et al. 2021, `Attn_Net_Gated`): a bag of patch features → one slide embedding.

Each patch feature is embedded (768 → 512), scored by gated attention
`a_i = w · (tanh(V h_i) ⊙ sigmoid(U h_i))`, and the slide embedding is Σ softmax(a)_i h_i. The
per-patch attention is what the heatmap shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class AggregatorConfig:
    """Sizes of the gated-attention aggregator (CLAM's defaults for 768-d inputs)."""

    in_dim: int = 768
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.25
    # Patches embedded per step: bounds peak memory for bags of 100,000 patches.
    chunk_size: int = 16384

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AggregatorOutput:
    """What the aggregator returns for a batch of B slides padded to N patches."""

    pooled: torch.Tensor  # (B, hidden_dim) attention-weighted slide embedding
    patch_embeddings: torch.Tensor  # (B, N, hidden_dim)
    attention: torch.Tensor  # (B, N) softmax over each slide's patches; 0 at padding
    attention_logits: torch.Tensor  # (B, N) raw scores a_i; -inf at padding
    mask: torch.Tensor  # (B, N) bool, True for real patches


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of different sizes: (B, N_max, D) zero-padded features and a (B, N_max) mask."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    dims = {bag.shape[-1] for bag in bags}
    if len(dims) != 1 or any(bag.ndim != 2 or bag.shape[0] == 0 for bag in bags):
        raise ValueError(f"bags must be non-empty (N_i, D) tensors of one D; got {[tuple(b.shape) for b in bags]}")
    longest = max(bag.shape[0] for bag in bags)
    features = bags[0].new_zeros(len(bags), longest, dims.pop())
    mask = torch.zeros(len(bags), longest, dtype=torch.bool, device=bags[0].device)
    for i, bag in enumerate(bags):
        features[i, : bag.shape[0]] = bag
        mask[i, : bag.shape[0]] = True
    return features, mask


class GatedAttentionAggregator(nn.Module):
    """CLAM's gated-attention MIL pooling over the patches of each slide, with padding masks."""

    def __init__(self, config: AggregatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AggregatorConfig()
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.attention_tanh = nn.Sequential(nn.Linear(config.hidden_dim, config.attention_dim), nn.Tanh(),
                                            nn.Dropout(config.dropout))
        self.attention_gate = nn.Sequential(nn.Linear(config.hidden_dim, config.attention_dim), nn.Sigmoid(),
                                            nn.Dropout(config.dropout))
        self.attention_score = nn.Linear(config.attention_dim, 1)

    def _embed_and_score(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(features)  # (b, n, H)
        gated = self.attention_tanh(hidden) * self.attention_gate(hidden)  # (b, n, A)
        return hidden, self.attention_score(gated).squeeze(-1)  # (b, n, H), (b, n)

    def forward(self, features: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None) -> AggregatorOutput:
        """`features` (B, N, D) with an optional (B, N) mask, (N, D) for one slide, or a list of (N_i, D)."""
        if isinstance(features, (list, tuple)):
            features, mask = pad_bags(list(features))
        elif features.ndim == 2:
            features = features.unsqueeze(0)  # (1, N, D)
        if features.ndim != 3 or features.shape[-1] != self.config.in_dim:
            raise ValueError(f"expected features (B, N, {self.config.in_dim}), got {tuple(features.shape)}")
        batch, patches, _ = features.shape
        if mask is None:
            mask = torch.ones(batch, patches, dtype=torch.bool, device=features.device)
        if (mask.sum(1) == 0).any():
            raise ValueError("every slide needs at least one patch (a mask row is all False)")
        features = features.to(self.embed[0].weight.dtype)
        hidden, logits = [], []
        for start in range(0, patches, self.config.chunk_size):
            chunk = features[:, start : start + self.config.chunk_size]  # (B, c, D)
            if torch.is_grad_enabled() and patches > self.config.chunk_size:
                # Recompute in the backward pass rather than keep every chunk's activations.
                h, a = checkpoint(self._embed_and_score, chunk, use_reentrant=False)
            else:
                h, a = self._embed_and_score(chunk)
            hidden.append(h)
            logits.append(a)
        patch_embeddings = torch.cat(hidden, 1)  # (B, N, H)
        attention_logits = torch.cat(logits, 1).float().masked_fill(~mask, float("-inf"))  # (B, N)
        attention = attention_logits.softmax(dim=1)  # (B, N), 0 at padding
        pooled = torch.einsum("bn,bnh->bh", attention.to(patch_embeddings.dtype), patch_embeddings)  # (B, H)
        return AggregatorOutput(pooled, patch_embeddings, attention, attention_logits, mask)
