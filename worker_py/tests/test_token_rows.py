"""An extend step as one decode row per new token (minisgl.worker.token_rows): the arrays by hand for a small
case, and on the CPU the forward of the rows equals the eager extend forward at each request's last token,
for fresh prompts, prompts that continue a cached prefix across pages, and a mixed step with decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_steps import Join, ReadySteps, StepBuilder
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.sampling.params import SampleMode
from minisgl.worker.cuda_graph import EXTEND, TOKEN_ROWS, DecodeGraphs
from minisgl.worker.last_rows import LastRows
from minisgl.worker.loop import run_steps
from minisgl.worker.padding import bucket_for, graph_batch_sizes, token_graph_sizes
from minisgl.worker.runner import ModelRunner
from minisgl.worker.token_rows import token_rows

torch.set_num_threads(1)

PAGE_SIZE, NUM_PAGES, SCRATCH = 4, 64, 9


def test_rows_by_hand():
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=1)
    b.extend([(2, [1, 2, 3, 4, 5])])  # slot 2 has 5 tokens cached: pages p0 (full) and p1 (1 token)
    step = b.extend([(2, [6, 7, 8, 9]), (5, [10, 11])])
    p0, p1, p2 = b.pages[2]
    (q0,) = b.pages[5]
    rows = token_rows(step, PAGE_SIZE, SCRATCH)
    r = rows.step
    assert r.req_slot.tolist() == [SCRATCH, SCRATCH, SCRATCH, 2, SCRATCH, 5]
    assert rows.token_slot.tolist() == [2, 2, 2, 2, 5, 5]
    assert r.seq_len.tolist() == [6, 7, 8, 9, 1, 2]
    assert r.qo_indptr.tolist() == list(range(7))
    assert r.kv_indptr.tolist() == [0, 2, 4, 6, 9, 10, 11]
    assert r.kv_indices.tolist() == [p0, p1, p0, p1, p0, p1, p0, p1, p2, q0, q0]
    assert r.kv_last_page_len.tolist() == [2, 3, 4, 1, 1, 2]
    # The tokens' own arrays, the step id and the joins are the step's.
    for name in ("input_ids", "positions", "out_loc", "join_slot"):
        assert np.array_equal(getattr(r, name), getattr(step, name))
    assert r.step_id == step.step_id and len(r.req_slot) == len(r.input_ids) == 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=3)


@pytest.fixture(scope="module")
def runner(model_dir):
    # max_batch 32: forward_logits checks the rows step against it (launch checks the step itself)
    return ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 32, 64), show_progress=False)


def test_rows_forward_equals_the_extend_forward(runner):
    rng = np.random.default_rng(0)
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=2)
    runner.run_step(b.extend([(0, rng.integers(0, 100, 7).tolist()), (1, rng.integers(0, 100, 3).tolist())]))
    cases = [
        [(0, rng.integers(0, 100, 6).tolist()), (2, rng.integers(0, 100, 9).tolist())],  # cached and fresh
        [(1, [-2]), (3, rng.integers(0, 100, 5).tolist()), (0, [-1])],  # a mixed step: two decodes
    ]
    for reqs in cases:
        step = b.extend(reqs)
        want = runner.forward_logits(step)
        rows = token_rows(step, PAGE_SIZE, runner.max_batch)
        got = runner.forward_logits(rows.step)
        assert got.shape[0] == len(step.input_ids)
        last = torch.from_numpy(step.qo_indptr[1:] - 1).long()
        torch.testing.assert_close(got[last], want, rtol=1e-5, atol=1e-5)


class EagerGraphs(DecodeGraphs):
    """The graphs' replays run eagerly after a plain plan: the runner's graph paths (padding, token rows,
    sampling in the graph) on the CPU, where nothing can be captured."""

    def replay(self, batch, rows):
        self._attn.plan(batch)
        self._replayed = batch, self._forward(batch)
        return self._replayed[1]

    def replay_sampling(self, rows, mode):
        return self._sample(*self._replayed, mode)

    def replay_hidden(self, batch, rows):
        self._attn.plan(batch)
        return self.run_hidden(batch, TOKEN_ROWS)

    def replay_extend(self, batch, tokens):
        self._attn.plan(batch)
        return self.run_hidden(batch, EXTEND)

    def replay_last_sampling(self, num_reqs, mode):
        return self._sample_last(bucket_for(num_reqs, self.sizes), mode)


def with_eager_graphs(
    model_dir,
    token_sizes=None,
    extend_sizes=(),
    *,
    num_pages=NUM_PAGES,
    page_size=PAGE_SIZE,
    max_batch=8,
    max_tokens=64,
    graphs=EagerGraphs,
) -> ModelRunner:
    """A CPU runner whose graph paths run through `graphs` (a `DecodeGraphs` whose replays run eagerly, or
    do whatever a benchmark needs: scripts/bench_host_path.py)."""
    # The last page is the padding rows' scratch page: the steps below never hand it out.
    r = ModelRunner(cpu_config(model_dir, num_pages, page_size, max_batch, max_tokens), show_progress=False)
    r.last_rows = LastRows(max_batch, r.model_config.hidden_size, r.dtype, r.device, scratch_slot=max_batch)
    r.graphs = graphs(
        r._forward_logits,
        r.attn,
        r.uploader,
        graph_batch_sizes(max_batch),
        scratch_page=num_pages - 1,
        scratch_slot=max_batch,
        page_size=page_size,
        max_kv_indices=4 * num_pages,
        sample=r._sample_rows,
        hidden=r._forward_hidden,
        last_rows=r.last_rows,
        sample_last=r._sample_last_rows,
        token_sizes=token_graph_sizes(512, max_tokens) if token_sizes is None else token_sizes,
        extend_sizes=extend_sizes,
        extend_reqs=max_batch,
    )
    return r


def launch_steps(seed: int):
    """Prefills with sampling options (penalties count the prompt by token_slot, logprobs read the gathered
    logits), a mixed step with a cached prefix, then decodes."""
    rng = np.random.default_rng(seed)
    b = StepBuilder(NUM_PAGES - 1, PAGE_SIZE, seed=seed)
    joins = [
        Join(0),
        Join(1, temperature=0.8, top_p=0.9, seed=3),
        Join(2, repetition_penalty=1.3, presence_penalty=0.5, logprobs=3),
        Join(3, temperature=1.0, seed=4, logprobs=0),
    ]
    yield b.extend([(s, rng.integers(0, 100, 5 + 3 * s).tolist()) for s in range(4)], joins)
    yield b.extend([(0, [-1]), (1, rng.integers(0, 100, 6).tolist()), (2, [-3]), (4, [7, 8, 9])], [Join(4)])
    for _ in range(4):
        yield b.decode([4, 0, 1, 2, 3])


def assert_same_outputs(plain: ModelRunner, a: ReadySteps, graphed: ModelRunner, b: ReadySteps) -> None:
    """The two runners' tokens, logprobs and penalty counts after the same steps are the same."""
    assert a.results == b.results
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        np.testing.assert_allclose(x.logprob, y.logprob, atol=1e-5)
        assert np.array_equal(x.top_ids, y.top_ids)
    assert torch.equal(plain.sampler.counts.counts, graphed.sampler.counts.counts)


