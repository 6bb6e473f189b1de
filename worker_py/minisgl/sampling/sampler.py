"""Batched sampling: greedy, temperature, top-k, top-p, with per-request reproducible noise."""

from __future__ import annotations

import numpy as np
import torch

from minisgl.kernels import sampling as fused
from minisgl.kernels.rounding import available
from minisgl.sampling.noise import gumbel, row_keys, vocab_keys
from minisgl.sampling.params import SampleMode, SlotParams


class Sampler:
    """Draws one token per row of logits, using the parameters stored for each row's request slot.

    A sampling row takes argmax(logits / T + Gumbel noise) over the tokens that survive top-k, then top-p
    (the order and semantics of HF's warpers); that is a draw from the filtered softmax(logits / T). The noise
    is a hash of (seed, position, vocab id), so the draw does not depend on the batch around the row.
    """

    def __init__(self, max_slots: int, device: torch.device | str) -> None:
        self.params = SlotParams(max_slots, device)
        self._vocab_keys: torch.Tensor | None = None

    def set_params(
        self,
        slots: np.ndarray,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        seed: np.ndarray,
        on_device=None,
    ) -> None:
        self.params.set(slots, temperature, top_p, top_k, seed, on_device)

    def mode_for(self, slots: np.ndarray) -> SampleMode:
        return self.params.mode_for(slots)

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        mode: SampleMode = SampleMode.FILTERED,
    ) -> torch.Tensor:
        """logits [n, V]; slots [n]; positions [n]: where each sampled token will sit. Returns int32 [n].

        `mode` may only be cheaper than FILTERED when `mode_for` says so for these slots; FILTERED is always
        correct.
        """
        # argmax needs no float copy: widening is exact and keeps the order (and the first of equal maxima).
        greedy_ids = logits.argmax(dim=-1)
        if mode == SampleMode.GREEDY:
            return greedy_ids.int()
        logits = logits.float()
        slots = slots.long()
        temperature = self.params.temperature[slots]
        is_greedy = temperature <= 0
        scaled = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
        if mode == SampleMode.FILTERED:
            scaled = _top_k_top_p(scaled, self.params.top_k[slots], self.params.top_p[slots])
        if available(logits.device):
            # One kernel instead of [n, V] int64 temporaries; `scaled` already holds the division.
            keys = row_keys(self.params.seed[slots], positions)
            sampled = fused.gumbel_argmax(scaled, torch.ones_like(temperature), keys)
        else:
            noise = gumbel(self.params.seed[slots], positions, self._keys(logits.shape[-1], logits.device))
            sampled = (scaled + noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy_ids, sampled).int()

    def _keys(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        keys = self._vocab_keys
        if keys is None or keys.shape[0] != vocab_size or keys.device != device:
            keys = self._vocab_keys = vocab_keys(vocab_size, device)
        return keys


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf every logit outside the row's top-k, then outside the top-p nucleus of what remains.

    The kept tokens are a prefix of the descending order, so the filter is a per-row cutoff value applied in
    vocab order; the draw then never depends on how a sort broke ties. Tokens tied with the cutoff are kept.
    """
    vocab = scaled.shape[-1]
    values, _ = scaled.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    in_top_k = torch.arange(vocab, device=scaled.device)[None, :] < k[:, None]
    probs = values.masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 must keep everything: a float cumsum can reach 1.0 before the tail and would cut it.
    in_nucleus = (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]
    num_kept = (in_top_k & in_nucleus).sum(dim=-1)
    cutoff = values.gather(1, (num_kept - 1)[:, None])
    return scaled.masked_fill(scaled < cutoff, float("-inf"))
