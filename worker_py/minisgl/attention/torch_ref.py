"""A reference backend in plain torch, for the CPU and for checking faster backends on the GPU.

Every request is padded to the longest query and the longest sequence of the step, so one masked attention
call covers the whole batch: no Python loop over requests, at the price of attending over padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minisgl.attention.base import AttentionBackend
from minisgl.worker.batch import ForwardBatch

# cuDNN is left out: it builds a new graph for every new (batch, query, sequence) shape, about 2 ms of host
# time per call on an H200, and padded shapes change every step.
_SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchRefBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        dev = batch.qo_indptr.device
        n, t, ps = batch.num_reqs, batch.num_tokens, self.config.page_size
        qo_indptr = batch.qo_indptr.long()
        qo_start = qo_indptr[:-1]
        qo_len = qo_indptr[1:] - qo_start
        seq_len = batch.seq_len.long()
        prefix_len = seq_len - qo_len

        # Padded queries: row r, column j is new token j of request r (a dummy copy of token 0 past its end).
        j = torch.arange(batch.max_qo_len, device=dev)
        q_valid = j[None, :] < qo_len[:, None]
        self._q_gather = torch.where(q_valid, qo_start[:, None] + j[None, :], 0)
        # Back from padded to packed: token i sits at row req(i), column i - qo_start[req(i)]. A step padded
        # for an extend graph (`ExtendPadding`) ends in tokens of no request: their rows come back as zeros.
        real = int(batch.host_qo_indptr[-1])
        token_req = torch.repeat_interleave(torch.arange(n, device=dev), qo_len, output_size=real)
        token_col = torch.arange(real, device=dev) - qo_start[token_req]
        self._unpad = token_req * batch.max_qo_len + token_col
        self._padding_tokens = t - real

        # Padded keys: row r, column p is position p of request r, found through its page table.
        p = torch.arange(batch.max_seq_len, device=dev)
        kv_valid = p[None, :] < seq_len[:, None]
        page_slot = torch.where(kv_valid, batch.kv_indptr[:-1, None].long() + p[None, :] // ps, 0)
        page = batch.kv_indices.long()[page_slot]
        self._kv_gather = torch.where(kv_valid, page * ps + p[None, :] % ps, 0)

        # Query j of request r sits at position prefix_len[r] + j and sees that position and all before it.
        q_pos = prefix_len[:, None] + j[None, :]
        mask = kv_valid[:, None, :] & (p[None, None, :] <= q_pos[:, :, None])
        # Grouped-query attention is run with the query heads of each KV head folded into the query axis (see
        # forward), so the mask is tiled once per head of a group.
        group = self.config.num_heads // self.config.num_kv_heads
        self._mask = mask.repeat(1, group, 1)[:, None, :, :]
        self._planned_batch = batch

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        n, q_max = self._q_gather.shape
        hq, hkv, d = self.config.num_heads, self.config.num_kv_heads, q.shape[-1]
        # [n, Qmax, Hq, D] -> [n, Hkv, group * Qmax, D]: query heads h = kv * group + g share KV head kv, so
        # they become more query rows of that KV head and no K/V is ever repeated. That keeps the call on the
        # memory-efficient kernel, which takes a mask but not enable_gqa.
        q_pad = q[self._q_gather].permute(0, 2, 1, 3).reshape(n, hkv, -1, d)
        k_pad = self.kv_cache.flat_k(layer)[self._kv_gather].transpose(1, 2)  # [n, Hkv, Lmax, D]
        v_pad = self.kv_cache.flat_v(layer)[self._kv_gather].transpose(1, 2)
        with sdpa_kernel(_SDPA_KERNELS):
            out = F.scaled_dot_product_attention(
                q_pad, k_pad, v_pad, attn_mask=self._mask, scale=self.config.scale
            )
        out = out.reshape(n, hq, q_max, d).transpose(1, 2)  # [n, Qmax, Hq, D]
        out = out.reshape(n * q_max, hq, d)[self._unpad]
        if self._padding_tokens:
            out = torch.cat([out, out.new_zeros(self._padding_tokens, hq, d)])
        return out
