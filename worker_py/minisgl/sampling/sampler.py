"""Batched sampling: logit bias, penalties, greedy, temperature, top-k, top-p, min_p, with per-request
reproducible noise; and logprobs."""

from __future__ import annotations

import numpy as np
import torch

from minisgl.kernels import sampling as fused
from minisgl.kernels.rounding import available
from minisgl.sampling.masks import TokenMasks, apply_token_masks
from minisgl.sampling.noise import gumbel, vocab_keys
from minisgl.sampling.params import Joins, SampleMode, SamplePlan, SlotParams
from minisgl.sampling.penalties import TokenCounts, apply_penalties


class Sampler:
    """Draws one token per row of logits, using the parameters stored for each row's request slot.

    Each row's logits get its logit biases and token mask, then its repetition, frequency and presence
    penalties (the order of docs/protocol.md, "Sampling"); a greedy row takes their argmax. A sampling row
    takes argmax(logits / T + Gumbel noise) over the tokens that survive top-k, then top-p, then min_p (HF's
    warpers' order and semantics); that is a draw from the filtered softmax(logits / T). The noise is a hash
    of (seed, position, vocab id), so the draw does not depend on the batch around the row. Every optional
    pass runs only when some row of the batch needs it (`plan_for` says, from host copies; the step says
    whether it has token masks); for the other rows it is the identity.

    `vocab_size` is needed for penalties (their per-slot token counts are [max_slots, vocab_size]).
    """

    def __init__(self, max_slots: int, device: torch.device | str, vocab_size: int | None = None) -> None:
        self.device = torch.device(device)
        self.params = SlotParams(max_slots, device, vocab_size)
        self.counts = TokenCounts(max_slots, vocab_size, device) if vocab_size is not None else None
        self._vocab_keys: torch.Tensor | None = None

    def join(self, joins: Joins, on_device=None) -> None:
        """(Re)sets the joining slots' parameters; `on_device`: the same arrays already on the device (the
        step upload's), else they are copied here. A join with penalties restarts its slot's token counts
        (those of every slot joining beside it too: cheaper than picking them out, and they start afresh
        anyway)."""
        if len(joins.slot) == 0:
            return
        dev = on_device if on_device is not None else joins.to_device(self.device)
        self.params.set(joins, dev)
        if self.counts is not None and self.params.has_penalties(joins.slot):
            self.counts.reset(dev.slot)

    def set_params(
        self,
        slots: np.ndarray,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        seed: np.ndarray,
        on_device=None,
        **options,
    ) -> None:
        """`join` from per-slot arrays; `options` as in `Joins.make` (min_p, penalties, bias, logprobs)."""
        self.join(Joins.make(slots, temperature, top_p, top_k, seed, **options), on_device)

    def plan_for(self, slots: np.ndarray) -> SamplePlan:
        return self.params.plan_for(slots)

    def mode_for(self, slots: np.ndarray) -> SampleMode:
        return self.params.mode_for(slots)

    def needs_counts(self, slots: np.ndarray) -> bool:
        """Whether a step of these slots must count its tokens (some slot has penalties)."""
        return self.counts is not None and self.params.has_penalties(slots)

    def count(
        self,
        slots: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor,
        sampled: torch.Tensor | bool | None = None,
    ) -> None:
        """Counts tokens of a slot's sequence: `ids[i]` at `positions[i]` of slot `slots[i]`. A token is
        generated when `sampled[i]` (the worker drew it; `True`: all of them were) or it sits at or past its
        slot's prompt length; else it is a prompt token."""
        if sampled is True:
            self.counts.add(slots, ids, None)
            return
        generated = positions >= self.params.prompt_len[slots.long()]
        if sampled is not None:
            generated |= sampled
        self.counts.add(slots, ids, generated)

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        plan: SamplePlan | SampleMode = SampleMode.FILTERED,
        masks: TokenMasks | None = None,
    ) -> torch.Tensor:
        """logits [n, V]; slots [n]; positions [n]: where each sampled token will sit. Returns int32 [n].
        `masks`: the step's token masks (none: every token may be sampled).

        `plan` (or just its mode) may only skip work that `plan_for` says these slots do not need; the default
        mode, FILTERED, is right for any temperatures and filters, and leaves out bias, penalties and min_p.
        `logits` is not modified.
        """
        if isinstance(plan, SampleMode):
            plan = SamplePlan(mode=plan)
        slots = slots.long()
        logits = self.adjust(logits, slots, plan, masks)
        fused_ok = available(logits.device) and logits.stride(-1) == 1
        if plan.mode == SampleMode.GREEDY:
            # No float copy: widening is exact and keeps the order (and the first of equal maxima).
            return fused.argmax(logits) if fused_ok else logits.argmax(dim=-1).int()
        temperature = self.params.temperature[slots]
        seed = self.params.seed[slots]
        if plan.mode == SampleMode.FILTERED or plan.min_p:
            # The filters need the scaled logits; a greedy row (temperature 0) keeps its maximum through
            # them, so its argmax is the same. Then the draw divides by 1 (sampling rows) or takes the argmax.
            is_greedy = temperature <= 0
            scaled = logits.float() / torch.where(is_greedy, 1.0, temperature)[:, None]
            if plan.mode == SampleMode.FILTERED:
                scaled = _top_k_top_p(scaled, self.params.top_k[slots], self.params.top_p[slots])
            if plan.min_p:
                scaled = _min_p(scaled, self.params.log_min_p[slots])
            logits, temperature = scaled, (~is_greedy).float()
        if fused_ok:
            # One pass: each sampling row divided by its temperature, its noise added, the argmax taken.
            return fused.sample_argmax(logits, temperature, seed, positions)
        return self._draw(logits, temperature, seed, positions)

    def _draw(
        self, logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """`kernels.sampling.sample_argmax` in torch ops (the CPU's path)."""
        is_greedy = temperature <= 0
        scaled = logits.float() / torch.where(is_greedy, 1.0, temperature)[:, None]
        noise = gumbel(seed, positions, self._keys(logits.shape[-1], logits.device))
        sampled = (scaled + noise).argmax(dim=-1)
        return torch.where(is_greedy, logits.argmax(dim=-1), sampled).int()

    def adjust(
        self, logits: torch.Tensor, slots: torch.Tensor, plan: SamplePlan, masks: TokenMasks | None = None
    ) -> torch.Tensor:
        """The logits after each row's logit biases, token mask and penalties (a float32 copy), or `logits`
        itself when there is none of them: what a greedy row takes the argmax of."""
        if not (plan.bias or plan.penalties or masks is not None):
            return logits
        slots = slots.long()
        logits = logits.to(torch.float32, copy=True)
        if plan.bias:
            logits.scatter_add_(1, self.params.bias_ids[slots], self.params.bias_values[slots])
        if masks is not None:
            apply_token_masks(logits, masks)
        if plan.penalties:
            logits = self._penalize(logits, slots)
        return logits

    @staticmethod
    def logprobs(
        logits: torch.Tensor, sampled: torch.Tensor, top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's own logprobs (log_softmax of the raw logits, in float32, before bias, penalties and
        temperature): of each row's sampled token [n], and the `top` most likely ids (int32 [n, top]) and
        their logprobs (float32 [n, top]), most likely first."""
        lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        chosen = lp.gather(1, sampled.long()[:, None])[:, 0]
        values, ids = lp.topk(top, dim=-1) if top > 0 else (lp[:, :0], lp[:, :0].long())
        return chosen, ids.int(), values

    def _penalize(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("penalties need the sampler's vocab_size (its per-slot token counts)")
        p, counts = self.params, self.counts.counts
        if available(logits.device) and logits.is_contiguous():
            return fused.apply_penalties(
                logits, counts, slots, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
            )
        return apply_penalties(
            logits,
            counts[slots],
            p.repetition_penalty[slots],
            p.frequency_penalty[slots],
            p.presence_penalty[slots],
        )

    def _keys(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        keys = self._vocab_keys
        if keys is None or keys.shape[0] != vocab_size or keys.device != device:
            keys = self._vocab_keys = vocab_keys(vocab_size, device)
        return keys


def _min_p(scaled: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf every logit whose probability is below min_p times the row's top probability: in logits,
    below the row's largest plus log(min_p) (renormalising after top-k/top-p changes no ratio, so the order of
    the filters does not matter here). Rows with min_p 0 have log(min_p) = -inf and lose nothing."""
    threshold = scaled.amax(dim=-1, keepdim=True) + log_min_p[:, None]
    return scaled.masked_fill(scaled < threshold, float("-inf"))


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
