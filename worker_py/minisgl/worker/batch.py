"""One step's arrays on the device, and the host-side sizes that shape the step's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The int32 arrays of a step, in the order they are packed into one host buffer for one host-to-device copy.
_PACKED = (
    "input_ids",
    "positions",
    "out_loc",
    "req_slot",
    "seq_len",
    "qo_indptr",
    "kv_indptr",
    "kv_last_page_len",
    "kv_indices",
)


@dataclass(frozen=True)
class ForwardBatch:
    """Device tensors are int32 views into one buffer; sizes are plain ints known on the host."""

    kind: int
    num_reqs: int
    num_tokens: int
    max_qo_len: int
    max_seq_len: int
    input_ids: torch.Tensor  # [t]; negative entries are resolved by the runner before the forward
    positions: torch.Tensor  # [t]
    out_loc: torch.Tensor  # [t]
    req_slot: torch.Tensor  # [n]
    seq_len: torch.Tensor  # [n]
    qo_indptr: torch.Tensor  # [n + 1]
    kv_indptr: torch.Tensor  # [n + 1]
    kv_last_page_len: torch.Tensor  # [n]
    kv_indices: torch.Tensor  # [k]

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_reqs


class BatchUploader:
    """Packs a step's arrays into one staging buffer and copies it to the device in one transfer.

    On CUDA the staging buffer is pinned and reused, and the copy is asynchronous. Reuse is safe only because
    every step ends with a blocking device-to-host copy of the sampled ids, which orders after this upload on
    the same stream; a runner that keeps several steps in flight needs one staging buffer per step in flight.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.device = device
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self._staging = torch.empty(capacity, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._staging_np = self._staging.numpy()

    def upload(self, step) -> ForwardBatch:
        arrays = [np.asarray(getattr(step, name)) for name in _PACKED]
        sizes = [a.shape[0] for a in arrays]
        total = sum(sizes)
        if total > self._staging_np.shape[0]:
            # Rare (prefix-shared pages listed by many requests); the previous step's copy has completed.
            self._allocate(2 * total)
        np.concatenate(arrays, out=self._staging_np[:total], casting="same_kind")
        if self.device.type == "cpu":
            # No copy at all: the forward reads the staging buffer directly, and it is done with it before
            # the next step overwrites it.
            flat = self._staging[:total]
        else:
            flat = self._staging[:total].to(self.device, non_blocking=True)
        parts = dict(zip(_PACKED, torch.split(flat, sizes), strict=True))
        qo_indptr, seq_len = arrays[_PACKED.index("qo_indptr")], arrays[_PACKED.index("seq_len")]
        n, t = sizes[_PACKED.index("req_slot")], sizes[_PACKED.index("input_ids")]
        return ForwardBatch(
            kind=int(step.kind),
            num_reqs=n,
            num_tokens=t,
            max_qo_len=int(np.max(np.diff(qo_indptr))) if n else 0,
            max_seq_len=int(np.max(seq_len)) if n else 0,
            **parts,
        )
