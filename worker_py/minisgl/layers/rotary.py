"""Rotary position embedding: a cos/sin table over every position, with the frequency scalings that HF
checkpoints name in `rope_scaling` / `rope_parameters` (formulas as transformers computes them):
- linear: every frequency divided by `factor` (positions interpolated);
- llama3: long wavelengths (beyond original_max / low_freq_factor) divided by `factor`, short ones (below
  original_max / high_freq_factor) kept, the band between blended smoothly;
- yarn: a per-frequency blend of interpolated and original frequencies over a ramp set by beta_fast /
  beta_slow, and cos/sin scaled by an attention factor (0.1 ln(factor) + 1 unless given);
- dynamic (NTK): the base grows with the length of each forward call once it passes max_position_embeddings
  (transformers). The scheduler never lets a sequence pass max_position_embeddings, and below it dynamic
  NTK is the plain rotary, which is what runs here. (Beyond it, the frequencies would depend on how a prompt
  is chunked: transformers' results differ between one forward and several.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NotImplementedError(f"rope type {self.kind!r} is not supported (known: {', '.join(KINDS)})")


class RotaryEmbedding:
    """Not an nn.Module on purpose: the model is built on the meta device and then materialised, and a table
    held as a plain tensor, created here on the real device, survives that untouched."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: RopeScaling,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        dim, s = head_dim, scaling
        # The same float32 formula as transformers, so positions map to bit-identical angles before the cast.
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        inv_freq = 1.0 / (base**exponent)
        scale = 1.0
        if s.kind == "linear":
            inv_freq = inv_freq / s.factor
        elif s.kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        elif s.kind == "yarn":
            inv_freq, scale = _yarn(base, dim, max_position, s, device)
        pos = torch.arange(max_position, device=device).float()
        freqs = pos[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = (angles.cos() * scale).to(dtype)
        self.sin = (angles.sin() * scale).to(dtype)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old = s.original_max_position
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(base: float, dim: int, max_position: int, s: RopeScaling, device) -> tuple[torch.Tensor, float]:
    original = s.original_max_position or max_position
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        both = s.mscale and s.mscale_all_dim
        attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim) if both else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)
