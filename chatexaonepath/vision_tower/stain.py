"""Macenko H&E stain normalisation in pure torch, batched over whole batches of patches.

Same maths as torchstain's `TorchMacenkoNormalizer` (Macenko et al., ISBI 2009), but every step
works on a B×H×W×3 batch at once and on whatever device the batch lives on. The reference stains
are torchstain's defaults unless the normaliser is fitted to a target image (`--stain-target`), as
EXAONEPath's own preprocessing does with its TCGA target (docs/weights.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ChatEXAONEPathError

logger = logging.getLogger(__name__)

# torchstain's default reference stain matrix (columns: haematoxylin, eosin in OD space) and 99th-percentile
# stain concentrations. They are NOT EXAONEPath's reference: EXAONEPath's macenko.py starts from these values
# and then fits the normaliser to a TCGA target image, which `--stain-target` reproduces (docs/weights.md).
HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MAX_C_REF = (1.9705, 1.0308)

# Fewer tissue pixels than this and the stain estimate is noise: the image is left unchanged.
MIN_TISSUE_PIXELS = 16
# Pixels per internal step. On CPU a few 256² patches keep every float temporary inside the L3
# cache, which beats one pass over the whole batch; accelerators want big batches at once.
_CPU_PIXELS = 4 * 256 * 256
_DEVICE_PIXELS = 256 * 256 * 256


def _as_uint8_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate an RGB uint8 image or batch and return it as a tensor (no copy for numpy)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 RGB pixels, got {images.dtype}")
    if images.dim() not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected H×W×3 or B×H×W×3 RGB, got shape {tuple(images.shape)}")
    return images


def _nearest_rank(n: int, q: float) -> int:
    """torchstain's percentile: the k-th smallest of n values, k = 1 + round(q/100·(n-1))."""
    return 1 + round(0.01 * q * (n - 1))


