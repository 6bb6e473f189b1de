"""The worker process: `python -m minisgl.worker --model DIR --control ipc://...` (the launcher runs it)."""

from __future__ import annotations

import argparse
import sys

from minisgl.attention.flashinfer import DECODE_KERNELS
from minisgl.logs import LOG_FORMATS, setup_logging
from minisgl.worker.loop import WorkerConfig, serve


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m minisgl.worker", description=__doc__)
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--control", required=True, help="the scheduler's handshake socket (ipc://...)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "torch", "flashinfer"],
        help="attention backend: auto (flashinfer on CUDA when installed, else torch), torch, flashinfer",
    )
    p.add_argument("--num-pages", type=int, default=None, help="KV pages to allocate (default: from memory)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-batch", type=int, default=None, help="most requests per step")
    p.add_argument("--max-tokens", type=int, default=None, help="most new tokens per step")
    p.add_argument(
        "--kv-fraction",
        type=float,
        default=0.85,
        help="on CUDA, the fraction of the memory free after loading the weights that sizes the KV cache",
    )
    p.add_argument(
        "--decode-attention",
        choices=DECODE_KERNELS,
        default="triton",
        help="the flashinfer backend's decode kernel: ours (minisgl.attention.triton_decode) or FlashInfer's",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument(
        "--no-fused-kernels",
        action="store_true",
        help="plain torch ops instead of the Triton kernels (norms, RoPE with the KV write, SiLU-and-mul, "
        "projections of batches of up to 16 tokens)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="finish each step before reading the next (for measurement: the GPU then waits for the host)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="json: one object per line")
    a = p.parse_args(argv)
    setup_logging(a.log_level, a.log_format)
    return WorkerConfig(
        model=a.model,
        control=a.control,
        device=a.device,
        dtype=a.dtype,
        attention=a.attention,
        num_pages=a.num_pages,
        page_size=a.page_size,
        max_batch=a.max_batch,
        max_tokens=a.max_tokens,
        kv_fraction=a.kv_fraction,
        cuda_graphs=not a.no_cuda_graphs,
        fused_kernels=not a.no_fused_kernels,
        decode_attention=a.decode_attention,
        overlap=not a.no_overlap,
    )


if __name__ == "__main__":
    sys.exit(serve(parse_args()))
