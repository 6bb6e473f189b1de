"""`minisgl bench`: the online client's numbers against the stand-in server's known timings, its failures,
its workloads, the plots, and the offline bench's smoke test.

The stand-in (`python -m minisgl.bench.standin`) runs in a subprocess with a first-token delay and an
inter-token delay; the client runs in process through `minisgl.bench.main`, with its own spawned processes.
The tolerances allow for a loaded 2-core machine: they catch a wrong definition (TTFT from the headers, TPOT
over the wrong count), not scheduling noise.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, free_tcp_port, model_dir_or_skip

from minisgl.bench import main
from minisgl.bench import workloads as wl
from minisgl.bench.loadgen import Columns, Plan, Runner

TTFT_MS, ITL_MS, TOKENS = 60, 8, 16
PNG = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def standin(*args: str):
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "minisgl.bench.standin", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (a 401 with --api-key)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the stand-in did not start: {proc.stderr.read().decode()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    with standin("--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS)) as url:
        yield url


def serve(url: str, tmp_path: Path, *args: str, name: str = "out.json") -> dict:
    out = tmp_path / name
    common = ["--input-len", "32", "--output-len", str(TOKENS), "--no-progress", "--processes", "2"]
    assert main(["serve", "--base-url", url, "--out", str(out), *common, *args]) == 0
    return json.loads(out.read_text())


RUN_KEYS = {
    "rate",
    "concurrency",
    "processes",
    "completed",
    "failed",
    "errors",
    "duration_s",
    "requests_per_s",
    "output_tokens",
    "input_tokens",
    "output_tok_per_s",
    "input_tok_per_s",
    "chunks_per_s",
    "cached_tokens",
    "goodput_req_per_s",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "by_turn",
}


def check_timings(run: dict, requests: int) -> None:
    assert run["failed"] == 0, run["errors"]
    assert run["completed"] == requests
    assert run["output_tokens"] == requests * TOKENS  # the usage chunk's count: ignore_eos, exact
    assert run["input_tokens"] == requests * 32  # the stand-in counts words
    assert 55 <= run["ttft_ms"]["p50"] <= 120, run["ttft_ms"]
    assert 6 <= run["itl_ms"]["p50"] <= 16, run["itl_ms"]
    assert 6 <= run["tpot_ms"]["p50"] <= 16, run["tpot_ms"]
    e2e = TTFT_MS + ITL_MS * (TOKENS - 1)
    assert e2e - 5 <= run["e2e_ms"]["p50"] <= e2e + 100, run["e2e_ms"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(run[key]) == {"mean", "p50", "p90", "p99"}
        assert run[key]["p50"] <= run[key]["p90"] <= run[key]["p99"]


def test_fixed_concurrency_measures_the_standins_delays(server, tmp_path):
    report = serve(server, tmp_path, "--num-prompts", "24", "--concurrency", "4", "--label", "standin")
    assert set(report) == {"date", "label", "config", "runs"}
    assert report["label"] == "standin"
    assert report["config"]["model"] == "standin"  # from GET /v1/models
    assert "api_key" not in report["config"]
    (run,) = report["runs"]
    assert set(run) == RUN_KEYS
    assert run["concurrency"] == 4 and run["rate"] is None
    assert run["cached_tokens"] is None and run["by_turn"] is None  # no cache reported; one turn each
    check_timings(run, 24)
    # Four streams of 24 requests, each ~180 ms: at least six rounds.
    assert run["duration_s"] >= 6 * (TTFT_MS + ITL_MS * (TOKENS - 1)) / 1000


def test_poisson_rates_sweep_goodput_and_plots(server, tmp_path):
    report = serve(
        server,
        tmp_path,
        "--num-prompts",
        "16",
        "--request-rate",
        "40,inf",
        "--slo-ttft-ms",
        "1000",
        "--slo-tpot-ms",
        "1",  # nobody meets it
        "--plot",
        str(tmp_path / "own.png"),
    )
    assert [r["rate"] for r in report["runs"]] == [40.0, "inf"]
    for run in report["runs"]:
        check_timings(run, 16)
        assert run["goodput_req_per_s"] == 0.0
    # 16 arrivals at 40/s take about 0.4 s; all at once, about one request's time.
    assert report["runs"][0]["duration_s"] > 0.25
    assert report["runs"][1]["duration_s"] < report["runs"][0]["duration_s"]
    assert (tmp_path / "own.png").read_bytes().startswith(PNG)

    other = serve(server, tmp_path, "--num-prompts", "8", "--request-rate", "20,inf", name="b.json")
    png = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "out.json"), str(tmp_path / "b.json"), "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes().startswith(PNG)
    assert other["runs"][1]["rate"] == "inf"


def test_goodput_counts_requests_within_the_slos(server, tmp_path):
    report = serve(server, tmp_path, "--num-prompts", "8", "--concurrency", "8", "--slo-ttft-ms", "5000")
    run = report["runs"][0]
    assert run["goodput_req_per_s"] == pytest.approx(run["requests_per_s"])


def test_completions_with_token_ids(tmp_path):
    log = tmp_path / "requests.jsonl"
    with standin("--ttft-ms", "1", "--itl-ms", "0", "--log", str(log)) as url:
        report = serve(url, tmp_path, "--endpoint", "completions", "--token-ids", "--num-prompts", "6")
    assert report["runs"][0]["completed"] == 6
    assert report["runs"][0]["input_tokens"] == 6 * 32
    bodies = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(bodies) == 7  # and the warm-up
    for body in bodies:
        assert len(body["prompt"]) == 32 and all(isinstance(t, int) for t in body["prompt"])
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["max_tokens"] == TOKENS


def test_wrong_api_key_is_reported_as_failures(tmp_path, capsys):
    with standin("--ttft-ms", "1", "--itl-ms", "0", "--api-key", "sesame") as url:
        report = serve(url, tmp_path, "--num-prompts", "5", "--api-key", "wrong", "--model", "m")
        (run,) = report["runs"]
        assert run["completed"] == 0 and run["failed"] == 5
        ((error, count),) = run["errors"].items()
        assert count == 5 and error.startswith("HTTP 401") and "invalid API key" in error
        assert run["ttft_ms"]["p50"] is None and run["output_tok_per_s"] == 0
        assert "5 failed: HTTP 401" in capsys.readouterr().out

        good = serve(url, tmp_path, "--num-prompts", "5", "--api-key", "sesame", name="good.json")
        assert good["runs"][0]["completed"] == 5
        assert good["config"]["api_key_set"] is True


def test_refused_connection_is_reported_as_failures(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    report = serve(url, tmp_path, "--num-prompts", "4", "--concurrency", "2")
    (run,) = report["runs"]
    assert run["failed"] == 4 and run["completed"] == 0
    assert any("connect" in e.lower() for e in run["errors"])
    assert "sending model 'default'" in capsys.readouterr().err


def test_multi_turn_sends_the_growing_history(tmp_path):
    log = tmp_path / "requests.jsonl"
    with standin("--ttft-ms", "1", "--itl-ms", "0", "--log", str(log)) as url:
        report = serve(
            url, tmp_path, "--workload", "multi-turn", "--turns", "3", "--num-prompts", "2", "--warmup", "0"
        )
    assert report["runs"][0]["completed"] == 6
    chats = [json.loads(line)["messages"] for line in log.read_text().splitlines()]
    assert len(chats) == 6
    answer = {"role": "assistant", "content": " tok" * TOKENS}
    for first in [c for c in chats if len(c) == 1]:
        second = next(c for c in chats if len(c) == 3 and c[0] == first[0])
        third = next(c for c in chats if len(c) == 5 and c[0] == first[0])
        assert second[1] == answer and third[:3] == second and third[3] == answer
        assert all(m["role"] == "user" for m in (first[0], second[2], third[4]))


def test_dataset_requests_are_sent_as_written(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [
        {"prompt": "one two three", "max_tokens": 3},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"turns": ["first question", "second question"], "max_tokens": 2},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    log = tmp_path / "requests.jsonl"
    with standin("--ttft-ms", "1", "--itl-ms", "0", "--log", str(log)) as url:
        report = serve(url, tmp_path, "--workload", "dataset", "--dataset", str(data), "--warmup", "0")
    run = report["runs"][0]
    assert run["completed"] == 4 and run["output_tokens"] == 3 + TOKENS + 2 + 2
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(b["max_tokens"] for b in sent) == [2, 2, 3, TOKENS]
    assert {"role": "system", "content": "be brief"} in next(b for b in sent if b["max_tokens"] == TOKENS)[
        "messages"
    ]


def test_read_dataset_and_its_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": [1, 2, 3]}\n{"prompt": "x", "max_tokens": 9}\n')
    convs = wl.read_dataset(data, output_len=5)
    assert [c.turns[0].prompt for c in convs] == [[1, 2, 3], "x"]
    assert [c.turns[0].max_tokens for c in convs] == [5, 9]
    assert len(wl.take(convs, 5)) == 5 and wl.take(convs, 5)[2] is convs[0]
    data.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        wl.read_dataset(data, 5)


def test_shared_prefix_prompts_share_their_prefix():
    convs = wl.shared_prefix_workload(6, 20, 8, 0.0, seed=1, prefix_len=50, num_prefixes=2)
    systems = [c.system for c in convs]
    assert systems[0] == systems[2] == systems[4] != systems[1] == systems[3] == systems[5]
    assert len(systems[0].split()) == 50
    assert len({c.turns[0].prompt for c in convs}) == 6
    ids = wl.shared_prefix_workload(4, 20, 8, 0.0, seed=1, prefix_len=50, token_ids=True)
    assert all(c.turns[0].prompt[:50] == ids[0].turns[0].prompt[:50] for c in ids)
    assert all(len(c.turns[0].prompt) == 70 and c.system is None for c in ids)
    assert wl.shared_prefix_workload(6, 20, 8, 0.0, 1, 50, 2)[3].system == systems[3]  # seeded


def test_random_lengths_stay_in_the_range():
    convs = wl.random_workload(200, 100, 50, 0.5, seed=0)
    ins = [len(c.turns[0].prompt.split()) for c in convs]
    outs = [c.turns[0].max_tokens for c in convs]
    assert 50 <= min(ins) < 60 and 140 < max(ins) <= 150
    assert min(outs) >= 25 and max(outs) <= 75
    assert {len(c.turns[0].prompt.split()) for c in wl.random_workload(5, 30, 5, 0.0, 0)} == {30}


def test_multi_turn_workload_shape():
    convs = wl.multi_turn_workload(3, 10, 4, 0.0, seed=0, turns=5)
    assert [len(c.turns) for c in convs] == [5, 5, 5]
    assert all(len(t.prompt.split()) == 10 and t.max_tokens == 4 for c in convs for t in c.turns)


def runner(chat: bool) -> Runner:
    plan = Plan(0, "", chat, {}, {}, [], [], None, 1, 0, 1.0, False)
    return Runner(plan, None, [0], Columns())


@pytest.mark.parametrize(
    ("chat", "payload", "expected"),
    [
        (True, b'{"choices":[{"delta":{"content":"hi"}}]}', True),
        (True, b'{"choices": [{"delta": {"content": ""}}]}', False),
        (True, b'{"choices":[{"delta":{"role":"assistant","content":"\\""}}],"usage":null}', True),
        (True, b'{"choices":[{"delta":{"content":"x"}}],"usage":{"completion_tokens":3}}', None),
        (True, b'{"choices":[{"delta":{"reasoning_content":"hmm"}}]}', None),
        (True, b'{"choices":[],"usage":{"prompt_tokens":1}}', None),
        (False, b'{"choices":[{"text":" a","index":0}]}', True),
        (False, b'{"choices":[{"text":"","finish_reason":"length"}]}', False),
        (False, b'{"error":{"message":"boom"}}', None),
    ],
)
def test_chunks_are_classified_from_their_bytes(chat, payload, expected):
    r = runner(chat)
    assert r.quick(payload) is expected
    if expected is None:  # the full decode agrees with what the quick path would have said
        piece, _, _, error = r.decode(payload)
        assert error == ("boom" if b"error" in payload else None)
        assert bool(piece) == (b"hmm" in payload or b'"x"' in payload)


@pytest.mark.parametrize("command", ["serve", "offline", "engine", "stall", "plot"])
def test_help_reads(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: minisgl bench {command}")
    assert "(default: None)" not in text


def test_offline_tiny_runs_an_engine(tmp_path):
    model_dir_or_skip()  # the tokenizer files come from the default model
    out = tmp_path / "offline.json"
    argv = ["offline", "--tiny", "--device", "cpu", "--no-progress", "--out", str(out)]
    argv += ["--workloads", "seed,single,decode16,prefill16"]
    assert main([*argv, "--plot", str(tmp_path / "offline.png")]) == 0
    assert (tmp_path / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    report = json.loads(out.read_text())
    assert set(report) == {"date", "label", "config", "runs"}
    run, single, decode, prefill = report["runs"]
    assert run["engine"] == "overlap" and run["workload"] == "seed"
    assert run["requests"] == 8 and run["output_tokens"] == 64
    assert run["output_tok_per_s"] > 0 and run["requests_per_s"] > 0 and run["seconds"] > 0
    assert (single["requests"], single["output_tokens"]) == (1, 8)
    assert single["ms_per_token"] == pytest.approx(1e3 * single["seconds"] / 8)
    # decode16: 8 requests of 8 tokens (--tiny), and the time of the 7 steps after the first token
    assert (decode["requests"], decode["output_tokens"]) == (8, 64)
    assert 0 < decode["first_token_s"] < decode["seconds"]
    assert decode["step_ms"] == pytest.approx(1e3 * (decode["seconds"] - decode["first_token_s"]) / 7)
    # prefill16: 8 requests of one token each (--tiny), then rounds of their own timed one by one
    assert (prefill["requests"], prefill["output_tokens"]) == (8, 8)
    assert 0 < prefill["prefill_ms"] <= prefill["prefill_ms_p90"]


def test_engine_runs_serves_workload_through_zeromq_at_a_concurrency(tiny_model, tmp_path):
    from minisgl.client import LLM

    out = tmp_path / "engine.json"
    with LLM(str(tiny_model), device="cpu", num_pages=64, max_batch=4) as llm:
        address = llm.engine.config.listen
        argv = ["engine", "--address", address, "--concurrency", "1,3", "--num-prompts", "5"]
        argv += ["--input-len", "8", "--output-len", "4", "--out", str(out)]
        assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, 3]
    assert all((r["completed"], r["failed"], r["output_tokens"]) == (5, 0, 20) for r in runs)
    assert all(r["output_tok_per_s"] > 0 and r["e2e_ms"]["p50"] > 0 for r in runs)


# ------------------------------------------------------------------------------------ prefix caches (issue 9)


def test_shared_prefix_rounds_keep_the_prefix_with_a_prefix_seed():
    first = wl.shared_prefix_workload(4, 10, 8, 0.0, seed=1, prefix_len=30, prefix_seed=100)
    second = wl.shared_prefix_workload(4, 10, 8, 0.0, seed=2, prefix_len=30, prefix_seed=100)
    assert {c.system for c in first} == {c.system for c in second} and len({c.system for c in first}) == 1
    assert not {c.turns[0].prompt for c in first} & {c.turns[0].prompt for c in second}  # new questions
    other = wl.shared_prefix_workload(4, 10, 8, 0.0, seed=1, prefix_len=30, prefix_seed=101)
    assert other[0].system != first[0].system
    # Without a prefix seed, as before: the prefix follows --seed.
    assert wl.shared_prefix_workload(4, 10, 8, 0.0, seed=1, prefix_len=30)[0].system != first[0].system


def test_cached_tokens_are_reported_per_run_and_per_turn(tmp_path, capsys):
    """The stand-in with --prefix-cache reports, per request, the words an earlier prompt shared: round 1 of a
    shared-prefix run (after a warm-up of another prefix) shares the prefix among its own requests, round 2
    (the same prefix seed) finds it from the start; a multi-turn run's later turns find their history."""
    log = tmp_path / "requests.jsonl"
    with standin("--ttft-ms", "1", "--itl-ms", "0", "--prefix-cache", "--log", str(log)) as url:
        common = [
            "--workload",
            "shared-prefix",
            "--prefix-len",
            "40",
            "--input-len",
            "10",
            "--prefix-seed",
            "5",
        ]
        common += ["--num-prompts", "4", "--concurrency", "1"]  # one at a time: each sees the ones before
        one = serve(url, tmp_path, *common, "--seed", "1", name="one.json")["runs"][0]
        two = serve(url, tmp_path, *common, "--seed", "2", name="two.json")["runs"][0]
        turns = ["--workload", "multi-turn", "--turns", "3", "--num-prompts", "2", "--input-len", "6"]
        multi = serve(url, tmp_path, *turns, "--warmup", "0", name="multi.json")["runs"][0]
    assert one["input_tokens"] == two["input_tokens"] == 4 * 50
    assert one["cached_tokens"] == 3 * 40  # the first request of round 1 found nothing
    assert two["cached_tokens"] == 4 * 40
    sent = [json.loads(line)["messages"] for line in log.read_text().splitlines()]
    warm, measured = sent[0][0]["content"], sent[1][0]["content"]
    assert sent[0][0]["role"] == "system" and len(warm.split()) == 40 and warm != measured  # prefix seed 6
    assert one["by_turn"] is None
    assert [t["turn"] for t in multi["by_turn"]] == [1, 2, 3]
    assert [t["completed"] for t in multi["by_turn"]] == [2, 2, 2]
    assert multi["by_turn"][0]["cached_tokens"] == 0
    # Turn 2 has turn 1's words cached; turn 3 those of turns 1 and 2 and the first answer.
    assert multi["by_turn"][1]["cached_tokens"] == 2 * 6
    assert multi["by_turn"][2]["cached_tokens"] == 2 * (6 + TOKENS + 6)
    assert multi["by_turn"][2]["input_tokens"] == 2 * (3 * 6 + 2 * TOKENS)
    assert all(t["ttft_ms"]["p50"] > 0 for t in multi["by_turn"])
    table = capsys.readouterr().out
    assert "cached" in table and "    turn 3" in table and "60%" in table  # round 1: 120 of 200 words


