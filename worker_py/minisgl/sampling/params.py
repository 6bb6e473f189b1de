"""Sampling parameters of every request slot, kept on the device and mirrored on the host."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy as np
import torch


class SampleMode(enum.IntEnum):
    """The cheapest path that is exact for a batch; every path gives each row the same token."""

    GREEDY = 0  # every row has temperature 0: argmax only
    PLAIN = 1  # some rows sample, none filters: no sort
    FILTERED = 2  # some sampling row has top-k or top-p: one sort of the logits


class SlotParams:
    """temperature, top_p, top_k and seed per slot: device tensors of length `max_slots`.

    A host copy of the first three lets the runner pick a `SampleMode` without reading the device.
    """

    def __init__(self, max_slots: int, device: torch.device | str) -> None:
        self.max_slots = max_slots
        self.temperature = torch.zeros(max_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self.seed = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self._host_temperature = np.zeros(max_slots, dtype=np.float32)
        self._host_filters = np.zeros(max_slots, dtype=bool)

    def set(
        self,
        slots: np.ndarray,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        seed: np.ndarray,
        on_device=None,
    ) -> None:
        """(Re)sets the parameters of `slots`, one indexed write per tensor. Seeds: uint64 or int64 bits.

        `on_device`, when given, holds the same arrays already on the device (`slot`, `temperature`, `top_p`,
        `top_k`, `seed` attributes, as the step upload provides them): then no host-to-device copy happens
        here, and nothing waits on the device.
        """
        if len(slots) == 0:
            return
        if on_device is None:
            on_device = _to_device(slots, temperature, top_p, top_k, seed, self.temperature.device)
        idx = on_device.slot.long()
        self.temperature.index_copy_(0, idx, on_device.temperature)
        self.top_p.index_copy_(0, idx, on_device.top_p)
        self.top_k.index_copy_(0, idx, on_device.top_k.long())
        self.seed.index_copy_(0, idx, on_device.seed)
        self._host_temperature[slots] = temperature
        self._host_filters[slots] = (np.asarray(top_k) > 0) | (np.asarray(top_p) < 1.0)

    def mode_for(self, slots: np.ndarray) -> SampleMode:
        sampling = self._host_temperature[slots] > 0
        if not sampling.any():
            return SampleMode.GREEDY
        if (sampling & self._host_filters[slots]).any():
            return SampleMode.FILTERED
        return SampleMode.PLAIN


def _to_device(slots, temperature, top_p, top_k, seed, dev) -> SimpleNamespace:
    def put(a: np.ndarray, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(dev)

    return SimpleNamespace(
        slot=put(slots, np.int64),
        temperature=put(temperature, np.float32),
        top_p=put(top_p, np.float32),
        top_k=put(top_k, np.int64),
        # uint64 seeds travel as their int64 bit pattern; the noise hash only looks at the bits.
        seed=torch.from_numpy(np.ascontiguousarray(seed, dtype=np.uint64).view(np.int64)).to(dev),
    )
