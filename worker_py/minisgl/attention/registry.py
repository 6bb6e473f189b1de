"""Which attention backends exist, what each can do, and how `auto` chooses. Standard library only: the
launcher builds its `--attention` / `--decode-attention` choices from here without importing torch."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

# The context a decode graph's attention is planned for unless told (`--decode-graph-context`).
DEFAULT_GRAPH_CONTEXT = 4096


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    prefill: bool
    decode: bool
    cuda_only: bool
    package: str | None  # what must be importable besides torch
    help: str

    def load(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def usable(self, device_type: str) -> bool:
        needs = self.package is None or importlib.util.find_spec(self.package) is not None
        return needs and (device_type == "cuda" or not self.cuda_only)


BACKENDS = {
    b.name: b
    for b in (
        BackendInfo(
            "torch",
            "minisgl.attention.torch_ref:TorchRefBackend",
            prefill=True,
            decode=True,
            cuda_only=False,
            package=None,
            help="plain torch (padded SDPA): the CPU's backend and the reference for the others",
        ),
        BackendInfo(
            "flashinfer",
            "minisgl.attention.flashinfer:FlashInferBackend",
            prefill=True,
            decode=True,
            cuda_only=True,
            package="flashinfer",
            help="FlashInfer's paged prefill and tensor-core decode kernels",
        ),
        BackendInfo(
            "triton",
            "minisgl.attention.triton:TritonBackend",
            prefill=True,
            decode=True,
            cuda_only=True,
            package="triton",
            help="our split-KV decode and extend kernels (kernels/decode_attention.py, extend_attention.py): "
            "no host-side plan",
        ),
    )
}
PREFILL_CHOICES = ("auto", *(n for n, b in BACKENDS.items() if b.prefill))
DECODE_CHOICES = ("auto", *(n for n, b in BACKENDS.items() if b.decode))
# `auto`, best first: the first one usable on the device.
AUTO_PREFILL = ("flashinfer", "torch")
AUTO_DECODE = ("triton", "flashinfer", "torch")


def resolve(prefill: str, decode: str, device_type: str) -> tuple[str, str]:
    """(prefill backend, decode backend) with `auto` decided for this device. `auto` decode follows an
    explicit prefill choice of torch (the reference end to end); named backends pass unchecked here."""
    for name, kind in ((prefill, "prefill"), (decode, "decode")):
        info = BACKENDS.get(name)
        if name != "auto" and (info is None or not getattr(info, kind)):
            known = PREFILL_CHOICES if kind == "prefill" else DECODE_CHOICES
            raise ValueError(f"unknown {kind} attention backend {name!r}; known: {', '.join(known)}")
    if prefill == "auto":
        prefill = next(n for n in AUTO_PREFILL if BACKENDS[n].usable(device_type))
    if decode == "auto":
        decode = (
            "torch" if prefill == "torch" else next(n for n in AUTO_DECODE if BACKENDS[n].usable(device_type))
        )
    return prefill, decode