def _smallest(values: torch.Tensor, k: int, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k smallest values and their column indices (ascending if `ordered`); exact."""
    rows, n = values.shape
    g = 8
    if n % g or 2 * g * k >= n:  # blocking would not pay off
        top = values.topk(k, 1, largest=False, sorted=ordered)
        return top.values, top.indices
    # Block j holds columns j, j + n/g, …: strided so that block minima are a vectorised reduction.
    # Each of the k smallest values lies in one of the k blocks with the smallest minima (a tie
    # left out only repeats a value already in), so selecting among those g·k candidates is exact.
    best = values.view(rows, g, n // g).amin(1).topk(k, 1, largest=False, sorted=False).indices
    cand = (best.unsqueeze(1) + (n // g) * torch.arange(g, device=values.device).view(1, g, 1)).view(rows, -1)
    top = values.gather(1, cand).topk(k, 1, largest=False, sorted=ordered)
    return top.values, cand.gather(1, top.indices)


class MacenkoNormalizer:
    """Macenko stain normaliser for batches of RGB uint8 patches (torchstain's reference until `fit`)."""

    def __init__(self, io: float = 240, alpha: float = 1, beta: float = 0.15) -> None:
        if not 0 <= alpha < 50:
            raise ValueError(f"alpha must be a percentile in [0, 50), got {alpha}")
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.he_ref = torch.tensor(HE_REF, dtype=torch.float32)
        self.max_c_ref = torch.tensor(MAX_C_REF, dtype=torch.float32)
        # A channel value v is transparent when -log((v+1)/io) < beta; OD falls as v rises, so
        # the test becomes v > v_max on the raw uint8 values.
        od = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / self.io)
        self._v_max = int((od >= self.beta).sum()) - 1

    @torch.no_grad()
    def fit(self, target: np.ndarray | torch.Tensor) -> MacenkoNormalizer:
        """Take the reference stain matrix and max concentrations from an H×W×3 uint8 image."""
        x = _as_uint8_tensor(target)
        if x.dim() != 3 or x.numel() == 0:
            raise ValueError(f"fit() takes one non-empty H×W×3 image, got shape {tuple(x.shape)}")
        x = x.reshape(1, -1, 3)
        he, _, max_c, ok = self._estimate(x, _Workspace(1, x.shape[1], x.device, self.alpha))
        if not bool(ok[0]):
            raise ChatEXAONEPathError("The stain reference image has too little tissue for Macenko fitting.")
        self.he_ref, self.max_c_ref = he[0].cpu(), max_c[0].cpu()
        return self

    @torch.no_grad()
    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalise B×H×W×3 (or H×W×3) uint8 RGB to the reference stains; same shape and device."""
        x = _as_uint8_tensor(images)
        flat = x.reshape(-1, x.shape[-3] * x.shape[-2], 3)
        if flat.numel() == 0:
            return x.clone()
        out = torch.empty_like(flat)
        budget = _CPU_PIXELS if flat.device.type == "cpu" else _DEVICE_PIXELS
        step = max(1, min(budget // flat.shape[1], flat.shape[0]))
        ws = _Workspace(step, flat.shape[1], flat.device, self.alpha)
        for start in range(0, flat.shape[0], step):
            self._normalize_chunk(flat[start : start + step], out[start : start + step], ws, start)
        return out.view(x.shape)

    def _normalize_chunk(self, x: torch.Tensor, out: torch.Tensor, ws: _Workspace, offset: int) -> None:
        b = x.shape[0]
        he, neg_c, max_c, ok = self._estimate(x, ws)
        # Recompose all three channels in one planar matmul: log(Io·exp(-HERef·diag(maxCRef/maxC)·C)).
        mix = self.he_ref.to(x.device) * (self.max_c_ref.to(x.device) / max_c).unsqueeze(1)  # b×3×2
        log_io = torch.full((1, 1, 1), math.log(self.io), device=x.device)
        z = torch.baddbmm(log_io, mix, neg_c, out=ws.f3b[:b])
        z.clamp_(max=math.log(255.0)).exp_().round_()
        for ch in range(3):  # one strided copy per channel: far faster than a 3-wide inner loop
            out[:, :, ch].copy_(z[:, ch])
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            out[bad] = x[bad]
            logger.warning("Macenko: %d image(s) left unchanged (too little tissue or degenerate stains), "
                           "batch indices %s", len(bad), (bad + offset).tolist())

    def _estimate(self, x: torch.Tensor, ws: _Workspace) -> tuple[torch.Tensor, ...]:
        """For b×N×3 uint8: stain matrix HE (b×3×2), -C (b×2×N), maxC (b×2), usable (b)."""
        b, n_pix, _ = x.shape
        xp = torch.stack(x.unbind(2), 1, out=ws.u8[:b])  # planar b×3×N: fast small GEMMs and rows
        w = torch.le(xp.amax(1), self._v_max, out=ws.w[:b])  # 1 for tissue pixels, 0 for transparent
        n = w.sum(1, dtype=torch.float64)  # exact counts for any image size
        ok = n >= MIN_TISSUE_PIXELS
        # OD = log(Io) - log1p(I): keep y = log1p(I) and fold log(Io) into later offsets.
        y = torch.log1p(xp, out=ws.f3a[:b])

        # Masked covariance with a single temporary. Shifting y by a rough mean (subsample, all
        # pixels) first keeps the one-pass formula from cancelling catastrophically in float32.
        shift = y[:, :, ::16].mean(2, keepdim=True)
        y.sub_(shift)
        yw = torch.mul(y, w.unsqueeze(1), out=ws.f3b[:b])
        nf = n.clamp_min(2).to(torch.float32).view(b, 1, 1)
        s1 = yw.sum(2, keepdim=True)
        cov = (torch.bmm(yw, y.transpose(1, 2)) - s1 @ s1.transpose(1, 2) / nf) / (nf - 1)
        cov = torch.where(ok.view(b, 1, 1), cov, ws.eye)  # eigh must not see garbage
        vecs = torch.linalg.eigh(cov).eigenvectors[:, :, 1:]  # two largest, ascending as torchstain
        # eigh's signs are arbitrary (and differ across devices): orient each to a positive sum.
        vecs = vecs * torch.where(vecs.sum(1, keepdim=True) < 0, -1.0, 1.0)
        od_shift = math.log(self.io) - shift  # b×3×1: OD = od_shift - y

        # Angles of tissue pixels in the eigen-plane at percentiles alpha and 100-alpha, as
        # k-th smallest of [phi; -phi] with tissue pushed 8 down (angles lie in [-π, π]) so that
        # excluded pixels rank after every tissue pixel.
        vt = vecs.transpose(1, 2)
        proj = torch.baddbmm(vt @ od_shift, vt, y, alpha=-1, out=ws.f2[:b])  # b×2×N
        keys = ws.keys[: 2 * b].view(2, b, n_pix)
        torch.atan2(proj[:, 1], proj[:, 0], out=keys[0])
        torch.neg(keys[0], out=keys[1])
        keys.sub_(w, alpha=8.0)
        # Rank of the alpha percentile from the bottom, and of the 100-alpha one from the top.
        k = 1 + torch.round(ws.q * (n - 1)).long()  # 2×b, torchstain's nearest rank
        rank = torch.where(ws.from_top, n.long() + 1 - k, k).view(2 * b)
        bound = max(_nearest_rank(n_pix, self.alpha), n_pix + 1 - _nearest_rank(n_pix, 100 - self.alpha))
        _, idx = _smallest(keys.view(2 * b, n_pix), min(bound, n_pix), ordered=True)
        pick = idx.gather(1, (rank - 1).clamp(0, idx.shape[1] - 1).unsqueeze(1)).view(2, b).T  # b×[lo, hi]
        phi = torch.atan2(proj[:, 1].gather(1, pick), proj[:, 0].gather(1, pick))
        ends = torch.bmm(vecs, torch.stack((phi.cos(), phi.sin()), 1))  # b×3×[v_min, v_max]
        # Haematoxylin first: the extreme direction with the larger red OD.
        he = torch.where((ends[:, 0, 0] > ends[:, 0, 1]).view(b, 1, 1), ends, ends.flip(2))

        # Least squares over all pixels with the 2×3 pseudo-inverse (HEᵀHE)⁻¹HEᵀ.
        g = he.transpose(1, 2) @ he
        det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
        ok &= det > 1e-6
        adj = g.flip(1, 2) * ws.adj_sign
        pinv = adj @ he.transpose(1, 2) / torch.where(ok, det, 1.0).view(b, 1, 1)
        # -C rather than C: the 99th percentile becomes a k-smallest and recomposition wants -C.
        neg_c = torch.baddbmm(pinv @ -od_shift, pinv, y, out=ws.f2[:b])  # b×2×N, reuses proj
        r99 = n_pix + 1 - _nearest_rank(n_pix, 99)  # 99th percentile = r99-th largest
        top, _ = _smallest(neg_c.view(2 * b, n_pix), r99)
        max_c = -top.amax(1).view(b, 2)
        ok &= (torch.isfinite(max_c) & (max_c > 1e-6)).all(1)
        return he, neg_c, max_c, ok


def read_stain_target(path: str | Path) -> np.ndarray:
    """A stain target image as H×W×3 uint8 RGB (alpha dropped), or a ChatEXAONEPathError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ChatEXAONEPathError(f"--stain-target {path} is not a file; give the path of a PNG/JPEG/TIFF H&E image.")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ChatEXAONEPathError(f"--stain-target {path} is not a readable image: {e}.") from e


def stain_target_sha256(path: str | Path | None) -> str:
    """sha256 of a stain target image file, or "none" without one (what features files record)."""
    if path is None:
        return "none"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def macenko_normalizer(target: str | Path | None = None) -> MacenkoNormalizer:
    """A Macenko normaliser fitted to the `target` image, or with torchstain's default reference without one."""
    normalizer = MacenkoNormalizer()
    if target is not None:
        normalizer.fit(read_stain_target(target))
        logger.info("Macenko reference fitted to %s", target)
    return normalizer


class _Workspace:
    """Per-pixel buffers for one chunk, reused across chunks: fresh large allocations page-fault."""

    def __init__(self, b: int, n: int, device: torch.device, alpha: float) -> None:
        self.u8 = torch.empty(b, 3, n, dtype=torch.uint8, device=device)
        self.w = torch.empty(b, n, device=device)
        self.f3a = torch.empty(b, 3, n, device=device)
        self.f3b = torch.empty(b, 3, n, device=device)
        self.f2 = torch.empty(b, 2, n, device=device)
        self.keys = torch.empty(2 * b, n, device=device)
        self.q = torch.tensor([[0.01 * alpha], [0.01 * (100 - alpha)]], dtype=torch.float64, device=device)
        self.from_top = torch.tensor([[False], [True]], device=device)
        self.eye = torch.eye(3, device=device)
        self.adj_sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], device=device)
