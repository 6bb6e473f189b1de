"""The GPU paths against the reference paths: FlashInfer against the torch backend, graph replay against eager
runs, the overlapped loop against one step at a time. Skipped without CUDA or without flashinfer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from fake_steps import Join, ReadySteps, StepBuilder

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from minisgl.sampling.params import PROMPT_SEEN, SampleMode  # noqa: E402
from minisgl.worker.config import WorkerConfig  # noqa: E402
from minisgl.worker.loop import run_steps  # noqa: E402
from minisgl.worker.runner import ModelRunner  # noqa: E402
from minisgl.worker.token_rows import token_rows  # noqa: E402

PAGE_SIZE, NUM_PAGES, MAX_BATCH = 16, 256, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Qwen2.5-0.5B's head layout (head_dim 64, group size 7) in a small random model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=448,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=7,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpu_qwen")
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def runner(model_dir, **kw) -> ModelRunner:
    args = {"attention": "flashinfer", "cuda_graphs": False, "fused_kernels": True} | kw
    if args["attention"] == "torch":
        args.setdefault("decode_attention", "torch")
    config = WorkerConfig(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        num_pages=NUM_PAGES,
        page_size=PAGE_SIZE,
        max_batch=MAX_BATCH,
        max_step_tokens=1024,
    )
    return ModelRunner(replace(config, **args), show_progress=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def mixed_steps(seed: int):
    """Prefill (one prompt chunked), a mixed extend (decodes, the second chunk, a new prompt with a prefix
    already cached by the chunk before), then decodes; explicit token ids so nothing depends on sampling."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, 2048, n).tolist()  # noqa: E731
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=seed)
    long = ids(150)
    yield b.extend([(0, ids(40)), (1, long[:70]), (2, ids(5))])
    yield b.extend([(0, ids(1)), (1, long[70:]), (2, ids(1)), (5, ids(33))])
    for _ in range(6):
        yield b.decode([0, 1, 2, 5], ids(4))
    for slots in ([0, 2], [5, 1, 0], [2]):  # decode batches of other sizes re-plan the same wrapper
        yield b.decode(slots, ids(len(slots)))


@pytest.mark.parametrize("decode", ["flashinfer", "triton"])
@pytest.mark.parametrize("fused", [False, True])
def test_flashinfer_matches_the_torch_backend(model_dir, fused, decode):
    ref = runner(model_dir, attention="torch")
    fi = runner(model_dir, fused_kernels=fused, decode_attention=decode)
    assert fi.fused_kernels == fused and fi.small_m_kernels == fused
    for step_ref, step_fi in zip(mixed_steps(1), mixed_steps(1), strict=True):
        want, got = ref.forward_logits(step_ref), fi.forward_logits(step_fi)
        assert got.shape == want.shape
        assert rel_err(got, want) < 2e-2


def test_triton_attention_matches_the_torch_backend(model_dir):
    """`--attention triton`: eager extend steps through the Triton extend kernel, decodes through the decode
    kernel, one backend for both and no FlashInfer; the logits of the torch reference's."""
    from minisgl.attention.triton import TritonBackend

    ref = runner(model_dir, attention="torch")
    ours = runner(model_dir, attention="triton")
    assert isinstance(ours.attn, TritonBackend)
    for step_ref, step_ours in zip(mixed_steps(1), mixed_steps(1), strict=True):
        want, got = ref.forward_logits(step_ref), ours.forward_logits(step_ours)
        assert got.shape == want.shape
        assert rel_err(got, want) < 2e-2


def test_small_m_in_the_model_computes_what_cublas_does(model_dir, monkeypatch):
    """small_m's variants in the model (q/k/v with RoPE, o, down, gate/up with SiLU, the LM head), given
    tiles for this model's shapes, against the model without small_m: the same logits up to rounding, in
    eager steps and in graphs launched early."""
    from minisgl.kernels import small_m

    # Without small_m first: the layers consult TILES at every eager call.
    without = runner(model_dir, cuda_graphs=True)
    want_logits = [without.forward_logits(step).clone() for step in mixed_steps(6)]
    want_tokens = [without.run_step(step).tolist() for step in mixed_steps(7)]
    del without
    tile = small_m.Tile(16, 128, 4, 2)
    split = tile._replace(split_k=4)  # several programs per strip: the partial sums and their counters
    tiles = {
        (576, 448, small_m.ROPE): split._replace(block_k=64),
        (448, 448, small_m.LINEAR): tile,
        (448, 1024, small_m.LINEAR): split,
        (2048, 448, small_m.SILU): tile,
        (2048, 448, small_m.LINEAR): tile,  # the LM head
    }
    monkeypatch.setattr(small_m, "TILES", tiles)
    with_small_m = runner(model_dir, cuda_graphs=True)
    for step, want in zip(mixed_steps(6), want_logits, strict=True):
        assert rel_err(with_small_m.forward_logits(step), want) < 1e-2
    same = total = 0
    for step, want in zip(mixed_steps(7), want_tokens, strict=True):
        got = with_small_m.run_step(step).tolist()
        same += sum(g == w for g, w in zip(got, want, strict=True))
        total += len(want)
    assert same >= 0.9 * total  # near ties may go either way: the products round differently
    (counters,) = small_m._COUNTERS.values()
    assert not counters.any()


