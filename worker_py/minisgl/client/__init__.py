"""Clients of minisgl-sched: the ZeroMQ `Client` and the offline `LLM` class (the command-line clients,
`minisgl ask` and `minisgl chat`, are in minisgl.cli)."""

from minisgl.client.client import Client, MinisglError, Overloaded, SchedulerGone
from minisgl.client.llm import LLM, Output, SamplingParams

__all__ = ["LLM", "Client", "MinisglError", "Output", "Overloaded", "SamplingParams", "SchedulerGone"]