def test_cached_of_reads_openais_usage_details():
    from minisgl.bench.loadgen import cached_of

    assert cached_of({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}, -1) == 4
    assert cached_of({"prompt_tokens": 9}, -1) == -1
    assert cached_of({"prompt_tokens_details": None}, -1) == -1


# ------------------------------------------------------------------------------------------- stall


def test_stall_analysis_sorts_gaps_into_windows():
    from minisgl.bench.stall import analyse

    # Two streams with a token every 10 ms, the second one stalled for 110 ms across the window.
    a = np.arange(60) * 0.01
    b = np.concatenate([np.arange(20), np.arange(30, 60)]) * 0.01
    out = analyse([a, b], [(0.205, 0.295), None])
    gaps = out["gaps_ms"]
    assert gaps["before"]["gaps"] == 20 + 19 and gaps["before"]["max_ms"] == pytest.approx(10)
    assert gaps["during"]["max_ms"] == pytest.approx(110) and gaps["after"]["max_ms"] == pytest.approx(10)
    assert gaps["before"]["gaps"] + gaps["during"]["gaps"] + gaps["after"]["gaps"] == 59 + 49
    event, failed = out["events"]
    assert failed == {"index": 1, "ok": False}
    assert event["prefill_ms"] == pytest.approx(90)
    assert event["tokens_per_stream_mean"] == pytest.approx(9 / 2)
    assert event["streams_through"] == 2 and event["tokens_per_stream_min"] == 0
    assert event["streams_without_token"] == 1 and event["max_gap_ms"] == pytest.approx(110)
    empty = analyse([np.zeros(0)], [])
    assert empty["events"] == [] and empty["gaps_ms"]["during"]["gaps"] == 0


