"""Sampling parameters of every request slot, kept on the device and mirrored on the host."""

from __future__ import annotations

import enum

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
    ) -> None:
        """(Re)sets the parameters of `slots`, one indexed write per tensor. Seeds: uint64 or int64 bits."""
        if len(slots) == 0:
            return
        dev = self.temperature.device
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(dev)
        self.temperature[idx] = torch.from_numpy(np.asarray(temperature, dtype=np.float32)).to(dev)
        self.top_p[idx] = torch.from_numpy(np.asarray(top_p, dtype=np.float32)).to(dev)
        self.top_k[idx] = torch.from_numpy(np.asarray(top_k, dtype=np.int64)).to(dev)
        # uint64 seeds travel as their int64 bit pattern; the noise hash only looks at the bits.
        self.seed[idx] = torch.from_numpy(np.ascontiguousarray(seed, dtype=np.uint64).view(np.int64)).to(dev)
        self._host_temperature[slots] = temperature
        self._host_filters[slots] = (np.asarray(top_k) > 0) | (np.asarray(top_p) < 1.0)

    def mode_for(self, slots: np.ndarray) -> SampleMode:
        sampling = self._host_temperature[slots] > 0
        if not sampling.any():
            return SampleMode.GREEDY
        if (sampling & self._host_filters[slots]).any():
            return SampleMode.FILTERED
        return SampleMode.PLAIN
