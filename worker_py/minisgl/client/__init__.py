"""Clients of minisgl-sched: the ZeroMQ `Client`, the offline `LLM` class, and the one-shot CLI."""

from minisgl.client.client import Client, MinisglError

__all__ = ["LLM", "Client", "MinisglError", "Output", "SamplingParams"]


def __getattr__(name: str):
    # The LLM class starts engines through minisgl.launch, which itself uses Client: import it lazily so that
    # importing either module first works.
    if name in ("LLM", "Output", "SamplingParams"):
        from minisgl.client import llm

        return getattr(llm, name)
    raise AttributeError(name)