def test_small_prefills_compile_no_kernel_after_the_start(model_dir, monkeypatch):
    """A small prefill runs the LM head on its last rows eagerly, where the graphs' kernels (launched early)
    do not serve: its variants compile when the runner starts, not inside the first requests."""
    from triton import knobs

    from minisgl.kernels import small_m

    monkeypatch.setattr(small_m, "TILES", {(2048, 448, small_m.LINEAR): small_m.Tile(16, 128, 4, 2)})
    r = runner(model_dir, cuda_graphs=True)
    compiled = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *, fn, **_: compiled.append(fn.name))
    rng = np.random.default_rng(0)
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=0)
    for n in (1, 3, 16):
        slots = list(range(n))
        prompts = [(s, rng.integers(0, 2048, 20).tolist()) for s in slots]
        r.run_step(b.extend(prompts, [Join(s) for s in slots]))
        for s in slots:
            b.release(s)
    assert not [name for name in compiled if "small_m" in name], compiled


@pytest.mark.parametrize("decode", ["flashinfer", "triton"])
def test_graph_replay_equals_eager(model_dir, decode):
    eager = runner(model_dir, decode_attention=decode)
    # The prefills run eagerly in both (test_small_extend_steps_replay_token_row_graphs has their graphs).
    graphed = runner(model_dir, cuda_graphs=True, decode_attention=decode, extend_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    for n in (3, 5, 16):  # padded to 4 and 8; 16 needs no padding
        slots = list(range(n))
        rng = np.random.default_rng(n)
        b_e, b_g = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=n), StepBuilder(NUM_PAGES, PAGE_SIZE, seed=n)
        prompts = [(s, rng.integers(0, 2048, 20 + 3 * s).tolist()) for s in slots]
        tokens = eager.run_step(b_e.extend(prompts)).tolist()
        assert graphed.run_step(b_g.extend(prompts)).tolist() == tokens
        same = total = 0
        for _ in range(12):
            # Teacher forcing: both get the eager run's tokens, so one near-tie cannot derail the rest.
            step_e, step_g = b_e.decode(slots, tokens), b_g.decode(slots, tokens)
            assert graphed.graphs.padding_for(step_g) is not None
            got = graphed.run_step(step_g).tolist()
            tokens = eager.run_step(step_e).tolist()
            same += sum(g == t for g, t in zip(got, tokens, strict=True))
            total += n
        # Graph mode splits the KV scan its own fixed way, eager mode by the step: sums differ in rounding.
        assert same >= 0.95 * total
        for s in slots:
            b_e.release(s)
            b_g.release(s)


