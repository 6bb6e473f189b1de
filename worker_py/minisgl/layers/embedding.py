"""The token embedding and the LM head, tied (one weight, the embedding's) or not.

With tensor parallelism both split the vocabulary (`tp_dim` 0): rank r holds rows [r * s, (r + 1) * s) with
s = ceil(vocab / ranks), the last slice padded with zero rows, so any vocabulary splits. The embedding looks
up the ids in its slice, zeros the others and all-reduces (exactly one rank contributes each row, so the sum
is exact); the LM head computes its slice's logits and all-gathers them, so that every rank holds the whole
row and samples the same token from it without a broadcast (the sampler's noise depends only on the seed,
the position and the vocabulary id).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.kernels import embed, small_m
from minisgl.layers import comm
from minisgl.layers.loading import add_param, copy_checked
from minisgl.layers.options import LayerOptions


class _VocabSlice:
    def __init__(self, vocab_size: int, options: LayerOptions) -> None:
        self.ranks = options.tp_size
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // options.tp_size)
        self.start = min(vocab_size, options.tp_rank * self.rows)
        self.stop = min(vocab_size, self.start + self.rows)

    def load_rows(self, weight: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"{what}: checkpoint has {tensor.shape[0]} rows, the model {self.vocab_size}")
        real = self.stop - self.start
        copy_checked(weight[:real], tensor[self.start : self.stop], what)
        weight[real:].zero_()


class StepTokens(NamedTuple):
    """How a step's input ids reach the embedding: an id -(s + 1) means the token slot s sampled last
    (`last_token[s]`), and every resolved id is recorded at its token's KV location (`record[out_loc]`)."""

    last_token: torch.Tensor
    record: torch.Tensor
    out_loc: torch.Tensor


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, options: LayerOptions) -> None:
        super().__init__()
        self.slice = _VocabSlice(vocab_size, options)
        self.tp_dim = 0
        add_param(self, "weight", (self.slice.rows, hidden_size), options.dtype, self._load)
        self._fused = options.fused

    def _load(self, tensor: torch.Tensor, _shard: object) -> None:
        self.slice.load_rows(self.weight.data, tensor, "embedding")

    def forward(self, ids: torch.Tensor, step: StepTokens | None = None) -> torch.Tensor:
        """The rows of `ids`; with `step`, the ids are resolved and recorded first (`StepTokens`)."""
        if step is not None:
            if self._fused and self.slice.ranks == 1:
                return embed.resolve_record_embed(ids, *step, self.weight)
            ids = embed.resolve_and_record(ids, *step)
        if self.slice.ranks == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.slice.start
        mine = (local >= 0) & (local < self.slice.stop - self.slice.start)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        return comm.all_reduce(out.masked_fill_(~mine.unsqueeze(-1), 0))


class LMHead(nn.Module):
    """Logits of the final hidden states; with `tied` the embedding's weight, else a weight of its own."""

    def __init__(
        self, vocab_size: int, hidden_size: int, options: LayerOptions, tied: VocabEmbedding | None = None
    ) -> None:
        super().__init__()
        self.slice = _VocabSlice(vocab_size, options)
        self.tp_dim = 0
        self._tied = tied
        if tied is None:
            add_param(self, "weight", (self.slice.rows, hidden_size), options.dtype, self._load)
        else:
            self.weight = None
        self.small_m = options.small_m

    def _load(self, tensor: torch.Tensor, _shard: object) -> None:
        self.slice.load_rows(self.weight.data, tensor, "lm_head")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._tied.weight if self._tied is not None else self.weight
        if self.small_m and small_m.suits(hidden, weight):
            logits = small_m.linear(hidden, weight)
        else:
            logits = F.linear(hidden, weight)
        ranks = self.slice.ranks
        if ranks == 1:
            return logits
        # Contiguous again when the last slice was padded: the sampler's kernels take rows of `vocab` ids.
        return comm.all_gather_columns(logits, ranks)[:, : self.slice.vocab_size].contiguous()
