"""Sampling kernels (CUDA only): the Gumbel-max draw with `noise.gumbel`'s noise computed in registers, the
penalties of `sampling.penalties.apply_penalties` in one pass, the token masks of `sampling.masks`, and the
greedy argmax.

Eager torch builds the noise as [n, V] int64 tensors through a dozen element-wise launches: at 138 rows of
151,936 logits that is gigabytes of memory traffic and milliseconds per step, more than the forward itself.
Here each program hashes, scales, adds and finds the first maximum of one chunk of a row while it reads those
logits once, and a second kernel picks each row's first best chunk: a row is 38 programs, so a few rows
still spread over the GPU (one program a row left most SMs idle with the hash's arithmetic to do). The hash is
the same 32-bit one, done in uint32 lanes, so a request draws the same token here as in the eager path
(barring a last-bit difference of the device's log, which can only matter at an exact tie). The greedy argmax
is the same two kernels without the noise.
"""

from __future__ import annotations

import torch

from minisgl.kernels.rounding import triton
from minisgl.sampling.params import COUNT_MASK

if triton is not None:
    import triton.language as tl

PENALTY_BLOCK = 1024
# Logits one program of the argmax reads: 38 programs a row of Qwen's 151,936, so that one row alone still
# spreads over the GPU, and 256 rows fill it many times over.
ARGMAX_CHUNK = 4096


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` as int32 [n]: the first of equal maxima, a NaN counted as +inf. x: [n, V] logits in any
    float dtype, rows contiguous. (torch's reduction read 256 rows of bf16 logits at 1.5 TB/s on an H200, 53
    us, and needed a cast to int32 after it.)"""
    return _argmax(x, x, x, x, noise=False)


def sample_argmax(
    x: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """Each row's draw, int32 [n]: where temperature > 0 the argmax of `x / temperature + noise.gumbel(seed,
    position)` (the division rounded as torch's float32 division rounds it), elsewhere the argmax of `x`.

    x: [n, V] logits in any float dtype, rows contiguous (-inf entries are never chosen); temperature:
    float32 [n]; seed: int64 [n] (the uint64 seeds' bits); position: int [n], where the token will sit. The
    row keys are hashed in the kernel too: as torch ops they were twenty launches of [n] each.
    """
    return _argmax(x, temperature, seed, position, noise=True)


def _argmax(x: torch.Tensor, temperature, seed, position, noise: bool) -> torch.Tensor:
    n, vocab = x.shape
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    if n:
        chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
        best = torch.empty(n, chunks, dtype=torch.float32, device=x.device)
        where = torch.empty(n, chunks, dtype=torch.int32, device=x.device)
        _argmax_chunk_kernel[(n, chunks)](
            x,
            x.stride(0),
            temperature,
            seed,
            position,
            best,
            where,
            vocab,
            chunks,
            BLOCK=ARGMAX_CHUNK,
            NOISE=noise,
        )
        pad = triton.next_power_of_2(chunks)
        _argmax_rows_kernel[(n,)](best, where, out, chunks, CHUNKS_PAD=pad)
    return out


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    slots: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """`penalties.apply_penalties` in place on contiguous float32 logits [n, V], reading each row's counts and
    penalties straight from the per-slot tables (counts [S, V], the penalties [S]) at `slots` [n]: no [n, V]
    gather of the counts. Returns `logits`."""
    n, vocab = logits.shape
    if n:
        grid = (n, triton.cdiv(vocab, PENALTY_BLOCK))
        _penalty_kernel[grid](
            logits,
            counts,
            counts.stride(0),
            slots,
            repetition,
            frequency,
            presence,
            vocab,
            COUNT_MASK=COUNT_MASK,
            BLOCK=PENALTY_BLOCK,
        )
    return logits


def apply_token_masks(
    logits: torch.Tensor, rows: torch.Tensor, which: torch.Tensor, bits: torch.Tensor
) -> torch.Tensor:
    """`masks.apply_token_masks` in place on contiguous logits [n, V] of any float dtype: row `rows[i]` keeps
    only the tokens whose bit is set in mask `which[i]` of `bits` (int32 [g, W]). One program per masked row
    and block of the vocabulary reads a block's words once; rows without a mask are not touched. Returns
    `logits`."""
    m = rows.shape[0]
    n, vocab = logits.shape
    if m:
        grid = (m, triton.cdiv(vocab, MASK_BLOCK))
        _mask_kernel[grid](
            logits, logits.stride(0), rows, which, bits, bits.stride(0), vocab, BLOCK=MASK_BLOCK
        )
    return logits


MASK_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _mask_kernel(x_ptr, stride, rows_ptr, which_ptr, bits_ptr, bits_stride, vocab, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        row = tl.load(rows_ptr + i).to(tl.int64)
        mask_row = tl.load(which_ptr + i).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < vocab
        words = tl.load(bits_ptr + mask_row * bits_stride + cols // 32, mask=inside, other=0)
        allowed = ((words >> (cols % 32)) & 1) != 0
        # Only the disallowed entries are written: an allowed logit is left exactly as it was.
        minus_inf = tl.full([BLOCK], float("-inf"), tl.float32)
        tl.store(x_ptr + row * stride + cols, minus_inf, mask=inside & ~allowed)

    # The slots are a slice of the step's packed buffer at any offset: specialising on their alignment would
    # compile a variant per offset class in the middle of serving.
    @triton.jit(do_not_specialize=["slot_ptr"])
    def _penalty_kernel(
        x_ptr,
        counts_ptr,
        counts_stride,
        slot_ptr,
        rep_ptr,
        freq_ptr,
        pres_ptr,
        vocab,
        COUNT_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        slot = tl.load(slot_ptr + row).to(tl.int64)
        rep = tl.load(rep_ptr + slot)
        freq = tl.load(freq_ptr + slot)
        pres = tl.load(pres_ptr + slot)
        x = tl.load(x_ptr + row * vocab + cols, mask=mask, other=0.0)
        c = tl.load(counts_ptr + slot * counts_stride + cols, mask=mask, other=0)
        generated = (c & COUNT_MASK).to(tl.float32)
        # The torch reference's operations in its order; the compiler may fuse a multiply and a subtraction,
        # so results agree to the last bit or so, not exactly (only this kernel runs on a GPU, so nothing
        # mixes them).
        x = tl.where(c != 0, tl.where(x > 0, x / rep, x * rep), x)
        x = x - freq * generated
        x = x - pres * (generated > 0).to(tl.float32)
        tl.store(x_ptr + row * vocab + cols, x, mask=mask)

    # The positions are a slice of the step's packed buffer at any offset (the temperatures and seeds are
    # gathered, but may be too): a variant compiled per alignment class took a second inside a served step
    # (the nano-vllm workload on an H100, 2026-12-08).
    @triton.jit(do_not_specialize=["temp_ptr", "seed_ptr", "pos_ptr"])
    def _argmax_chunk_kernel(
        x_ptr,
        stride,
        temp_ptr,
        seed_ptr,
        pos_ptr,
        best_ptr,
        where_ptr,
        vocab,
        chunks,
        BLOCK: tl.constexpr,
        NOISE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        if NOISE:
            t = tl.load(temp_ptr + row)
            if t > 0:
                # noise.row_keys, then noise.gumbel's bits and uniform, on uint32 lanes.
                seed = tl.load(seed_ptr + row).to(tl.int64)
                lo = (seed & 0xFFFFFFFF).to(tl.uint32)
                hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
                pos = tl.load(pos_ptr + row).to(tl.uint32)
                key = _mix32(lo ^ _mix32(hi ^ _mix32(pos ^ 0x1E3779B9)))
                bits = _mix32(key ^ _mix32(cols.to(tl.uint32) * 0x1E3779B9))
                u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
                x = tl.math.div_rn(x, t) - tl.log(-tl.log(u))
        x = tl.where(x != x, float("inf"), x)  # NaN: what torch.argmax picks first
        top = tl.max(x, axis=0)
        # Past the vocabulary every entry is -inf: a row of all -inf still finds its first column.
        first = tl.min(tl.where(x == top, cols, chunk * BLOCK + BLOCK), axis=0)
        tl.store(best_ptr + row * chunks + chunk, top)
        tl.store(where_ptr + row * chunks + chunk, first)

    @triton.jit
    def _argmax_rows_kernel(best_ptr, where_ptr, out_ptr, chunks, CHUNKS_PAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_PAD)
        best = tl.load(best_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
        top = tl.max(best, axis=0)
        # The chunks are in vocabulary order: the first best chunk holds the row's first maximum.
        first = tl.min(tl.where((best == top) & (c < chunks), c, CHUNKS_PAD), axis=0)
        tl.store(out_ptr + row, tl.load(where_ptr + row * chunks + first))

    @triton.jit
    def _mix32(x):
        # noise.mix32 on uint32 lanes: the products wrap modulo 2**32 as the masked int64 ones do.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        x = x ^ (x >> 16)
        x = x * 0x297A2D39
        return x ^ (x >> 15)
