"""A faster bf16 path for transformer encoders on CPUs with AVX-512-BF16 or AMX.

Plain autocast casts every fp32 weight to bf16 on every call and runs GELU as a separate pass over
the MLP's widest activation. oneDNN can instead keep each weight pre-packed in bf16 in its own
blocked layout and fuse GELU into the first MLP matmul; that is what `torch.compile`'s freezing
pass does, but compiling a ViT-B/16 takes 20–50 s on a small CPU, more than a whole slide of
extraction saves. This module applies the same two rewrites directly. It relies on PyTorch's
oneDNN ops (`torch.ops.mkldnn`), so it checks them on a tiny problem first and callers fall back
to plain autocast when they are missing or disagree.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class PackedBf16Linear(nn.Module):
    """A Linear whose bf16 weight is pre-packed for oneDNN, optionally with GELU fused in."""

    def __init__(self, linear: nn.Linear, fuse_gelu: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.out_features = weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias, persistent=False)
        self.attr = "gelu" if fuse_gelu else "none"
        self.algorithm = "none" if fuse_gelu else ""  # "none" = exact erf GELU, as nn.GELU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16)  # (rows, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, self.attr, [], self.algorithm)
        return out.view(*hidden.shape[:-1], self.out_features)  # (..., out)


def _is_exact_gelu(module: object) -> bool:
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    # transformers' ACT2FN["gelu"] is its own GELUActivation wrapping F.gelu (exact).
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def oneDNN_bf16_available() -> bool:
    """True when this PyTorch build has the oneDNN ops and the CPU runs bf16 natively."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        probe = nn.Linear(32, 16)
        x = torch.randn(8, 32)
        with torch.no_grad():
            fused = PackedBf16Linear(probe, fuse_gelu=True)(x).float()
            reference = F.gelu(probe(x))
        return bool(torch.allclose(fused, reference, atol=0.05, rtol=0.05))
    except (AttributeError, RuntimeError) as e:
        logger.info("oneDNN bf16 linear path unavailable (%s); using plain autocast.", e)
        return False


def pack_for_cpu_bf16(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Linear pre-packed in bf16 and MLP GELUs fused (fc1 → act → fc2).

    Run it under `torch.autocast("cpu", torch.bfloat16)` so LayerNorm and softmax stay in float32.
    """
    packed = copy.deepcopy(model).eval()
    fused = 0
    for module in packed.modules():
        fc1, act = getattr(module, "fc1", None), getattr(module, "activation_fn", None)
        if isinstance(fc1, nn.Linear) and _is_exact_gelu(act):
            module.fc1 = PackedBf16Linear(fc1, fuse_gelu=True)
            module.activation_fn = nn.Identity()
            fused += 1
    for parent in list(packed.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedBf16Linear(child))
    logger.info("Packed the encoder's linear layers for oneDNN bf16 (%d GELUs fused).", fused)
    return packed