def test_launch_through_token_rows_equals_the_eager_runner(model_dir):
    """Through launch, steps run as token rows (and decodes as padded rows, sampled in the 'graph') give the
    eager runner's tokens, logprobs and penalty counts."""
    plain, graphed = (
        ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False),
        with_eager_graphs(model_dir),
    )
    hidden_rows, replay_hidden = [], graphed.graphs.replay_hidden
    graphed.graphs.replay_hidden = lambda batch, rows: hidden_rows.append(rows) or replay_hidden(batch, rows)
    a, b = ReadySteps(list(launch_steps(1))), ReadySteps(list(launch_steps(1)))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert hidden_rows == [64, 16]  # 5 + 8 + 11 + 14 = 38 tokens, then 1 + 6 + 1 + 3 = 11
    assert_same_outputs(plain, a, graphed, b)


def test_launch_through_extend_graphs_equals_the_eager_runner(model_dir):
    """With extend graphs and no token-row graphs, extend steps are padded to a graph's token count and to
    max_batch requests (tokens and requests of nobody, `ExtendPadding`), and give the eager runner's tokens,
    logprobs and penalty counts; decodes still take the decode graphs."""
    plain, graphed = (
        ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False),
        with_eager_graphs(model_dir, token_sizes=(), extend_sizes=[16, 32, 64]),
    )
    tokens, replay_extend = [], graphed.graphs.replay_extend
    graphed.graphs.replay_extend = lambda batch, t: (
        tokens.append((t, batch.num_reqs)) or replay_extend(batch, t)
    )
    a, b = ReadySteps(list(launch_steps(1))), ReadySteps(list(launch_steps(1)))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert tokens == [(64, 8), (16, 8)]  # 38 tokens of 4 requests, then 11 of 4
    assert_same_outputs(plain, a, graphed, b)