def test_stall_measures_the_streams_around_long_prompts(tmp_path, capsys):
    out = tmp_path / "stall.json"
    with standin("--ttft-ms", "5", "--itl-ms", "4") as url:
        argv = ["stall", "--base-url", url, "--streams", "3", "--stream-input-len", "8"]
        argv += ["--stream-output-len", "150", "--long-input-len", "300", "--long-output-len", "3"]
        argv += ["--long-count", "2", "--delay-s", "0.2", "--spacing-s", "0.2", "--processes", "2"]
        assert main([*argv, "--out", str(out), "--label", "standin"]) == 0
    r = json.loads(out.read_text())
    assert r["label"] == "standin" and "api_key" not in r["config"]
    assert r["streams"] == {
        "requested": 3,
        "completed": 3,
        "failed": 0,
        "errors": {},
        "decoding_before_long": 3,
        "tokens": 3 * 150,
    }
    assert [lp["prompt_tokens"] for lp in r["long"]] == [300, 300]
    assert all(lp["ok"] and lp["output_tokens"] == 3 for lp in r["long"])
    # The stand-in does not stall: every gap is about 4 ms, during the long prompts' 5 ms "prefills" too.
    for window in ("before", "during", "after"):
        g = r["gaps_ms"][window]
        assert g["gaps"] > 0 and 2 <= g["p50_ms"] <= 12, (window, g)
    assert r["gaps_ms"]["before"]["gaps"] >= 3 * 30  # 0.2 s of 4 ms gaps per stream, less the start
    assert sum(g["gaps"] for g in r["gaps_ms"].values()) == 3 * 149
    for k, ev in enumerate(r["events"]):
        assert ev["index"] == k and ev["ok"] and 4 <= ev["prefill_ms"] < 200
        assert ev["streams_through"] == 3
    assert "long 1: 300 prompt tokens" in capsys.readouterr().out


