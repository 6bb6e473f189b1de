"""Each request's last new token, gathered inside a captured extend forward into buffers at fixed addresses.

Only the last new token of a request is sampled. A graph that stops at the hidden states of every token (the
token-row and extend graphs) would leave the host to pick those rows out, run the LM head on them and sample,
a dozen eager launches while the replayed forward waits for them (issue 12). Instead the graph itself copies
each request's last hidden state, slot and length to the first rows of `LastRows`, in request order, with the
scratch slot in every row past them; a sampling graph per row count then runs the LM head and the sampling
over those rows, as a decode graph's sampling does over its logits.
"""

from __future__ import annotations

import torch


class LastRows:
    """Row i holds request i's last hidden state, its slot and its sequence length (the position its sampled
    token takes); rows past the step's requests hold the scratch slot, so that writing a sampled token to
    each row's slot touches no real request. One more row than `max_reqs`, where the gather drops every row
    that is no request's last."""

    def __init__(
        self, max_reqs: int, hidden_size: int, dtype: torch.dtype, device: torch.device, scratch_slot: int
    ) -> None:
        self.scratch_slot = scratch_slot
        self._dropped = max_reqs
        self.hidden = torch.zeros(max_reqs + 1, hidden_size, dtype=dtype, device=device)
        self.slot = torch.full((max_reqs + 1,), scratch_slot, dtype=torch.int32, device=device)
        self.seq_len = torch.ones(max_reqs + 1, dtype=torch.int32, device=device)

    def gather_token_rows(self, hidden: torch.Tensor, req_slot: torch.Tensor, seq_len: torch.Tensor) -> None:
        """From a step of one row per new token (token_rows.py): a request's last row is the one row that
        carries its slot (the others, and the padding rows, carry the scratch slot). Fixed shapes only, no
        host sync: a row's destination is its rank among the last rows, or the dropped row."""
        last = req_slot != self.scratch_slot
        rank = torch.cumsum(last, 0) - 1
        dest = torch.where(last, rank, self._dropped)
        self.slot.fill_(self.scratch_slot)
        self.hidden.index_copy_(0, dest, hidden)
        self.slot.index_copy_(0, dest, req_slot)
        self.seq_len.index_copy_(0, dest, seq_len)

    def gather_requests(
        self, hidden: torch.Tensor, qo_indptr: torch.Tensor, req_slot: torch.Tensor, seq_len: torch.Tensor
    ) -> None:
        """From an extend step padded to a request count (`ExtendPadding`: padding requests have no tokens
        and the scratch slot): request i's last token is row qo_indptr[i + 1] - 1."""
        n = req_slot.shape[0]
        rows = (qo_indptr[1 : n + 1] - 1).clamp(min=0)  # a capture's empty step has no token at all
        torch.index_select(hidden, 0, rows, out=self.hidden[:n])
        self.slot[:n].copy_(req_slot)
        self.slot[n:].fill_(self.scratch_slot)
        self.seq_len[:n].copy_(seq_len)
