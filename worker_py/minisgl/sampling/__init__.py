"""Sampling on the device: per-slot parameters, token counts for the penalties, a batch-invariant sampler."""

from minisgl.sampling.masks import TokenMasks
from minisgl.sampling.params import Joins, SampleMode, SamplePlan, SlotParams
from minisgl.sampling.sampler import Sampler

__all__ = ["Joins", "SampleMode", "SamplePlan", "Sampler", "SlotParams", "TokenMasks"]