def test_offline_engine_flags_are_serves_flags():
    from minisgl.bench.offline import engine_flags

    assert engine_flags("") == {}
    assert engine_flags("--no-cuda-graphs --max-step-tokens 4096") == {
        "cuda_graphs": False,
        "max_step_tokens": 4096,
    }
    with pytest.raises(SystemExit):
        engine_flags("--no-such-flag")


def test_prefix_bench_summary_reads_what_the_script_writes(tmp_path, capsys):
    """scripts/bench_prefix_gpu.sh's table, from files shaped as it writes them (a part may be missing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "summary", REPO_ROOT / "scripts" / "bench_prefix_summary.py"
    )
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def run(ttft_p50: float, cached: int | None, by_turn=None) -> dict:
        stats = {"mean": 1.0, "p50": ttft_p50, "p90": 1.0, "p99": 2 * ttft_p50}
        return {
            "completed": 64, "failed": 0, "errors": {}, "duration_s": 1.5, "output_tok_per_s": 2730.0,
            "input_tokens": 1000, "cached_tokens": cached, "ttft_ms": stats, "tpot_ms": stats,
            "by_turn": by_turn,
        }  # fmt: skip

    def scrape(extend: int, seconds: float) -> dict:
        lines = [f'minisgl_step_duration_seconds_count{{kind="extend"}} {extend}']
        return {"metrics": [*lines, f'minisgl_step_duration_seconds_sum{{kind="extend"}} {seconds}']}

    a_cfg = {"num_prompts": 64, "prefix_len": 2000, "input_len": 50, "output_len": 64}
    turns = [{"turn": 1, "completed": 32, "input_tokens": 10, "cached_tokens": 0, "ttft_ms": {"p50": 30.0}}]
    on = {
        "a1": {"config": a_cfg, "runs": [run(40.0, 900)]},
        "a2": {"config": a_cfg, "runs": [run(20.0, 950)]},
        "b": {"config": {"num_prompts": 32, "turns": 6}, "runs": [run(25.0, 800, turns)]},
        "metrics_warmup": scrape(10, 1.0),
        "metrics_a1": scrape(14, 1.1),
    }
    off = {"a1": {"config": a_cfg, "runs": [run(200.0, 0)]}, "a2": {"config": a_cfg, "runs": [run(100.0, 0)]}}
    for label, parts in (("ours-on", on), ("ours-off", off)):
        doc = {"label": label, "gpu": "NVIDIA H200", "date_utc": "2026-12-05 07:00:00", "parts": parts}
        (tmp_path / f"prefix_{label}.json").write_text(json.dumps(doc))
    assert summary.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "64/0" in out and "90%" in out
    assert "extend 4x25.00ms" in out  # the steps of round 1, from /metrics before and after it
    assert "= x5.00 (goal >= x3)" in out and "= x5.00 (goal >= x3)" in out.split("round 2")[-1]
    assert "by turn: 1: 30.0 (0%)" in out
    assert "(c) offline nano-vllm: no result" in out and "WARNING" not in out


def test_ab_table_reads_what_the_offline_bench_writes(tmp_path):
    """scripts/bench_ab_gpu.sh's table: one column per engine and round in the order they ran, each workload's
    figure (tok/s, ms a step, ms a token, ms a prefill), "-" where a run is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ab_table", REPO_ROOT / "scripts" / "bench_ab_table.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    def write(name: str, seed_tok_s: float, step_ms: float | None) -> Path:
        runs = [{"workload": "seed", "output_tok_per_s": seed_tok_s}]
        if step_ms is not None:
            runs.append({"workload": "decode1", "output_tok_per_s": 1.0, "step_ms": step_ms})
            runs.append({"workload": "prefill16", "output_tok_per_s": 1.0, "prefill_ms": 2 * step_ms})
        path = tmp_path / name
        path.write_text(json.dumps({"label": name, "runs": runs}))
        return path

    files = [
        write("ab_base.1.json", 900, 1.2),
        write("ab_new.0.json", 1500, 0.8),
        write("ab_base.0.json", 1000, None),
    ]
    lines = ab.table(files).splitlines()
    assert lines[0] == "| workload | new (0) | base (0) | base (1) |"
    assert lines[2] == "| seed, tok/s | 1,500 | 1,000 | 900 |"
    assert lines[3] == "| decode1, ms a step | 0.800 | - | 1.200 |"
    assert lines[4] == "| prefill16, ms a prefill | 1.600 | - | 2.400 |"
