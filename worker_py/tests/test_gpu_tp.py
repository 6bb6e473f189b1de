"""Tensor parallelism on GPUs (NCCL): the collectives inside a captured CUDA graph, and two ranks' runner
with decode graphs and the fused kernels against one rank's, for a dense model and a Qwen3-MoE. Skipped
without two GPUs."""

from __future__ import annotations

import pytest
import torch

if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
    pytest.skip("needs two GPUs and NCCL", allow_module_level=True)

from fake_steps import StepBuilder  # noqa: E402
from tp_ranks import run_ranks  # noqa: E402

from minisgl.layers import comm  # noqa: E402
from minisgl.worker.config import WorkerConfig  # noqa: E402
from minisgl.worker.runner import ModelRunner  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 200, 300], list(range(300, 340))]
SLOTS = [2, 0, 1]
NEW_TOKENS = 16


def _captured_collectives(rank: int, tp: int) -> list[torch.Tensor]:
    x = torch.zeros(3, 5, device="cuda")
    # Once outside the capture first, as the runner's eager warm-up run does.
    comm.all_reduce(x.clone())
    comm.all_gather_columns(x, tp)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        summed = comm.all_reduce(x * 1)
        gathered = comm.all_gather_columns(x, tp)
    out = []
    for step in range(3):
        x.copy_(torch.arange(15, device="cuda", dtype=torch.float32).view(3, 5) * (rank + 1) + step)
        graph.replay()
        torch.cuda.synchronize()
        out.append((summed.clone(), gathered.clone(), x.clone()))
    return out


def test_all_reduce_and_all_gather_replay_inside_a_cuda_graph():
    ranks = run_ranks(_captured_collectives, 2, device="cuda")
    for step in range(3):
        inputs = [r[step][2] for r in ranks]
        for r in ranks:
            summed, gathered, _ = r[step]
            torch.testing.assert_close(summed, inputs[0] + inputs[1], rtol=0, atol=0)
            torch.testing.assert_close(gathered, torch.cat(inputs, dim=1), rtol=0, atol=0)


def _tokens(rank: int, tp: int, dirs: dict) -> dict:
    out = {}
    for name, path in dirs.items():
        config = WorkerConfig(
            model=str(path),
            device="cuda",
            dtype="float32",  # bit-different sums may flip a bf16 near-tie; float32 keeps the tokens equal
            num_pages=64,
            page_size=16,
            max_batch=8,
            max_step_tokens=256,
            tp=tp,
        )
        runner = ModelRunner(config, show_progress=False, tp_rank=rank)
        assert runner.graphs is not None, "decode steps replay graphs that hold the collectives"
        builder = StepBuilder(64, 16, seed=3)
        steps = [runner.run_step(builder.extend(list(zip(SLOTS, PROMPTS, strict=True))))]
        steps += [runner.run_step(builder.decode(SLOTS)) for _ in range(NEW_TOKENS - 1)]
        out[name] = torch.stack(steps, dim=1).tolist()
    return out


def _checkpoint(path, arch: str, **extra):
    """Head dim 64 (what every GPU attention kernel takes), an odd vocabulary (the last slice padded)."""
    import transformers

    kw = dict(
        vocab_size=2049,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**kw, **extra))
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def test_two_ranks_with_graphs_give_the_tokens_of_one(tmp_path):
    moe = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": True}
    dirs = {
        "qwen2": _checkpoint(tmp_path / "qwen2", "Qwen2"),
        "qwen3_moe": _checkpoint(tmp_path / "moe", "Qwen3Moe", **moe),
    }
    one = run_ranks(_tokens, 1, dirs, device="cuda")[0]
    two = run_ranks(_tokens, 2, dirs, device="cuda")
    assert two[0] == two[1] == one