def test_a_padded_step_samples_with_the_options_it_joins_with(model_dir):
    """Prompts of one token make a step of one token per request: padded and sampled in the graph, whose plan
    is made after the forward is queued, so it must see the options the step's requests join with."""
    plain, graphed = (
        ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False),
        with_eager_graphs(model_dir),
    )
    modes, replay_sampling = [], graphed.graphs.replay_sampling
    graphed.graphs.replay_sampling = lambda rows, mode: modes.append(mode) or replay_sampling(rows, mode)

    def steps():
        b = StepBuilder(NUM_PAGES - 1, PAGE_SIZE, seed=3)
        yield b.extend([(0, [5, 6, 7])], [Join(0)])
        # Nearly uniform over the vocabulary: greedy in their place would give other tokens.
        joins = [Join(1, temperature=5.0, seed=9), Join(2, temperature=5.0, top_k=50, seed=5)]
        yield b.extend([(1, [11]), (2, [12])], joins)
        for _ in range(3):
            yield b.decode([0, 1, 2])

    a, b = ReadySteps(list(steps())), ReadySteps(list(steps()))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert a.results == b.results
    assert modes == [SampleMode.FILTERED] * 4  # the joins' step and the decodes, from the joins' options


@pytest.mark.parametrize("graphs", ["token rows", "extend"])
def test_prompts_sample_their_last_rows_in_the_last_row_graphs(model_dir, graphs):
    """Prompts without penalties, bias or logprobs are sampled by the last-row graphs (the LM head and the
    sampling over the rows the forward gathered), in the mode their options ask for, with the eager runner's
    tokens; decodes after them read the last tokens those graphs set."""
    plain = ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False)
    graphed = (
        with_eager_graphs(model_dir)
        if graphs == "token rows"
        else with_eager_graphs(model_dir, token_sizes=(), extend_sizes=[16, 32, 64])
    )
    calls, replay_last = [], graphed.graphs.replay_last_sampling
    graphed.graphs.replay_last_sampling = lambda n, mode: calls.append((n, mode)) or replay_last(n, mode)

    def steps():
        rng = np.random.default_rng(5)
        b = StepBuilder(NUM_PAGES - 1, PAGE_SIZE, seed=5)
        prompts = [(s, rng.integers(0, 100, 4 + s).tolist()) for s in range(3)]
        yield b.extend(prompts, [Join(s) for s in range(3)])
        joins = [Join(3, temperature=5.0, seed=9), Join(4, temperature=5.0, top_k=50, seed=5)]
        yield b.extend([(3, rng.integers(0, 100, 6).tolist()), (0, [-1]), (4, [11, 12])], joins)
        for _ in range(3):
            yield b.decode([0, 1, 2, 3, 4])

    a, b = ReadySteps(list(steps())), ReadySteps(list(steps()))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert a.results == b.results
    assert calls == [(3, SampleMode.GREEDY), (3, SampleMode.FILTERED)]


def test_a_step_too_large_for_the_graphs_buffer_runs_eagerly(model_dir):
    """A padded step whose arrays outgrow the fixed device buffer (the addresses the graphs read) is uploaded
    again unpadded and run eagerly, with the same tokens."""
    from minisgl.worker.batch import BatchUploader

    plain, graphed = (
        ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False),
        with_eager_graphs(model_dir),
    )
    graphed.uploader = BatchUploader(64, graphed.device, depth=2)  # too small for any padded step below
    graphed.graphs._uploader = graphed.uploader
    paddings, replays, padding_for = [], [], graphed.graphs._padding
    graphed.graphs._padding = lambda step, sizes: paddings.append(padding_for(step, sizes)) or paddings[-1]
    for name in ("replay", "replay_sampling", "replay_hidden"):
        setattr(graphed.graphs, name, lambda *args, name=name: replays.append(name))
    a, b = ReadySteps(list(launch_steps(2))), ReadySteps(list(launch_steps(2)))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert len([p for p in paddings if p is not None]) == 6  # every step had a graph, and none was replayed
    assert replays == [] and a.results == b.results


def test_rows_that_would_reread_a_long_prefix_run_eagerly(model_dir, monkeypatch):
    """worth_rows bounds the tokens and the key positions the rows read in all; a step past the bound runs
    eagerly, with the same tokens."""
    from minisgl.worker import token_rows as module

    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=4)
    fresh = b.extend([(0, list(range(10)))])  # rows read 1 + 2 + ... + 10 = 55 positions
    assert module.worth_rows(fresh, 10) and not module.worth_rows(fresh, 9)
    monkeypatch.setattr(module, "MAX_ROW_POSITIONS", 54)
    assert not module.worth_rows(fresh, 10)

    plain, graphed = (
        ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 64), show_progress=False),
        with_eager_graphs(model_dir),
    )
    replays, replay_hidden = [], graphed.graphs.replay_hidden
    graphed.graphs.replay_hidden = lambda batch, rows: replays.append(rows) or replay_hidden(batch, rows)
    monkeypatch.setattr(module, "MAX_ROW_POSITIONS", 100)  # the first step's rows read 222, the second's 93
    a, b = ReadySteps(list(launch_steps(3))), ReadySteps(list(launch_steps(3)))
    assert run_steps(plain, a, a) == 0 and run_steps(graphed, b, b) == 0
    assert replays == [16] and a.results == b.results