def test_small_extend_steps_replay_token_row_graphs(model_dir):
    """Extend steps of up to 512 tokens replay a hidden-state graph of one row per new token (token_rows.py):
    their logits equal the eager extend's, fresh prompts, a chunk continuing a cached prefix and a mixed step
    with decodes alike; through launch they give the eager path's tokens."""
    # More pages than the steps use: the rows of a step list their request's pages each, and the index
    # buffer of the graphs (pages + max_batch) must hold them.
    eager = runner(model_dir, cuda_graphs=True, extend_graphs=False, num_pages=1024)
    graphed = runner(model_dir, cuda_graphs=True, num_pages=1024)
    assert graphed.graphs.token_sizes[-1] == 512 and not eager.graphs.token_sizes
    for step_e, step_g in zip(mixed_steps(4), mixed_steps(4), strict=True):
        want = eager.forward_logits(step_e)
        if step_g.kind != 0:
            graphed.forward_logits(step_g)
            continue
        with torch.inference_mode():
            rows = token_rows(step_g, PAGE_SIZE, MAX_BATCH)
            padding = graphed.graphs.padding_for_tokens(rows.step)
            assert padding is not None and padding.rows == 128
            graphed.graphs.replay_hidden(graphed.uploader.upload(rows.step, padding), padding.rows)
            # The graph gathered each request's last row, its slot and its length, in request order.
            n, last = len(step_g.req_slot), graphed.last_rows
            got = graphed.model.compute_logits(last.hidden[:n])
            assert last.slot[:n].tolist() == step_g.req_slot.tolist()
            assert last.seq_len[:n].tolist() == step_g.seq_len.tolist()
            assert set(last.slot[n:MAX_BATCH].tolist()) == {MAX_BATCH}  # the scratch slot
            graphed.uploader.finish()
        assert got.shape == want.shape and rel_err(got, want) < 2e-2

    eager, graphed = (
        runner(model_dir, cuda_graphs=True, extend_graphs=False, num_pages=1024),
        runner(model_dir, cuda_graphs=True, num_pages=1024),
    )
    replays, replay_hidden = [], graphed.graphs.replay_hidden
    graphed.graphs.replay_hidden = lambda batch, rows: replays.append(rows) or replay_hidden(batch, rows)
    same = total = 0
    for step_e, step_g in zip(mixed_steps(5), mixed_steps(5), strict=True):
        want, got = eager.run_step(step_e).tolist(), graphed.run_step(step_g).tolist()
        same += sum(g == w for g, w in zip(got, want, strict=True))
        total += len(want)
    assert replays == [128, 128]
    assert same >= 0.9 * total


def test_extend_steps_replay_extend_graphs(model_dir):
    """With `extend_graph_tokens` and no token-row graphs (`token_graph_tokens=0`), extend steps are padded
    to a graph's token count and the batch's requests and replayed through the Triton extend kernel: their
    logits equal the eager extend's (FlashInfer's prefill), fresh prompts, a continued chunk and a mixed step
    alike; through launch they give the eager path's tokens."""
    eager = runner(model_dir, cuda_graphs=True, extend_graphs=False, num_pages=1024)
    graphed = runner(
        model_dir, cuda_graphs=True, num_pages=1024, extend_graph_tokens=1024, token_graph_tokens=0
    )
    assert graphed.graphs.extend_sizes == [512, 1024] and graphed.graphs.token_sizes == []
    for step_e, step_g in zip(mixed_steps(4), mixed_steps(4), strict=True):
        want = eager.forward_logits(step_e)
        if step_g.kind != 0:
            graphed.forward_logits(step_g)
            continue
        with torch.inference_mode():
            padding = graphed.graphs.padding_for_extend(step_g)
            assert padding is not None and (padding.tokens, padding.reqs) == (512, MAX_BATCH)
            batch = graphed.uploader.upload(step_g, padding)
            hidden = graphed.graphs.replay_extend(batch, padding.tokens)
            n, last = len(step_g.req_slot), graphed.last_rows
            got = graphed.model.compute_logits(hidden[batch.qo_indptr[1 : n + 1] - 1])
            assert torch.equal(last.hidden[:n], hidden[batch.qo_indptr[1 : n + 1] - 1])
            assert last.slot[:n].tolist() == step_g.req_slot.tolist()
            assert set(last.slot[n:MAX_BATCH].tolist()) == {MAX_BATCH}
            graphed.uploader.finish()
        assert got.shape == want.shape and rel_err(got, want) < 2e-2

    eager = runner(model_dir, cuda_graphs=True, extend_graphs=False, num_pages=1024)
    graphed = runner(
        model_dir, cuda_graphs=True, num_pages=1024, extend_graph_tokens=1024, token_graph_tokens=0
    )
    replays, replay_extend = [], graphed.graphs.replay_extend
    graphed.graphs.replay_extend = lambda batch, t: replays.append(t) or replay_extend(batch, t)
    same = total = 0
    for step_e, step_g in zip(mixed_steps(5), mixed_steps(5), strict=True):
        want, got = eager.run_step(step_e).tolist(), graphed.run_step(step_g).tolist()
        same += sum(g == w for g, w in zip(got, want, strict=True))
        total += len(want)
    assert replays == [512, 512]
    assert same >= 0.9 * total


