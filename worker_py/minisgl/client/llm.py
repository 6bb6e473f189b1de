"""The offline interface: `LLM(model).generate(prompts, sampling_params)`, over ZeroMQ like any other client.

from minisgl.client import LLM, SamplingParams
with LLM() as llm:
    out = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].text)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from minisgl.client.client import Client
from minisgl.launch import Engine, EngineConfig
from minisgl.proto import messages

Prompt = str | list[dict] | list[int]  # raw text, chat messages, or token ids


@dataclass(frozen=True)
class SamplingParams:
    """docs/protocol.md, `sampling`. The options after `ignore_eos` are off at their defaults: `logit_bias`
    maps token ids to biases (-100..100), `logprobs` asks for each token's logprob and that many top ones
    (0..20), `prompt_logprobs` the same for each prompt token (vLLM's)."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def to_wire(self) -> dict:
        return messages.sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=[(int(t), float(b)) for t, b in (self.logit_bias or {}).items()],
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


@dataclass(frozen=True)
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    message: str | None = field(default=None)
    # With SamplingParams.logprobs: one {"logprob", "top": [[id, logprob], ...]} per id of token_ids.
    logprobs: list[dict] | None = field(default=None)
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), as `logprobs`.
    prompt_logprobs: list[dict | None] | None = field(default=None)


def prompt_fields(prompt: Prompt) -> dict:
    """The generate-message keys for a prompt in any of its three forms."""
    if isinstance(prompt, str):
        return {"text": prompt}
    if prompt and all(isinstance(m, dict) for m in prompt):
        return {"messages": list(prompt)}
    return {"input_ids": [int(t) for t in prompt]}


class LLM:
    """Starts an engine for `model` (or connects to a running one at `address`) and generates in batches.

    An engine of its own listens on an ipc:// socket in its private run directory and serves no HTTP, unless
    `listen=` or `http=` say otherwise: so it runs next to a server on the default addresses (`minisgl serve`)
    instead of failing to bind them."""

    def __init__(self, model: str | None = None, *, address: str | None = None, **engine_args):
        self.engine: Engine | None = None
        if address is None:
            engine_args.setdefault("http", "off")
            config = EngineConfig(**({"model": model} if model else {}), **engine_args)
            self.engine = Engine(config, private_listen="listen" not in engine_args).__enter__()
            address = self.engine.config.listen
        self.client = Client(address)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Output]:
        """Sends every prompt at once (the scheduler batches them) and returns outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        rids = [
            self.client.submit(**prompt_fields(p), sampling=sp.to_wire(), stream=False)
            for p, sp in zip(prompts, params, strict=True)
        ]
        outputs = []
        for rid in rids:
            final = list(self.client.replies(rid))[-1]
            outputs.append(
                Output(
                    text=final["text"],
                    token_ids=list(final["token_ids"]),
                    finish_reason=final["finish_reason"],
                    prompt_tokens=final["prompt_tokens"],
                    message=final.get("message"),
                    logprobs=final.get("logprobs"),
                    prompt_logprobs=final.get("prompt_logprobs"),
                )
            )
        return outputs

    def close(self) -> None:
        self.client.close()
        if self.engine is not None:
            self.engine.stop()
            self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
