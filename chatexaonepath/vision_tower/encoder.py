"""Patch encoders behind a small registry; the default is EXAONEPath ViT-B/16.

EXAONEPath is a DINO ViT-B/16. It runs here on `transformers`' ViT classes (SDPA attention, no
timm/torchvision), with a strict key conversion from the DINO checkpoint names: a missing or
unexpected key is an error, never a silently random layer.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EncoderError

logger = logging.getLogger(__name__)

EXAONEPATH_HUB_ID = "LGAI-EXAONE/EXAONEPath"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
GET_WEIGHTS_HELP = (
    "accept the license at https://huggingface.co/LGAI-EXAONE/EXAONEPath, run `hf auth login`, then "
    "`hf download LGAI-EXAONE/EXAONEPath` (or pass --encoder-weights PATH to EXAONEPath.ckpt or its "
    "folder); use --encoder random-vit-b16 only to test the pipeline without real weights"
)


@dataclass
class PatchEncoder:
    """A built patch encoder: the network plus the preprocessing and provenance it comes with."""

    name: str
    model: nn.Module  # (B, 3, input_size, input_size) float → (B, embed_dim)
    embed_dim: int
    weights_sha256: str
    weights_source: str
    resize_to: int = 256
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def is_random(self) -> bool:
        """True when the weights are random (never meaningful features)."""
        return self.weights_source.startswith("random")

    def preprocess(self, patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (B, H, W, 3) → normalised (B, 3, input_size, input_size), as the official transform.

        Resize the short side to `resize_to` (bicubic, antialiased) → centre-crop → mean/std.
        """
        images = patches.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        height, width = images.shape[-2:]
        if min(height, width) != self.resize_to:
            scale = self.resize_to / min(height, width)
            size = (round(height * scale), round(width * scale))
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp_(0, 255)
            height, width = size
        top, left = (height - self.input_size) // 2, (width - self.input_size) // 2
        images = images[..., top : top + self.input_size, left : left + self.input_size]
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255
        return ((images - mean) / std).to(dtype).contiguous(memory_format=torch.contiguous_format)


# -- registry ----------------------------------------------------------------------------------
_ENCODERS: dict[str, Callable[..., PatchEncoder]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., PatchEncoder]], Callable[..., PatchEncoder]]:
    """Register a builder `fn(weights: str | None, seed: int) -> PatchEncoder` under `name`."""

    def decorator(fn: Callable[..., PatchEncoder]) -> Callable[..., PatchEncoder]:
        if name in _ENCODERS:
            raise ValueError(f"patch encoder {name!r} is already registered")
        _ENCODERS[name] = fn
        return fn

    return decorator


def available_encoders() -> list[str]:
    """Names accepted by `build_encoder` (and `--encoder`)."""
    return sorted(_ENCODERS)


def build_encoder(name: str, weights: str | None = None, seed: int = 0) -> PatchEncoder:
    """Build the patch encoder registered as `name`, in eval mode on the CPU."""
    if name not in _ENCODERS:
        raise EncoderError(f"Unknown patch encoder {name!r}; available: {', '.join(available_encoders())}.")
    encoder = _ENCODERS[name](weights=weights, seed=seed)
    encoder.model.eval().requires_grad_(False)
    return encoder