def test_graph_logits_equal_eager_logits(model_dir):
    eager, graphed = runner(model_dir), runner(model_dir, cuda_graphs=True)
    steps_e, steps_g = list(mixed_steps(2)), list(mixed_steps(2))
    for step_e, step_g in zip(steps_e[:3], steps_g[:3], strict=True):
        eager.forward_logits(step_e)
        graphed.forward_logits(step_g)
    step_e, step_g = steps_e[3], steps_g[3]
    want = eager.forward_logits(step_e)
    with torch.inference_mode():
        padding = graphed.graphs.padding_for(step_g)
        assert padding is not None and padding.rows == 4
        got = graphed.graphs.replay(graphed.uploader.upload(step_g, padding), padding.rows)[:4]
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("option", ["pdl", "prefetch_weights"])
def test_graphs_launched_early_compute_what_the_others_do(model_dir, option):
    """With PDL (kernels/pdl.py) a kernel starts early but waits for the one before; with small_m's weight
    prefetch its programs first ask for their weights into L2: the same bits either way."""
    on = runner(model_dir, cuda_graphs=True, **{option: True})  # its small graphs captured with the option
    off = runner(model_dir, cuda_graphs=True, **{option: False})
    steps_on, steps_off = list(mixed_steps(4)), list(mixed_steps(4))
    for step_on, step_off in zip(steps_on[:-1], steps_off[:-1], strict=True):
        assert on.run_step(step_on).tolist() == off.run_step(step_off).tolist()
    with torch.inference_mode():
        logits = []
        for r, step in ((on, steps_on[-1]), (off, steps_off[-1])):
            padding = r.graphs.padding_for(step)
            logits.append(r.graphs.replay(r.uploader.upload(step, padding), padding.rows).clone())
    assert torch.equal(*logits)


def test_short_context_twins_compute_what_the_graphs_planned_for_long_contexts_do(model_dir):
    """`--short-graph-context 128`: a decode step whose longest context is at most 128 tokens replays the twin
    planned for it (one attention kernel, no combine), a longer one the graph planned for long contexts; the
    logits are those of a runner without twins, up to the order of the attention's sums."""
    twins = runner(model_dir, cuda_graphs=True, decode_attention="triton", short_graph_context=128)
    plain = runner(model_dir, cuda_graphs=True, decode_attention="triton")
    assert twins.graphs.short_sizes == [1, 2, 4, 8, 16] and plain.graphs.short_sizes == []
    captured = twins.graphs.captured()
    assert ("short-decode", 4, None) in captured and ("short-sampling", 4, SampleMode.GREEDY) in captured
    steps_t, steps_p = list(mixed_steps(5)), list(mixed_steps(5))
    for r, steps in ((twins, steps_t), (plain, steps_p)):
        for step in steps[:2]:
            r.run_step(step)
    shorts = []
    with torch.inference_mode():
        for step_t, step_p in zip(steps_t[2:], steps_p[2:], strict=True):
            logits = []
            for r, step in ((twins, step_t), (plain, step_p)):
                padding = r.graphs.padding_for(step)
                batch = r.uploader.upload(step, padding)
                logits.append(r.graphs.replay(batch, padding.rows)[: len(step.req_slot)].clone())
                r.uploader.finish()
                if r is twins:
                    shorts.append(twins.graphs._replayed_short[padding.rows])
            assert rel_err(*logits) < 1e-2
    # Slot 1 holds a prompt of 150 tokens: it is in the first six decodes and in [5, 1, 0].
    assert shorts == [False] * 6 + [True, False, True]


@pytest.mark.parametrize(
    "joins, mode",
    [
        ([Join(0), Join(1), Join(2)], SampleMode.GREEDY),
        ([Join(0), Join(1, temperature=0.7, seed=3), Join(2, temperature=1.3, seed=4)], SampleMode.PLAIN),
        (
            [Join(0, temperature=0.8, top_p=0.9, seed=5), Join(1, top_k=7, temperature=1.0), Join(2)],
            SampleMode.FILTERED,
        ),
    ],
)
def test_sampling_replayed_in_the_graph_equals_sampling_after_it(model_dir, joins, mode):
    """The sampling graph of each mode gives the tokens that sampling the same logits eagerly gives (three
    requests padded to four rows), and sets the slots' last tokens that the next step reads."""
    r = runner(model_dir, cuda_graphs=True, graph_sampling=True)
    assert r.graphs.samples and not runner(model_dir, cuda_graphs=True, graph_sampling=False).graphs.samples
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=9)
    slots = [j.slot for j in joins]
    rng = np.random.default_rng(9)
    r.run_step(b.extend([(s, rng.integers(0, 2048, 25 + s).tolist()) for s in slots], joins))
    for _ in range(6):
        step = b.decode(slots)
        with torch.inference_mode():
            padding = r.graphs.padding_for(step)
            plan = r.sampler.plan_for(np.asarray(step.req_slot))
            assert padding is not None and padding.rows == 4 and plan.mode == mode and plan.graphable
            batch = r.uploader.upload(step, padding)
            logits = r.graphs.replay(batch, padding.rows)[:3]
            want = r.sampler.sample(logits, batch.req_slot[:3], batch.seq_len[:3], plan)
            got = r.graphs.replay_sampled(batch, padding.rows, plan.mode)[:3]
            assert torch.equal(got, want)
            assert torch.equal(r.last_token[batch.req_slot[:3].long()], want)
            r.uploader.finish()


