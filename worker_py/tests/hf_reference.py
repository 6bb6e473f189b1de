"""HF transformers as the outside reference, the one way every test asks it: the model loaded in float32,
greedy generation with or without the sampling options' processors, and log_softmax of its logits.

The engine's tests (tests/) import this too, through the path tests/conftest.py adds."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_hf_with_tokenizer(path: Path):
    """(tokenizer, model) of a checkpoint directory, on two threads as the CPU tests run."""
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    return AutoTokenizer.from_pretrained(path), load_hf(path)


def reset_rope_state(model) -> None:
    """Undoes what earlier calls left in a dynamic-NTK rotary embedding.

    transformers' dynamic rope keeps state between forward calls: `inv_freq` is recomputed only when a
    forward's length exceeds the longest seen so far (`max_seq_len_cached`), and put back only when a forward
    is shorter than max_position_embeddings. A prompt of 80 tokens after a generation that reached 104 would
    so get the frequencies of length 104. Each reference starts from the state of a fresh model instead."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "original_max_seq_len"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated after `prompt_len`, as an HF logits
    processor (HF has none for them)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_greedy(
    model,
    prompt: list[int],
    new_tokens: int,
    *,
    stop_at_eos: bool = False,
    bias: dict[int, float] | None = None,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> list[int]:
    """HF `generate(do_sample=False)` from a fresh rope state. Without `stop_at_eos`, eos is generated like
    any token (as the worker alone does: it never stops a request) and exactly `new_tokens` come back; with
    it, generation stops after an eos of the checkpoint's generation_config, as the engine's does.

    The options go through HF's own bias and repetition processors (bias first, HF's order) and OpenAI's
    penalties after them: the order docs/protocol.md gives."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    processors = []
    if bias:
        processors.append(SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}))
    if repetition != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition))
    if presence or frequency:
        processors.append(OpenAIPenalties(len(prompt), presence, frequency))
    reset_rope_state(model)
    extra = {} if stop_at_eos else {"eos_token_id": None}
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
            repetition_penalty=1.0,  # a checkpoint's generation config may have one; ours is in `processors`
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=model.generation_config.pad_token_id or 0,
            **extra,
        )
    tokens = out[0, len(prompt) :].tolist()
    assert stop_at_eos or len(tokens) == new_tokens, "HF stopped early: eos was not ignored"
    return tokens


def prompt_ids(tok, prompt: str | list[dict]) -> list[int]:
    """A text prompt's ids, or a chat's through the checkpoint's template with the generation prompt."""
    if isinstance(prompt, str):
        return tok(prompt).input_ids
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    """The logits after the whole prompt, from one forward of it alone (fresh rope state)."""
    reset_rope_state(model)
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0, -1]


def hf_logprobs(model, prompt: list[int], ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at each generated position: row i is what ids[i] was drawn from."""
    reset_rope_state(model)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits over a whole prompt in one forward: row p is what ids[p + 1] was drawn
    from."""
    reset_rope_state(model)
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def hf_greedy_join(
    model, prompt: list[int], join, new_tokens: int, *, stop_at_eos: bool = False
) -> list[int]:
    """`hf_greedy` with the options of a fake scheduler's `Join` (fake_steps.py)."""
    return hf_greedy(
        model,
        prompt,
        new_tokens,
        stop_at_eos=stop_at_eos,
        bias=dict(join.bias),
        repetition=join.repetition_penalty,
        presence=join.presence_penalty,
        frequency=join.frequency_penalty,
    )
