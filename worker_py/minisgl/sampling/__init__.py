"""Sampling on the device: per-slot parameters and a batch-invariant sampler."""

from minisgl.sampling.params import SampleMode, SlotParams
from minisgl.sampling.sampler import Sampler

__all__ = ["SampleMode", "Sampler", "SlotParams"]