def sampled_steps(seed: int):
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=seed)
    rng = np.random.default_rng(seed)
    joins = [Join(0), Join(3, temperature=0.8, top_p=0.9, seed=7), Join(4, temperature=1.0, seed=8)]
    yield b.extend([(s, rng.integers(0, 2048, 30 + s).tolist()) for s in (0, 3, 4)], joins)
    for _ in range(20):
        yield b.decode([4, 0, 3])


@pytest.mark.parametrize("decode", ["flashinfer", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
def test_overlapped_loop_equals_one_step_at_a_time(model_dir, graphs, decode):
    sequential = runner(model_dir, cuda_graphs=graphs, decode_attention=decode)
    overlapped = runner(model_dir, cuda_graphs=graphs, decode_attention=decode)
    want = [(s.step_id, sequential.run_step(s).tolist()) for s in sampled_steps(3)]
    ring = ReadySteps(list(sampled_steps(3)))
    assert run_steps(overlapped, ring, ring, overlap=True) == 0
    assert ring.results == want


OPTION_PROMPTS = {s: np.random.default_rng(s).integers(0, 2048, 30 + s).tolist() for s in (0, 3, 4, 6)}
OPTION_JOINS = [
    Join(0, repetition_penalty=1.3, logprobs=5),
    Join(
        3, temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.8, min_p=0.05, bias=((11, 2.0), (12, -50.0))
    ),
    Join(4, temperature=1.0, seed=8, frequency_penalty=0.5, logprobs=0),
    Join(6, temperature=0.9, seed=9),  # no option
]
DECODE_ORDER = [4, 0, 6, 3]


def option_steps(builder: StepBuilder, decodes: int = 20):
    """A prefill whose requests use every sampling option (and one none), then decodes."""
    yield builder.extend(list(OPTION_PROMPTS.items()), OPTION_JOINS)
    for _ in range(decodes):
        yield builder.decode(DECODE_ORDER)


@pytest.mark.parametrize("graphs", [False, True])
def test_sampling_options_overlapped_equal_one_step_at_a_time(model_dir, graphs):
    """Bias, penalties (their token counts), min_p and logprobs on the GPU path, graphs or not: the overlapped
    loop gives the tokens and logprobs of steps run one at a time."""
    one, overlapped = runner(model_dir, cuda_graphs=graphs), runner(model_dir, cuda_graphs=graphs)
    a = ReadySteps(list(option_steps(StepBuilder(NUM_PAGES, PAGE_SIZE, seed=5))))
    b = ReadySteps(list(option_steps(StepBuilder(NUM_PAGES, PAGE_SIZE, seed=5))))
    assert run_steps(one, a, a, overlap=False) == 0
    assert run_steps(overlapped, b, b, overlap=True) == 0
    assert a.results == b.results
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x is not None and y is not None  # requests 0 and 4 ask in every step
        assert x.top_ids.shape == (4, 5) and np.array_equal(x.top_ids, y.top_ids)
        assert np.array_equal(x.logprob, y.logprob) and np.array_equal(x.top_logprobs, y.top_logprobs)
        lse = np.log(np.exp(x.top_logprobs.astype(np.float64)).sum(axis=1))
        assert np.all(x.top_logprobs <= 0) and np.all(lse <= 1e-3)  # logprobs of one distribution
    assert torch.equal(one.sampler.counts.counts, overlapped.sampler.counts.counts)


@pytest.mark.parametrize("graphs", [False, True])
def test_token_ids_beside_the_kv_and_the_counts_are_the_sequences(model_dir, graphs):
    """Every fed token's id is written beside its KV (inside the replayed graph for decode steps), and the
    penalized requests' counts are exactly their prompts (seen) and fed-back samples (counted)."""
    r = runner(model_dir, cuda_graphs=graphs)
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=6)
    steps = list(option_steps(builder, decodes=12))
    if graphs:
        assert r.graphs.padding_for(steps[1]) is not None
    ready = ReadySteps(steps)
    assert run_steps(r, ready, ready, overlap=False) == 0
    sampled = {s: [] for s in OPTION_PROMPTS}
    for i, (_, tokens) in enumerate(ready.results):
        for s, t in zip(list(OPTION_PROMPTS) if i == 0 else DECODE_ORDER, tokens, strict=True):
            sampled[s].append(t)
    vocab = r.model_config.vocab_size
    for s, prompt in OPTION_PROMPTS.items():
        fed = prompt + sampled[s][:-1]  # the last sample was never fed back
        pages = builder.pages[s]
        locs = [pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(len(fed))]
        assert r.kv_cache.token_ids[torch.tensor(locs, device="cuda")].tolist() == fed, s
        if s == 6:
            continue  # no penalties: its counts are never read
        want = torch.zeros(vocab, dtype=torch.int64)
        want[torch.tensor(prompt)] = PROMPT_SEEN
        want += torch.bincount(torch.tensor(sampled[s][:-1]), minlength=vocab)
        assert torch.equal(r.sampler.counts.counts[s].cpu().long(), want), s


def test_kv_cache_sized_from_free_memory(model_dir):
    r = runner(model_dir, num_pages=None, kv_fraction=0.02, cuda_graphs=True)
    free, _ = torch.cuda.mem_get_info()
    assert r.num_pages > 0 and (r.num_pages + 1) * PAGE_SIZE < 2**31
    assert r.kv_cache.num_pages == r.num_pages + 1  # the graphs' scratch page
    assert r.kv_cache.nbytes < 0.05 * (free + r.kv_cache.nbytes)


def test_prompt_logprobs_through_flashinfer_and_graphs_equal_hf(model_dir):
    """The prompt-logprobs path on the GPU (bf16, FlashInfer, graphs captured for the decodes between): a
    prompt over two chunks, the second in a step beside a decoding request, gives HF's log_softmax over the
    whole prompt (float32) within bf16 rounding, and a decode step in between asks for none."""
    from hf_reference import hf_prompt_logprobs, load_hf

    rng = np.random.default_rng(7)
    prompt, other = rng.integers(0, 2048, 300).tolist(), rng.integers(0, 2048, 9).tolist()
    targets = [prompt[p + 1] if p + 1 < len(prompt) else -1 for p in range(len(prompt))]
    top, cut = 5, 170
    b = StepBuilder(NUM_PAGES, PAGE_SIZE)
    steps = [
        b.extend(
            [(1, other), (0, prompt[:cut])],
            joins=[Join(0), Join(1)],
            targets=[-1] * len(other) + targets[:cut],
            prompt_top=top,
        ),
        b.decode([1]),
        # Slot 1 decodes its last sample (-(slot + 1)) beside the prompt's second chunk.
        b.extend([(1, [-2]), (0, prompt[cut:])], targets=[-1] + targets[cut:], prompt_top=top),
    ]
    ready = ReadySteps(steps)
    assert run_steps(runner(model_dir, cuda_graphs=True), ready, ready) == 0
    assert ready.prompt[1] is None
    got = [p for p in ready.prompt if p is not None]
    logprob = torch.from_numpy(np.concatenate([p.logprob for p in got]))
    top_ids = torch.from_numpy(np.concatenate([p.top_ids for p in got]))
    n = len(prompt) - 1
    assert logprob.shape == (n,) and top_ids.shape == (n, top)
    # HF in float32 on the CPU (the checkpoint's bf16 weights, widened exactly): `.to(torch.bfloat16)` would
    # also round HF's rotary inv_freq buffer, which is wrong by radians at position 300.
    ref = hf_prompt_logprobs(load_hf(model_dir), prompt)
    want = ref[torch.arange(n), torch.tensor(prompt[1:])]
    err = (logprob - want).abs()
    assert err.mean() < 0.02 and err.max() < 0.15, (err.mean(), err.max())
    # The most likely token is HF's wherever HF's margin to the runner-up is beyond bf16 rounding.
    values, ids = ref[:n].topk(2, dim=-1)
    clear = (values[:, 0] - values[:, 1]) > 0.1
    assert (top_ids[:, 0] == ids[:, 0])[clear].all()
