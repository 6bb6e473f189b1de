"""Rotary position embedding, neox style (the two halves of each head rotate together)."""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """A cos/sin table over every position, indexed by the step's positions.

    Not an nn.Module on purpose: the model is built on the meta device and then materialised, and a table held
    as a plain tensor, created here on the real device, survives that untouched.
    """

    def __init__(self, head_dim: int, max_position: int, base: float, dtype: torch.dtype, device) -> None:
        # Same float32 formula as transformers, so positions map to bit-identical angles before the cast.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        inv_freq = 1.0 / (base**exponent)
        pos = torch.arange(max_position, device=device).float()
        freqs = pos[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos().to(dtype)
        self.sin = angles.sin().to(dtype)

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [t, Hq, D], k: [t, Hkv, D], positions: [t]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
