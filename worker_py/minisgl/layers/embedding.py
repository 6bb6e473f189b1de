"""The token embedding and the LM head, tied (one weight, the embedding's) or not. Both would split the
vocabulary across tensor-parallel ranks (`tp_dim` 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.kernels import small_m
from minisgl.layers.loading import add_param, copy_checked, rank_slice
from minisgl.layers.options import LayerOptions


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, options: LayerOptions) -> None:
        super().__init__()
        if options.tp_size != 1:
            raise NotImplementedError(
                "a vocabulary split across ranks needs the all-reduce of tensor parallelism"
            )
        self.tp_dim, self._rank, self._ranks = 0, options.tp_rank, options.tp_size
        add_param(self, "weight", (vocab_size, hidden_size), options.dtype, self._load)

    def _load(self, tensor: torch.Tensor, _shard: object) -> None:
        copy_checked(self.weight.data, rank_slice(tensor, 0, self._rank, self._ranks), "embedding")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Logits of the final hidden states; with `tied` the embedding's weight, else a weight of its own."""

    def __init__(
        self, vocab_size: int, hidden_size: int, options: LayerOptions, tied: VocabEmbedding | None = None
    ) -> None:
        super().__init__()
        self.tp_dim, self._rank, self._ranks = 0, options.tp_rank, options.tp_size
        self._tied = tied
        if tied is None:
            add_param(self, "weight", (vocab_size, hidden_size), options.dtype, self._load)
        else:
            self.weight = None
        self.small_m = options.small_m

    def _load(self, tensor: torch.Tensor, _shard: object) -> None:
        copy_checked(self.weight.data, rank_slice(tensor, 0, self._rank, self._ranks), "lm_head")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._tied.weight if self._tied is not None else self.weight
        if self.small_m and small_m.suits(hidden, weight):
            return small_m.linear(hidden, weight)
        return F.linear(hidden, weight)
