"""Every model family the worker serves against HF transformers, through the runner (CPU, fp32, torch
attention): prefill logits of prompts batched in one step, and greedy tokens with batched decode steps.

The checkpoints (hf_families.py) are small random models written as real checkpoints of each kind are on
disk. `qwen2_tiny` is the runner tests' own tiny Qwen2 (tiny_qwen.py): it proves this harness on a family
that loads today.

What transformers 5 computes for each rope type (modeling_rope_utils.py, LlamaRotaryEmbedding), which the
engine must match. d = the rotary dim (head_dim), theta = rope_theta, inv_freq_i = theta^(-2i/d) for i < d/2,
and cos/sin of position * inv_freq, rotate_half layout (first half of the head pairs with the second half):

- default: inv_freq as above; attention scaling 1.
- linear: every inv_freq_i divided by `factor` (the same as dividing the positions by it); scaling 1.
- llama3: with wavelen_i = 2*pi / inv_freq_i and L = original_max_position_embeddings: wavelen < L /
  high_freq_factor: kept; wavelen > L / low_freq_factor: divided by factor; in between: smoothed,
  (1 - s) * inv_freq / factor + s * inv_freq with s = (L / wavelen - low_freq_factor) / (high_freq_factor -
  low_freq_factor). Frequencies only; the same at every position; scaling 1.
- yarn: with L = original_max_position_embeddings (from rope_scaling; falling back to
  max_position_embeddings), beta_fast = 32 and beta_slow = 1 unless given: dim(r) = d * ln(L / (2*pi*r)) /
  (2 ln theta), low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)) (no floor/ceil when truncate is
  false), clamped to [0, d-1]; ramp_i = clamp((i - low) / (high - low), 0, 1) (high += 0.001 if equal);
  inv_freq_i = inv_freq_i / factor * ramp_i + inv_freq_i * (1 - ramp_i): the fast frequencies (i < low) are
  kept, the slow ones (i >= high) interpolated. The attention factor, `attention_factor` if given, else
  0.1 * ln(factor) + 1 (or, when both mscale and mscale_all_dim are given, the ratio
  (0.1 * mscale * ln f + 1) / (0.1 * mscale_all_dim * ln f + 1)), multiplies cos AND sin, so q and k are
  each scaled by it and the attention logits by its square (softmax scale stays head_dim^-0.5). The same at
  every position.
- dynamic (NTK): depends on the length of each forward call. With S = max(position in the call) + 1 and
  M = max_position_embeddings (not original_max_position_embeddings: dynamic ignores it): if S > M,
  theta' = theta * (factor * S / M - (factor - 1)) ^ (d / (d - 2)) and inv_freq = theta'^(-2i/d), computed in
  float32 tensor arithmetic; otherwise the plain frequencies. Scaling 1. With a KV cache, keys are cached
  already rotated, so each token keeps the frequencies of the forward that computed it: in `generate` (one
  sequence) the prompt's tokens all use theta'(prompt length), and the decode token at position p uses
  theta'(p + 1). So the engine must rotate each request's new tokens (queries and the keys it writes) with
  theta'(that request's seq_len after the step), per request in a batched step, and never re-rotate cached
  keys. That is reproducible per request; what is not: (1) a chunked prefill rotates a chunk with theta'(its
  end) where HF's one forward would use theta'(prompt length) for the whole prompt, so a prompt longer than M
  must be prefilled in one chunk to match HF (HF run with the same chunks matches the chunked engine); (2)
  HF's batched generate uses the longest sequence of the padded batch for every row; (3) transformers keeps
  the enlarged inv_freq across calls until a call shorter than M resets it (hf_reference.reset_rope_state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fake_steps import StepBuilder
from hf_families import FAMILIES, make_checkpoint, make_variant
from hf_reference import hf_greedy, hf_last_logits, load_hf
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker.runner import ModelRunner

torch.set_num_threads(2)

PAGE_SIZE = 4
NUM_PAGES = 160
MAX_BATCH = 8
MAX_STEP_TOKENS = 256
NEW_TOKENS = 24

SHORT = [1, 2, 3, 4, 5, 6, 7]
# 50 + 24 crosses position 64, the length past which the rope-scaled fixtures scale (dynamic NTK starts
# changing its frequencies there), during the decode steps; 80 starts past it.
CROSSING = [(11 * i + 5) % 500 + 1 for i in range(50)]
LONG = [(7 * i + 3) % 500 + 1 for i in range(80)]
PREFILL_PROMPTS = [SHORT, [100, 200, 300], [5] * 13, [42], LONG]
GREEDY_PROMPTS = [SHORT, CROSSING, LONG]

NAMES = ["qwen2_tiny", *FAMILIES]


def make_runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(
        cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, MAX_BATCH, MAX_STEP_TOKENS, attention="torch"),
        show_progress=False,
    )


@dataclass
class Case:
    name: str
    path: Path
    hf: torch.nn.Module
    greedy: list[list[int]] | None = None

    def hf_greedy(self) -> list[list[int]]:
        if self.greedy is None:
            self.greedy = [hf_greedy(self.hf, p, NEW_TOKENS) for p in GREEDY_PROMPTS]
        return self.greedy


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory) -> Case:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    if name == "qwen2_tiny":
        make_tiny_qwen(path)
    else:
        make_checkpoint(name, path)
    return Case(name, path, load_hf(path))


def generate(runner: ModelRunner, builder: StepBuilder, slots: list[int], prompts) -> list[list[int]]:
    """All prompts prefilled in one step, then decoded together; each request's tokens."""
    out = [runner.run_step(builder.extend(list(zip(slots, prompts, strict=True))))]
    for _ in range(NEW_TOKENS - 1):
        out.append(runner.run_step(builder.decode(slots)))
    return torch.stack(out, dim=1).tolist()