# -- the ViT-B/16 on transformers ---------------------------------------------------------------
class ViTClassTokenEncoder(nn.Module):
    """transformers' ViTModel returning the final-norm CLS token, like DINO's `forward`."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import ViTModel

        self.vit = ViTModel(config, add_pooling_layer=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]  # (B, D)


def vit_b16_config(**overrides: object):
    """The EXAONEPath architecture: DINO ViT-B/16 (768-d, 12 layers, 12 heads, LayerNorm eps 1e-6)."""
    from transformers import ViTConfig

    settings = dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3,
        qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    config = ViTConfig(**settings)
    config._attn_implementation = "sdpa"
    return config


_DINO_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


def convert_dino_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename a DINO/timm ViT state dict to `ViTClassTokenEncoder` keys; strict about leftovers.

    The fused `qkv` projection is split into q, k, v. Any key that is not used raises `EncoderError`.
    """
    state = dict(state_dict)
    # A DINO teacher/student checkpoint carries its self-distillation projection head beside the
    # backbone; the encoder is the backbone alone (EXAONEPath's num_classes is 0).
    head = [k for k in state if any(part in k for part in ("head.mlp.", "head.last_layer."))]
    if head:
        logger.info("Ignoring %d DINO projection-head weights (%s…)", len(head), head[0])
        state = {k: v for k, v in state.items() if k not in head}
    stripped = True
    while stripped:  # wrappers (DDP, Lightning, DINO) each add a prefix to every key, possibly nested
        stripped = False
        for prefix in _DINO_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        if src in state:
            out["vit." + dst] = state.pop(src)

    take("cls_token", "embeddings.cls_token")
    take("pos_embed", "embeddings.position_embeddings")
    take("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
    take("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias")
    take("norm.weight", "layernorm.weight")
    take("norm.bias", "layernorm.bias")
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            take(f"{src}norm1.{kind}", f"{dst}layernorm_before.{kind}")
            take(f"{src}norm2.{kind}", f"{dst}layernorm_after.{kind}")
            take(f"{src}attn.proj.{kind}", f"{dst}attention.o_proj.{kind}")
            take(f"{src}mlp.fc1.{kind}", f"{dst}mlp.fc1.{kind}")
            take(f"{src}mlp.fc2.{kind}", f"{dst}mlp.fc2.{kind}")
            qkv = state.pop(f"{src}attn.qkv.{kind}", None)
            if qkv is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                    out[f"vit.{dst}attention.{name}.{kind}"] = part.contiguous()
    if state:
        shown = ", ".join(sorted(state)[:5])
        raise EncoderError(f"The checkpoint has {len(state)} keys a ViT with {num_layers} layers does not use "
                           f"(e.g. {shown}); it is not a DINO ViT-B/16 state dict.")
    return out


def load_converted(model: ViTClassTokenEncoder, converted: dict[str, torch.Tensor]) -> None:
    """Load converted weights strictly, turning missing/unexpected keys and shape clashes into EncoderError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise EncoderError(f"The checkpoint lacks {len(missing)} weights of the ViT "
                           f"(e.g. {', '.join(missing[:5])}); it is incomplete or of another architecture.")
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise EncoderError(f"Weight {key} has shape {tuple(tensor.shape)}, the ViT expects "
                               f"{tuple(expected[key].shape)}; the checkpoint is of another architecture.")
    model.load_state_dict(converted, strict=True)


# -- finding and reading weights ----------------------------------------------------------------
def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    for suffix in WEIGHT_SUFFIXES:  # safetensors first: no pickle
        files = sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith("training_args"))
        if files:
            return files
    raise EncoderError(f"No weights ({', '.join(WEIGHT_SUFFIXES)}) in {folder}; {GET_WEIGHTS_HELP}.")


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(file))
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
            raise EncoderError(f"Could not read encoder weights {file}: {e}.") from e
        for key in ("state_dict", "teacher", "model"):  # Lightning / DINO / generic wrappers
            if isinstance(part, dict) and isinstance(part.get(key), dict):
                part = part[key]
                break
        state.update(part)
    return state


def resolve_exaonepath_weights(weights: str | None) -> list[Path]:
    """Find EXAONEPath weight files: an explicit path, a named hub repo, or the local HF cache."""
    if weights is not None and Path(weights).expanduser().exists():
        path = Path(weights).expanduser()
        return _weight_files(path) if path.is_dir() else [path]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo = weights or EXAONEPATH_HUB_ID
    if weights is not None and weights.count("/") != 1:
        raise EncoderError(f"Encoder weights {weights} not found (neither a file, a folder nor a hub repo id).")
    try:
        # Only a repo the user named explicitly may be downloaded; the default looks in the cache.
        folder = snapshot_download(repo, local_files_only=weights is None,
                                   allow_patterns=["*.json", "*.safetensors", "*.ckpt", "*.bin", "*.pth"])
    except LocalEntryNotFoundError as e:
        raise EncoderError(f"EXAONEPath weights are not in the Hugging Face cache; {GET_WEIGHTS_HELP}.") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise EncoderError(f"Could not download encoder weights from {repo}: {e}; {GET_WEIGHTS_HELP}.") from e
    return _weight_files(Path(folder))


def vit_from_dino_checkpoint(files: list[Path], config=None) -> ViTClassTokenEncoder:
    """Build a ViT-B/16 and load DINO-keyed weights from `files` strictly."""
    config = config or vit_b16_config()
    model = ViTClassTokenEncoder(config)
    load_converted(model, convert_dino_state_dict(_read_state_dict(files), config.num_hidden_layers))
    return model


@register_encoder("exaonepath")
def _build_exaonepath(weights: str | None = None, seed: int = 0) -> PatchEncoder:
    files = resolve_exaonepath_weights(weights)
    model = vit_from_dino_checkpoint(files)
    source = str(files[0].parent if len(files) > 1 else files[0])
    logger.info("EXAONEPath weights from %s", source)
    return PatchEncoder("exaonepath", model, 768, _sha256_files(files), source)


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@register_encoder("random-vit-b16")
def _build_random_vit(weights: str | None = None, seed: int = 0) -> PatchEncoder:
    if weights is not None:
        raise EncoderError("--encoder random-vit-b16 takes no --encoder-weights; did you mean --encoder exaonepath?")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTClassTokenEncoder(vit_b16_config())
    logger.warning("Using RANDOM ViT-B/16 weights (seed %d): features are not meaningful.", seed)
    return PatchEncoder("random-vit-b16", model, 768, _state_sha256(model), f"random(seed={seed})")


def build_encoder_or_random(name: str | None = None, weights: str | None = None) -> PatchEncoder:
    """`name` if given; otherwise EXAONEPath when its weights are found, else a random ViT-B/16 (warned)."""
    if name is not None:
        return build_encoder(name, weights)
    try:
        return build_encoder("exaonepath", weights)
    except EncoderError:
        logger.warning("EXAONEPath weights not found, so RANDOM ViT-B/16 weights are used; "
                       "docs/weights.md says how to get the real ones.")
        return build_encoder("random-vit-b16")
