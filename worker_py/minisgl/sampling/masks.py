"""Token masks (structured output, `min_tokens`): the scheduler sends a bitmask per constrained request, and
every token a mask does not allow gets a logit of -inf before sampling (docs/protocol.md, "Sampling").

A step carries `g` masks of W 32-bit words (`mask_bits`) and, per request, the row of its mask or -1
(`mask_row`). The host turns `mask_row` into the list of masked rows and their mask numbers, so the device
touches those rows only: a step without masks does nothing here, and one with a few masked requests among
many pays for those few.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from minisgl.kernels import sampling as fused
from minisgl.kernels.rounding import available


@dataclass(frozen=True)
class TokenMasks:
    """The masks of one step on the device: logits row `rows[i]` samples under `bits[which[i]]`."""

    rows: torch.Tensor  # int32 [m]: rows of the step's logits that have a mask
    which: torch.Tensor  # int32 [m]: each one's mask
    bits: torch.Tensor  # int32 [g, W]: the masks' words (uint32 bits viewed as int32)


def host_parts(step) -> dict[str, np.ndarray] | None:
    """The step's masks as int32 host arrays to upload (`mask_rows`, `mask_which`, `mask_bits`), or None when
    the step has none. A step object without mask arrays (a test's, a capture's) has none."""
    bits = getattr(step, "mask_bits", None)
    if bits is None or len(bits) == 0:
        return None
    mask_row = np.asarray(step.mask_row)
    rows = np.flatnonzero(mask_row >= 0).astype(np.int32)
    return {
        "mask_rows": rows,
        "mask_which": mask_row[rows].astype(np.int32),
        "mask_bits": np.ascontiguousarray(bits).view(np.int32),
    }


def from_uploaded(extra: dict[str, torch.Tensor], mask_words: int) -> TokenMasks | None:
    """The `host_parts` arrays once uploaded (`ForwardBatch.extra`)."""
    bits = extra.get("mask_bits")
    if bits is None:
        return None
    return TokenMasks(extra["mask_rows"], extra["mask_which"], bits.view(-1, mask_words))


def make(mask_row: np.ndarray, bits: np.ndarray, mask_words: int, device: torch.device | str) -> TokenMasks:
    """TokenMasks from a step's `mask_row` [n] and `mask_bits` (uint32, g * W words), for tests and tools."""
    parts = host_parts(SimpleNamespace(mask_row=mask_row, mask_bits=np.asarray(bits, dtype=np.uint32)))
    if parts is None:
        parts = {name: np.zeros(0, np.int32) for name in ("mask_rows", "mask_which", "mask_bits")}
    dev = torch.device(device)
    return from_uploaded({k: torch.from_numpy(v).to(dev) for k, v in parts.items()}, mask_words)


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Sets to -inf, in place, every logit of a masked row whose token its mask does not allow; returns
    `logits` [n, V]. Bits past V in a mask's last word are ignored."""
    if masks.rows.numel() == 0:
        return logits
    if available(logits.device) and logits.is_contiguous():
        return fused.apply_token_masks(logits, masks.rows, masks.which, masks.bits)
    vocab = logits.shape[-1]
    rows = masks.rows.long()
    words = masks.bits[masks.which.long()]  # [m, W]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    # An arithmetic shift of a negative word copies its sign bit in from the left; the lowest bit is right.
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(words.shape[0], -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