def test_prefill_logits_match_hf(case):
    runner = make_runner(case.path)
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=1)
    logits = runner.forward_logits(builder.extend(list(enumerate(PREFILL_PROMPTS))))
    assert logits.shape == (len(PREFILL_PROMPTS), case.hf.config.vocab_size)
    for i, prompt in enumerate(PREFILL_PROMPTS):
        expected = hf_last_logits(case.hf, prompt)
        scale = max(1.0, expected.abs().max().item())
        where = f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(
            logits[i].cpu(), expected, atol=1e-4 * scale, rtol=0, msg=lambda m, w=where: f"{w}: {m}"
        )


def test_greedy_batch_matches_hf(case):
    runner = make_runner(case.path)
    slots = [5, 0, 3]  # slots need not follow request order
    got = generate(runner, StepBuilder(NUM_PAGES, PAGE_SIZE, seed=2), slots, GREEDY_PROMPTS)
    for prompt, tokens, expected in zip(GREEDY_PROMPTS, got, case.hf_greedy(), strict=True):
        assert tokens == expected, f"prompt of {len(prompt)} tokens"


def test_greedy_alone_on_recycled_pages_matches_hf(case):
    """The longest prompt alone, its pages recycled from an earlier request: the same tokens as HF."""
    runner = make_runner(case.path)
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=3)
    generate(runner, builder, [1], [CROSSING])
    builder.release(1)
    assert generate(runner, builder, [1], [LONG]) == [case.hf_greedy()[2]]


# Config fields the engine does not implement: construction must fail, and say which field (or, for a rope
# type, which type).
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0] * 8,
    "long_factor": [2.0] * 8,
    "original_max_position_embeddings": 64,
}
REFUSED = {
    "mistral_sliding_window": ("mistral", {"sliding_window": 32}, "sliding_window"),
    "qwen2_use_sliding_window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0},
        "sliding_window",
    ),
    "qwen3_use_sliding_window": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0},
        "sliding_window",
    ),
    "rope_scaling_longrope": ("llama3", {"rope_scaling": LONGROPE}, "longrope|rope_scaling"),
    "rope_parameters_unknown": (
        "llama_dynamic",
        {"rope_parameters": {"rope_type": "made_up_rope", "factor": 2.0, "rope_theta": 10000.0}},
        "made_up_rope",
    ),
    "rope_scaling_unknown_type_key": (
        "llama_linear",
        {"rope_scaling": {"type": "made_up_rope", "factor": 4.0}},
        "made_up_rope",
    ),
    "hidden_act_gelu": ("llama3", {"hidden_act": "gelu"}, "hidden_act"),
}


@pytest.mark.parametrize("variant", list(REFUSED))
def test_unimplemented_config_fails_at_load_naming_the_field(variant, tmp_path):
    base, edits, field = REFUSED[variant]
    path = make_variant(base, tmp_path / variant, edits)
    with pytest.raises(Exception, match=field):
        make_runner(path)
