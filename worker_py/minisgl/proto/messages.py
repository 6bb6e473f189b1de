"""The msgpack messages of docs/protocol.md sections 1 and 2, as plain dicts, and the protocol's constants.

Builders put keys in the order the Rust side writes them, so that packing a built message gives the same
bytes as the scheduler's encoder (the golden tests check this)."""

from __future__ import annotations

from typing import Any

from minisgl.proto.ring import RING_RESULT, RING_STEP
from minisgl.proto.step import RESULT_FAILED, RESULT_OK, STEP_DECODE, STEP_EXTEND, STEP_SHUTDOWN

__all__ = [
    "RING_STEP",
    "RING_RESULT",
    "STEP_EXTEND",
    "STEP_DECODE",
    "STEP_SHUTDOWN",
    "RESULT_OK",
    "RESULT_FAILED",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "FINISH_ABORT",
    "FINISH_ERROR",
    "FINISH_MEMORY",
    "FINISH_REASONS",
    "ERROR_CODES",
    "SAMPLING_DEFAULTS",
    "SAMPLING_OPTIONS",
    "sampling",
    "generate",
    "abort",
    "info",
    "keepalive",
    "hello",
    "model_facts",
    "ready",
]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"
FINISH_MEMORY = "memory"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR, FINISH_MEMORY)

MALFORMED = "malformed"
UNKNOWN_TYPE = "unknown_type"
INVALID_PARAMS = "invalid_params"
EMPTY_PROMPT = "empty_prompt"
PROMPT_TOO_LONG = "prompt_too_long"
UNKNOWN_REQUEST = "unknown_request"
DUPLICATE_REQUEST = "duplicate_request"
SHUTTING_DOWN = "shutting_down"
OVERLOADED = "overloaded"
TOO_MANY_REQUESTS = "too_many_requests"
ERROR_CODES = (
    MALFORMED,
    UNKNOWN_TYPE,
    INVALID_PARAMS,
    EMPTY_PROMPT,
    PROMPT_TOO_LONG,
    UNKNOWN_REQUEST,
    DUPLICATE_REQUEST,
    SHUTTING_DOWN,
    OVERLOADED,
    TOO_MANY_REQUESTS,
)

# What the scheduler assumes for a key the client leaves out, in the order it writes them.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_tokens": 128,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
}

# Sampling options past `ignore_eos`, with the values that turn them off: the scheduler leaves an option off
# the wire while it is off, so a request that uses none of them packs as it did before they existed.
# `logit_bias` is a list of [token id, bias] pairs; `logprobs` the number of top tokens (None: no logprobs).
SAMPLING_OPTIONS: dict[str, Any] = {
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": [],
    "logprobs": None,
    "prompt_logprobs": None,  # vLLM's: the prompt tokens' logprobs with this many top tokens
    "skip_special_tokens": True,
    "min_tokens": 0,
    # Structured output, at most one: a JSON schema (a map), a regex, a Lark grammar (llguidance's dialect).
    "json_schema": None,
    "regex": None,
    "grammar": None,
}


def sampling(**values: Any) -> dict[str, Any]:
    """A whole `sampling` map as the scheduler writes it: every basic key (its default unless given), then
    the options that are not off, in the protocol's order."""
    unknown = set(values) - set(SAMPLING_DEFAULTS) - set(SAMPLING_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sampling keys: {sorted(unknown)}")
    out = {k: values.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
    for k, off in SAMPLING_OPTIONS.items():
        if k in values and values[k] != off:
            out[k] = [list(pair) for pair in values[k]] if k == "logit_bias" else values[k]
    return out


def generate(
    rid: str,
    *,
    text: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    input_ids: list[int] | None = None,
    sampling: dict[str, Any] | None = None,
    stream: bool = True,
    n: int = 1,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    keepalive: bool = False,
) -> dict[str, Any]:
    """A `generate` message. Exactly one of text, messages, input_ids; `sampling` keys as in the protocol
    (left-out keys take the scheduler's defaults). `n` samples of the prompt; left off when 1, as the
    scheduler writes it. `tools`, `tool_choice`, `parallel_tool_calls` in OpenAI's shapes (chat prompts
    only), left off when not given."""
    forms = [
        (k, v) for k, v in (("text", text), ("messages", messages), ("input_ids", input_ids)) if v is not None
    ]
    if len(forms) != 1:
        raise ValueError("give exactly one of text, messages, input_ids")
    unknown = set(sampling or {}) - set(SAMPLING_DEFAULTS) - set(SAMPLING_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sampling keys: {sorted(unknown)}")
    msg: dict[str, Any] = {"type": "generate", "rid": rid, forms[0][0]: forms[0][1]}
    if sampling is not None:
        msg["sampling"] = dict(sampling)
    msg["stream"] = stream
    if n != 1:
        msg["n"] = n
    for key, value in (
        ("tools", tools),
        ("tool_choice", tool_choice),
        ("parallel_tool_calls", parallel_tool_calls),
    ):
        if value is not None:
            msg[key] = value
    if keepalive:
        msg["keepalive"] = True
    return msg


def abort(rid: str) -> dict[str, Any]:
    return {"type": "abort", "rid": rid}


def info() -> dict[str, Any]:
    return {"type": "info"}


def keepalive() -> dict[str, Any]:
    """What a client with `keepalive` requests sends every 0.5 s (docs/protocol.md)."""
    return {"type": "keepalive"}


def model_facts(
    *,
    architecture: str,
    vocab_size: int,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_position_embeddings: int,
    dtype: str,
    device: str,
) -> dict[str, Any]:
    """The `model` map of a `hello`."""
    return {
        "architecture": architecture,
        "vocab_size": vocab_size,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "dtype": dtype,
        "device": device,
    }


def hello(
    *, pid: int, model: dict[str, Any], num_pages: int, page_size: int, max_batch: int, max_tokens: int
) -> dict[str, Any]:
    """The worker's control message once it has loaded: what it allocated (`model` from `model_facts`)."""
    return {
        "type": "hello",
        "pid": pid,
        "model": model,
        "num_pages": num_pages,
        "page_size": page_size,
        "max_batch": max_batch,
        "max_tokens": max_tokens,
    }


def status(phase: str) -> dict[str, Any]:
    """Before the hello: what the worker is busy with (the scheduler reports it as why it is not serving)."""
    return {"type": "status", "phase": phase}


def ready() -> dict[str, Any]:
    return {"type": "ready"}
