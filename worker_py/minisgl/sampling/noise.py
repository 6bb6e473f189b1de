"""Counter-based Gumbel noise: a pure function of (seed, position, vocab id).

No generator state exists anywhere, so a request draws the same noise whatever batch it is in, in whatever
order, on whatever device. The hash works on 32-bit lanes held in int64 with multipliers below 2**31, so no
product ever overflows int64 and the results are exact on every backend.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (see the module docstring).
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_M3 = 0x297A2D39
_GOLDEN = 0x1E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche on values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M3) & _MASK32
    return x ^ (x >> 15)


def row_keys(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from a 64-bit seed (int64 bits) and the position of the token being drawn."""
    lo = seed & _MASK32
    hi = (seed >> 32) & _MASK32
    pos = position.long() & _MASK32
    return mix32(lo ^ mix32(hi ^ mix32(pos ^ _GOLDEN)))


def vocab_keys(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """One 32-bit key per vocab id; the same for every row and step, so callers compute it once."""
    vocab = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return mix32((vocab * _GOLDEN) & _MASK32)


def gumbel(seed: torch.Tensor, position: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise, [n, V] float32, for rows with the given seeds and positions.

    `vocab` is `vocab_keys(V, device)`.
    """
    bits = mix32(row_keys(seed, position)[:, None] ^ vocab[None, :])
    return -torch.log(-torch.log(uniform(bits)))


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes to float32 in the open interval (0, 1).

    23 bits plus a half: (k + 0.5) / 2**23 is exact in float32 and at most 1 - 2**-24, so -log(-log(u)) is
    finite; with 24 bits the top value would round to 1.0 and give +inf noise (and NaN beside a -inf logit).
    """
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
