import math

import pytest
import torch
import torch.nn.functional as F

from chatexaonepath.errors import EncoderError
from chatexaonepath.vision_tower.encoder import (
    IMAGENET_MEAN, IMAGENET_STD, ViTClassTokenEncoder, available_encoders, build_encoder,
    convert_dino_state_dict, load_converted, vit_b16_config, vit_from_dino_checkpoint,
)


def random_dino_state_dict(dim: int, depth: int, mlp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINO ViT/16 state dict (timm/DINO key names) with random weights."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 197, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
               p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
               p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
               p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
               p + "mlp.fc1.weight": r(mlp, dim), p + "mlp.fc1.bias": r(mlp),
               p + "mlp.fc2.weight": r(dim, mlp), p + "mlp.fc2.bias": r(dim)}
    return sd


def dino_reference_forward(sd: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """DINO's VisionTransformer.forward written out in plain torch, independent of transformers."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)  # (B, 196, D)
    b, n, d = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    ln = lambda t, k: F.layer_norm(t, (d,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(depth):
        p = f"blocks.{i}."
        y = ln(x, p + "norm1")
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(b, n + 1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n + 1, d)
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = ln(x, p + "norm2")
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + y
    return ln(x, "norm")[:, 0]


def test_converted_encoder_matches_dino_forward(tiny_vit_config):
    sd = random_dino_state_dict(64, 2, 128)
    model = ViTClassTokenEncoder(tiny_vit_config).eval()
    load_converted(model, convert_dino_state_dict(sd, 2))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x), dino_reference_forward(sd, x, depth=2, heads=4)
    assert ours.shape == (3, 64)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4


def test_conversion_is_strict_about_missing_and_unexpected_keys(tiny_vit_config):
    sd = random_dino_state_dict(64, 2, 128)
    model = ViTClassTokenEncoder(tiny_vit_config)
    extra = dict(sd, **{"head.weight": torch.zeros(10, 64)})
    with pytest.raises(EncoderError, match="head.weight"):
        convert_dino_state_dict(extra, 2)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(EncoderError, match="lacks 1 weights"):
        load_converted(model, convert_dino_state_dict(missing, 2))
    with pytest.raises(EncoderError, match="blocks.2"):  # a deeper checkpoint than the model
        convert_dino_state_dict(random_dino_state_dict(64, 3, 128), 2)
    wrong = dict(sd, **{"norm.weight": torch.ones(32)})
    with pytest.raises(EncoderError, match="shape"):
        load_converted(model, convert_dino_state_dict(wrong, 2))


def test_wrapper_prefixes_are_stripped(tiny_vit_config):
    sd = {f"module.{k}": v for k, v in random_dino_state_dict(64, 2, 128).items()}
    load_converted(ViTClassTokenEncoder(tiny_vit_config), convert_dino_state_dict(sd, 2))


@pytest.fixture(scope="module")
def vit_b16_checkpoints(tmp_path_factory):
    """Full-size EXAONEPath-shaped checkpoints in the three layouts the loader accepts."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("exaonepath")
    sd = random_dino_state_dict(768, 12, 3072, seed=3)
    ckpt = root / "EXAONEPath.ckpt"
    torch.save({"state_dict": sd, "epoch": 10}, ckpt)
    folder = root / "hf"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return sd, ckpt, folder


def test_exaonepath_loads_release_checkpoint_and_folder(vit_b16_checkpoints):
    sd, ckpt, folder = vit_b16_checkpoints
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ref = dino_reference_forward(sd, x, depth=12, heads=12)
    for weights in (ckpt, folder, folder / "model.safetensors"):
        encoder = build_encoder("exaonepath", weights=str(weights))
        assert encoder.name == "exaonepath" and not encoder.is_random and len(encoder.weights_sha256) == 64
        with torch.no_grad():
            out = encoder.model(x)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_exaonepath_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="huggingface.co/LGAI-EXAONE/EXAONEPath"):
        build_encoder("exaonepath")
    with pytest.raises(EncoderError, match="not found"):
        build_encoder("exaonepath", weights=str(tmp_path / "nowhere.ckpt"))


def test_corrupt_weights_file_is_an_encoder_error(tmp_path):
    bad = tmp_path / "EXAONEPath.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="Could not read"):
        build_encoder("exaonepath", weights=str(bad))


def test_unknown_encoder_lists_the_available_ones():
    with pytest.raises(EncoderError, match="exaonepath.*random-vit-b16"):
        build_encoder("vit-huge-nonexistent")
    assert {"exaonepath", "random-vit-b16"} <= set(available_encoders())


def test_random_encoder_is_seeded_and_marked():
    a, b = build_encoder("random-vit-b16", seed=0), build_encoder("random-vit-b16", seed=0)
    c = build_encoder("random-vit-b16", seed=1)
    assert a.is_random and a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert a.embed_dim == 768


def test_preprocess_matches_official_transform(tiny_encoder):
    patches = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    pixels = tiny_encoder.preprocess(patches)
    assert pixels.shape == (2, 3, 224, 224)
    crop = patches[:, 16:240, 16:240].permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (crop - mean) / std, atol=1e-5, rtol=1e-5)
    big = tiny_encoder.preprocess(torch.randint(0, 256, (1, 512, 512, 3), dtype=torch.uint8))
    assert big.shape == (1, 3, 224, 224) and math.isfinite(big.abs().max().item())


def test_packed_bf16_cpu_path_matches_float32(tiny_vit_config):
    from chatexaonepath.vision_tower.cpu_inference import PackedBf16Linear, oneDNN_bf16_available, pack_for_cpu_bf16

    if not oneDNN_bf16_available():
        pytest.skip("this CPU or PyTorch build has no oneDNN bf16 path")
    torch.manual_seed(0)
    model = ViTClassTokenEncoder(tiny_vit_config).eval()
    packed = pack_for_cpu_bf16(model)
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedBf16Linear) and m.attr == "gelu" for m in packed.modules()) == 2
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = packed(x).float()
    assert F.cosine_similarity(fast, reference).min() > 0.999
    assert type(model.vit.layers[0].mlp.fc1) is torch.nn.Linear  # the original is untouched


def test_dino_teacher_and_lightning_layouts_load(tiny_vit_config):
    sd = random_dino_state_dict(64, 2, 128)
    teacher = {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.zeros(8, 64),
                                                             "head.last_layer.weight_g": torch.zeros(1, 8)}
    lightning = {f"model.backbone.{k}": v for k, v in sd.items()}
    for layout in (teacher, lightning):
        model = ViTClassTokenEncoder(tiny_vit_config)
        load_converted(model, convert_dino_state_dict(layout, 2))
        torch.testing.assert_close(model.vit.layernorm.weight, sd["norm.weight"])
