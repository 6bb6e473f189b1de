"""Presence, frequency and repetition penalties: per-slot token counts on the device, and the rule that uses
them.

One int32 per (slot, vocab id) holds both things the penalties read: how often the token was generated (the
low 24 bits) and whether it occurs in the prompt (PROMPT_SEEN). The counts are updated from the tokens each
step feeds the model, never from the sampled ids: a token sampled for a slot is fed back as its next input, so
by the time a slot samples, its counts cover exactly the sequence before the sampled position, and the
throwaway samples of unfinished prefill chunks are never counted.
"""

from __future__ import annotations

import torch

from minisgl.sampling.params import COUNT_MASK, PROMPT_SEEN


class TokenCounts:
    """`counts[slot, id]`: PROMPT_SEEN if the token occurs in the slot's prompt, plus how often it was
    generated."""

    def __init__(self, max_slots: int, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.counts = torch.zeros(max_slots, vocab_size, dtype=torch.int32, device=device)

    def reset(self, slots: torch.Tensor) -> None:
        self.counts.index_fill_(0, slots.long(), 0)

    def add(self, slots: torch.Tensor, ids: torch.Tensor, generated: torch.Tensor | None) -> None:
        """Counts token `ids[i]` for `slots[i]`: once more as generated where `generated[i]` (everywhere when
        `generated` is None), else as seen in the prompt. Any number of entries may name the same (slot,
        id)."""
        flat = self.counts.view(-1)
        index = slots.long() * self.vocab_size + ids.long().clamp(0, self.vocab_size - 1)
        if generated is None:
            flat.index_put_((index,), torch.ones_like(index, dtype=torch.int32), accumulate=True)
            return
        # Every entry of an index reads the same old value, so the largest of (old, old | PROMPT_SEEN) has the
        # flag set whenever any of them is a prompt token, whatever order the duplicates land in.
        old = flat[index]
        flat.scatter_reduce_(0, index, torch.where(generated, old, old | PROMPT_SEEN), reduce="amax")
        flat.index_put_((index,), generated.to(torch.int32), accumulate=True)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """The reference rule, in torch: float32 logits [n, V], each row's counts [n, V] and its penalties [n].

    Repetition (Hugging Face's and vLLM's) on every token of the prompt or the generated ones: a positive
    logit is divided by the penalty, any other multiplied. Then OpenAI's frequency and presence penalties over
    the generated tokens. A row whose penalties are off (1, 0, 0) comes out unchanged.
    """
    generated = (counts & COUNT_MASK).float()
    rep = repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(counts != 0, penalized, logits)
    return logits - frequency[:, None] * generated - presence[:, None] * (generated > 0).float()
