"""Weight prefetch into the GPU's L2 cache (Triton, CUDA only).

At a few rows a decode step's projections only read their weights, and each one is too short to keep HBM
busy: it ramps up, streams a few MB, drains, and the GPU waits between kernels. A prefetch issued a few
kernels ahead keeps HBM streaming through those gaps, so the projection finds its weights in L2 and reads them
at L2 speed. Prefetches are hints: a kernel issues them and exits without waiting, nothing reads their result,
and a dropped one only costs speed, never correctness.

A `PrefetchTable` is a list of (address, bytes) chunks built once from tensors whose storage never moves (the
weights); `launch` issues them all, one chunk per thread:
- `bulk`: one `cp.async.bulk.prefetch.L2` per chunk (Hopper's TMA unit streams the chunk);
- `lines`: one `prefetch.global.L2` per 128-byte line of the chunk (any GPU since Fermi).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

MODES = ("bulk", "lines", "load")
LINE = 128
CHUNK = {"bulk": 16384, "lines": 4096, "load": 16384}  # bytes a thread issues
THREADS = 32  # per program: programs spread the chunks over SMs (one TMA unit each)


class PrefetchTable:
    """The chunks of `tensors`, in order, on their device: `addresses` (int64) and `sizes` (int32, bytes).
    A chunk starts 16-byte aligned and is a multiple of 16 bytes (what the bulk prefetch needs); a tensor's
    last few bytes past that are left out."""

    def __init__(self, tensors: Iterable[torch.Tensor], mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"prefetch mode {mode!r}; known: {', '.join(MODES)}")
        self.mode, chunk = mode, CHUNK[mode]
        addresses, sizes, device = [], [], None
        for t in tensors:
            device = t.device
            start = t.data_ptr()
            begin, end = -(-start // 16) * 16, (start + t.numel() * t.element_size()) // 16 * 16
            for at in range(begin, end, chunk):
                addresses.append(at)
                sizes.append(min(chunk, end - at))
        self.nbytes = sum(sizes)
        self.addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        self.sizes = torch.tensor(sizes, dtype=torch.int32, device=device)

    def __len__(self) -> int:
        return len(self.sizes)


def launch(table: PrefetchTable) -> None:
    """Issues the table's prefetches on the current stream; the kernel returns once they are issued."""
    n = len(table)
    if n and table.mode == "load":
        _load_kernel[(n,)](table.addresses, table.sizes, table.sizes, CHUNK=CHUNK["load"] // 4, num_warps=4)
    elif n:
        grid = (triton.cdiv(n, THREADS),)
        lines = CHUNK[table.mode] // LINE if table.mode == "lines" else 0
        _prefetch_kernel[grid](table.addresses, table.sizes, n, BLOCK=THREADS, LINES=lines, num_warps=1)


if triton is not None:

    @triton.jit
    def _prefetch_kernel(addr_ptr, size_ptr, n, BLOCK: tl.constexpr, LINES: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        addr = tl.load(addr_ptr + i, mask=mask, other=0)
        size = tl.load(size_ptr + i, mask=mask, other=0)
        if LINES == 0:
            # A size of 0 (a lane past the table) issues nothing.
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }",
                "=r,l,r",
                [addr, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            for j in tl.static_range(LINES):
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                    "=r,l,r",
                    [addr + j * 128, size - j * 128],
                    dtype=tl.int32,
                    is_pure=False,
                    pack=1,
                )

    @triton.jit
    def _load_kernel(addr_ptr, size_ptr, sink_ptr, CHUNK: tl.constexpr):
        i = tl.program_id(0)
        addr = tl.load(addr_ptr + i)
        size = tl.load(size_ptr + i)
        ptr = addr.to(tl.pointer_type(tl.int32))
        offs = tl.arange(0, CHUNK)
        v = tl.load(ptr + offs, mask=offs * 4 < size, other=0, eviction_policy="evict_last")
        total = tl.sum(v, axis=0)
        # Never true in practice; keeps the loads.
        if total == 0x7FFFFFF1:
            tl.store(sink_ptr + i, total)
