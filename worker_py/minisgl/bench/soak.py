"""`minisgl bench soak`: many concurrent streaming clients on both doors for a while, each checking every
token it gets against a replay of its request alone; at the end the server must be idle with its pages back.

The requests are drawn from a fixed set of distinct ones (mixed prompt lengths, raw prompts and chats, 1 to
--max-tokens tokens, greedy and seeded sampling), so that each can be replayed alone first, one at a time over
each door, and the engine on the CPU gives a request the same tokens whatever runs beside it. Then every
client loops until the time is up: half of them stream over ZeroMQ (one DEALER socket each, with keepalive),
half over HTTP (raw prompts to /v1/completions, chats to /v1/chat/completions, token ids read from the
logprobs as `token_id:N`). A share of the requests (--abort-fraction) is cut at a random token: over ZeroMQ
by an `abort` or by closing the socket, over HTTP by closing the connection. soak_check judges each stream
(lost, duplicated, reordered, wrong) and which requests are stuck. When the time is up, the requests still
live (queued or streaming) are cut the same way, all at once. /metrics is sampled throughout: the scheduler's
resident memory, the KV pages, the queue; at the end, once idle, nothing may run or wait, no page may be held
by a request, and the pool's free pages and the prefix cache's must make up the total.

The server is started here (the CPU build, --model) unless --http and --zmq name a running one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minisgl.bench.soak_check import VERDICTS, StuckWatch, verdict

EPILOG = """\
examples:
  minisgl bench soak --clients 1000 --duration 600 --out soak.json   # the issue's run (docs/reliability.md)
  minisgl bench soak --clients 40 --duration 20 --distinct 12 --max-tokens 24
"""

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
WORDS = [
    *("river", "stone", "lamp", "window", "garden", "paper", "engine", "silver", "orange", "cloud", "music"),
    *("winter", "harbor", "forest", "letter", "bridge", "candle", "mirror", "valley", "thunder", "copper"),
    *("meadow", "lantern", "castle", "ocean", "pepper", "violin", "desert"),
]
TOPICS = ["binary search", "tides", "bread", "the TCP handshake", "volcanoes", "chess", "compilers", "bees"]
TOKEN_ID = "token_id:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=1000, help="concurrent clients, half on each door")
    p.add_argument("--duration", type=float, default=600.0, help="seconds during which clients send requests")
    p.add_argument("--abort-fraction", type=float, default=0.1, help="share of requests cut mid-stream")
    p.add_argument("--distinct", type=int, default=64, help="distinct requests the clients draw from")
    p.add_argument("--max-tokens", type=int, default=128, help="the largest max_tokens of a request")
    p.add_argument("--stuck-s", type=float, default=60.0, help="no progress for this long is stuck")
    p.add_argument("--ramp-s", type=float, default=10.0, help="clients start spread over this long")
    p.add_argument(
        "--drain-s", type=float, default=120.0, help="after --duration: how long the cuts may take"
    )
    p.add_argument("--seed", type=int, default=0, help="the requests and the clients' choices")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the model the server started here serves")
    p.add_argument("--max-batch", type=int, default=64, help="the started server's --max-batch")
    p.add_argument(
        "--num-pages", type=int, default=4096, help="the started server's KV pages, 16 tokens each"
    )
    p.add_argument("--http", default=None, help="HOST:PORT of a running server (with --zmq)")
    p.add_argument("--zmq", default=None, help="ZeroMQ endpoint of a running server (with --http)")
    p.add_argument("--sample-s", type=float, default=5.0, help="how often /metrics is read and shown")
    p.add_argument("--out", type=Path, default=None, help="write the figures and samples as JSON")


# --- the requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One distinct request: a raw prompt or a chat, and its sampling."""

    index: int
    text: str | None
    messages: list | None
    sampling: dict


def make_specs(count: int, max_tokens: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        # Prompt lengths from a few words to a few hundred; every request distinct, some sharing a prefix.
        words = rng.choice([3, 12, 40, 120, 300])
        filler = " ".join(rng.choice(WORDS) for _ in range(words))
        topic = TOPICS[i % len(TOPICS)]
        # max_tokens spread evenly over its logarithm, so short and long outputs both come often.
        tokens = max(1, min(max_tokens, round(max_tokens ** rng.random())))
        tokens = {0: 1, 1: max_tokens}.get(i, tokens)
        sampling: dict = {"max_tokens": tokens}
        if i % 2:
            sampling.update(temperature=0.8, top_p=0.95, top_k=50, seed=rng.randrange(1 << 32))
        else:
            sampling["temperature"] = 0.0
        if i % 5 == 0:
            sampling["ignore_eos"] = True
        if i % 4 in (0, 1):
            text, messages = f"Request {i}. {filler}\nA few notes on {topic}:", None
        else:
            context = "Context: " + filler if i % 3 else ""
            system = {"role": "system", "content": "You answer briefly. " + context}
            messages = [system, {"role": "user", "content": f"Request {i}: tell me about {topic}."}]
            text = None
        specs.append(Spec(i, text, messages, sampling))
    return specs


# --- what a stream gave -------------------------------------------------------------------------------------


@dataclass
class Stream:
    ids: list = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    complete: bool = False  # read to its end (a final, or [DONE])
    cut: str | None = None  # how the client cut it: abort, close


class Progress:
    """What the soak's judge and display need to hear about each stream as it goes."""

    def __init__(self, stuck_s: float):
        self.watch = StuckWatch(stuck_s)
        self.tokens = 0
        # The time is up: every client cuts the request it still has, as a client that gives up would.
        self.time_up = False

    def sent(self, key) -> None:
        self.watch.sent(key, time.monotonic())

    def token(self, key, n: int) -> None:
        self.tokens += n
        self.watch.token(key, time.monotonic())

    def ended(self, key) -> None:
        self.watch.ended(key, time.monotonic())


# --- ZeroMQ -------------------------------------------------------------------------------------------------


class ZmqDoor:
    """One client's DEALER socket; a new one after the client closes its socket on a request."""

    KEEPALIVE_S = 0.5

    def __init__(self, ctx, address: str, name: str):
        self.ctx, self.address, self.name = ctx, address, name
        self.sock = None
        self.count = 0

    def _open(self):
        import zmq

        if self.sock is None:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.address)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def run(self, spec: Spec, cut_at: int | None, cut_how: str, progress: Progress, key) -> Stream:
        import msgpack

        sock = self._open()
        self.count += 1
        rid = f"{self.name}-{self.count}"
        msg = {"type": "generate", "rid": rid, "stream": True, "sampling": spec.sampling, "keepalive": True}
        msg.update({"text": spec.text} if spec.text is not None else {"messages": spec.messages})
        out = Stream()
        final_ids: list = []
        final_text = ""
        await sock.send(msgpack.packb(msg))
        last_sent = time.monotonic()
        progress.sent(key)
        while True:
            cut = progress.time_up or (cut_at is not None and len(out.ids) >= cut_at)
            if cut and out.cut is None:
                out.cut = cut_how
                if cut_how == "close":
                    self.close()
                    return out
                await sock.send(msgpack.packb({"type": "abort", "rid": rid}))
                last_sent = time.monotonic()
            wait = max(0.0, last_sent + self.KEEPALIVE_S - time.monotonic())
            if not await sock.poll(int(wait * 1000) + 1):
                await sock.send(msgpack.packb({"type": "keepalive"}))
                last_sent = time.monotonic()
                continue
            reply = msgpack.unpackb(await sock.recv())
            kind = reply.get("type")
            if kind == "heartbeat":
                continue
            if reply.get("rid") != rid:
                out.error = f"a reply for another request: {str(reply)[:200]}"
                return out
            if kind == "delta":
                out.ids += reply["token_ids"]
                out.text += reply["text"]
                progress.token(key, len(reply["token_ids"]))
            elif kind == "final":
                out.finish, out.complete = reply["finish_reason"], True
                final_ids, final_text = reply["token_ids"], reply["text"]
                if out.cut == "abort" and out.finish != "abort":
                    # It ended before the abort arrived: the abort is answered `unknown_request`.
                    await self._abort_refused(sock, rid, out)
                break
            else:
                out.error = f"{reply.get('code')}: {reply.get('message')}"
                return out
        # The final repeats the whole completion: the deltas must add up to it.
        if (final_ids, final_text) != (out.ids, out.text):
            out.error = f"the deltas ({len(out.ids)} ids) do not add up to the final ({len(final_ids)} ids)"
        return out

    async def _abort_refused(self, sock, rid: str, out: Stream, within_s: float = 30.0) -> None:
        import msgpack

        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            if not await sock.poll(int(left * 1000) + 1):
                break
            reply = msgpack.unpackb(await sock.recv())
            if reply.get("type") == "heartbeat":
                continue
            if (reply.get("type"), reply.get("rid"), reply.get("code")) != ("error", rid, "unknown_request"):
                out.error = f"after a final, instead of the late abort's refusal: {str(reply)[:200]}"
            return
        out.error = f"a late abort of {rid} was never answered"


# --- HTTP ---------------------------------------------------------------------------------------------------


def http_body(spec: Spec) -> tuple[str, dict]:
    """The endpoint and body of a request over HTTP: its token ids come back in the logprobs."""
    s = spec.sampling
    body = {"stream": True, "max_tokens": s["max_tokens"], "return_tokens_as_token_ids": True}
    body.update({k: s[k] for k in ("temperature", "top_p", "top_k", "seed", "ignore_eos") if k in s})
    if spec.text is not None:
        return "/v1/completions", {**body, "prompt": spec.text, "logprobs": 0}
    return "/v1/chat/completions", {**body, "messages": spec.messages, "logprobs": True, "top_logprobs": 0}


def chunk_ids_text(chunk: dict, chat: bool) -> tuple[list, str, str | None]:
    """(token ids, text, finish reason) of one streamed chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return [], "", None
    choice = choices[0]
    logprobs = choice.get("logprobs") or {}
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        tokens = [entry["token"] for entry in logprobs.get("content") or []]
    else:
        text = choice.get("text") or ""
        tokens = logprobs.get("tokens") or []
    ids = [int(t[len(TOKEN_ID) :]) for t in tokens]
    return ids, text, choice.get("finish_reason")


async def http_run(session, base: str, spec: Spec, cut_at: int | None, progress: Progress, key) -> Stream:
    path, body = http_body(spec)
    chat = path.endswith("chat/completions")
    out = Stream()
    progress.sent(key)
    async with session.post(base + path, json=body) as resp:
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return out
        read = None  # a readline in progress: kept across waits, since cancelling one may lose a partial line
        while True:
            if progress.time_up or (cut_at is not None and len(out.ids) >= cut_at):
                out.cut = "close"
                if read is not None:
                    read.cancel()
                resp.close()  # the connection goes, not back to the pool: the server sees it close
                return out
            if read is None:
                read = asyncio.ensure_future(resp.content.readline())
            done, _ = await asyncio.wait({read}, timeout=0.5)
            if not done:
                continue  # a queued request: nothing comes until it is admitted
            line, read = read.result(), None
            if not line:
                out.error = "the stream ended without [DONE]"
                return out
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                out.complete = True
                return out
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = str(chunk["error"])[:200]
                return out
            ids, text, finish = chunk_ids_text(chunk, chat)
            out.ids += ids
            out.text += text
            out.finish = finish or out.finish
            if ids:
                progress.token(key, len(ids))


# --- the soak -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    complete: int = 0
    cut: int = 0
    tokens: int = 0
    errors: int = 0
    verdicts: dict = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    by_door: dict = field(default_factory=lambda: {"zmq": 0, "http": 0})
    failures: list = field(default_factory=list)  # the first few, in full

    def add(self, door: str, spec: Spec, s: Stream, ref: Stream) -> str:
        self.requests += 1
        self.by_door[door] += 1
        self.tokens += len(s.ids)
        if s.error is None and s.cut is None and s.finish == "abort":
            s.error = "aborted by the server: the client never asked"
        if s.error is not None:
            self.errors += 1
            self._fail(door, spec, s, ref, "error")
            return "error"
        if s.cut is None or (s.complete and s.finish != "abort"):
            self.complete += 1
            complete = True
            if s.finish != ref.finish:
                self.verdicts["wrong"] += 1
                self._fail(door, spec, s, ref, "wrong")
                return "wrong"
        else:
            self.cut += 1
            complete = False
        v = verdict(s.ids, ref.ids, complete)
        if v == "ok" and verdict(s.text, ref.text, complete) != "ok":
            v = "wrong"  # the same ids must give the same text
        self.verdicts[v] += 1
        if v != "ok":
            self._fail(door, spec, s, ref, v)
        return v

    def _fail(self, door: str, spec: Spec, s: Stream, ref: Stream, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(
                {"what": what, "door": door, "spec": spec.index, "got": asdict(s), "replay": asdict(ref)}
            )


def metrics_of(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("minisgl_") and " " in line:
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def held_pages(m: dict) -> float:
    """KV pages held by requests: the used ones (the free ones include the prefix cache's evictable pages)."""
    return m["minisgl_kv_pages_used"]


class Soak:
    def __init__(self, args, http: str, zmq_address: str):
        self.args = args
        self.base = f"http://{http}"
        self.zmq_address = zmq_address
        self.specs = make_specs(args.distinct, args.max_tokens, args.seed)
        self.refs: dict[tuple[str, int], Stream] = {}
        self.progress = Progress(args.stuck_s)
        self.tally = Tally()
        self.samples: list[dict] = []
        self.live = 0
        self.cut_at_end = 0  # requests still live when the time was up, cut then

    async def metrics(self, session) -> dict:
        async with session.get(self.base + "/metrics") as resp:
            return metrics_of(await resp.text())

    async def replay(self, session, ctx) -> None:
        """Each distinct request alone, over each door: the references."""
        door = ZmqDoor(ctx, self.zmq_address, "replay")
        for spec in self.specs:
            for name in ("zmq", "http"):
                if name == "zmq":
                    s = await door.run(spec, None, "", self.progress, ("replay", name))
                else:
                    s = await http_run(session, self.base, spec, None, self.progress, ("replay", name))
                self.progress.ended(("replay", name))
                if s.error is not None or not s.complete:
                    raise RuntimeError(f"the replay of request {spec.index} over {name} failed: {s.error}")
                self.refs[(name, spec.index)] = s
        door.close()
        self.progress.tokens = 0

    async def client(self, i: int, session, ctx, stop_at: float) -> None:
        rng = random.Random(self.args.seed * 1_000_003 + i)
        door_name = "zmq" if i % 2 == 0 else "http"
        zdoor = ZmqDoor(ctx, self.zmq_address, f"soak{i}") if door_name == "zmq" else None
        await asyncio.sleep(rng.random() * self.args.ramp_s)
        n = 0
        while time.monotonic() < stop_at:
            spec = rng.choice(self.specs)
            ref = self.refs[(door_name, spec.index)]
            cut_at = None
            if rng.random() < self.args.abort_fraction:
                cut_at = rng.randrange(len(ref.ids) + 1)
            key = (i, n)
            n += 1
            self.live += 1
            try:
                if zdoor is not None:
                    how = rng.choice(["abort", "close"])
                    s = await zdoor.run(spec, cut_at, how, self.progress, key)
                else:
                    s = await http_run(session, self.base, spec, cut_at, self.progress, key)
            except Exception as e:  # noqa: BLE001 (every failure is counted and shown, none stops the soak)
                s = Stream(error=f"{type(e).__name__}: {e}")
            finally:
                self.live -= 1
            self.progress.ended(key)
            self.tally.add(door_name, spec, s, ref)
            self.cut_at_end += s.cut is not None and self.progress.time_up
        if zdoor is not None:
            zdoor.close()

    async def sampler(self, session, t0: float, done: asyncio.Event) -> None:
        last_tokens, last_t = 0, t0
        while not done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), self.args.sample_s)
            now = time.monotonic()
            stuck_now = self.progress.watch.check(now)
            try:
                m = await self.metrics(session)
            except Exception as e:  # noqa: BLE001
                print(f"  /metrics failed: {e}", file=sys.stderr)
                continue
            sample = {
                "t": round(now - t0, 1),
                "rss_bytes": m.get("minisgl_process_resident_memory_bytes"),
                "pages_used": m["minisgl_kv_pages_used"],
                "pages_free": m["minisgl_kv_pages_free"],
                "prefix_cache_pages": m["minisgl_prefix_cache_pages"],
                "running": m["minisgl_requests_running"],
                "waiting": m["minisgl_requests_waiting"],
                "live_clients": self.live,
                "requests": self.tally.requests,
                "tokens": self.progress.tokens,
            }
            self.samples.append(sample)
            t = self.tally
            rate = (self.progress.tokens - last_tokens) / max(1e-9, now - last_t)
            last_tokens, last_t = self.progress.tokens, now
            bad = sum(v for k, v in t.verdicts.items() if k != "ok")
            rss_mib = (sample["rss_bytes"] or 0) / 2**20
            pages = f"{sample['pages_used']:.0f} of {sample['pages_used'] + sample['pages_free']:.0f}"
            print(
                f"[{now - t0:5.0f}s] live {self.live:4d} (engine: {sample['running']:.0f} running, "
                f"{sample['waiting']:.0f} waiting) | done {t.requests} (cut {t.cut}) | tokens "
                f"{self.progress.tokens} ({rate:.0f}/s) | bad {bad} errors {t.errors} stuck "
                f"{self.progress.watch.stuck} (now {stuck_now}) | rss {rss_mib:.1f} MiB | pages used {pages}",
                file=sys.stderr,
                flush=True,
            )

    async def idle(self, session, within_s: float = 60.0) -> dict:
        """/metrics once nothing runs or waits any more (or after `within_s`)."""
        deadline = time.monotonic() + within_s
        while True:
            m = await self.metrics(session)
            quiet = m["minisgl_requests_running"] == 0 and m["minisgl_requests_waiting"] == 0
            unlocked = m["minisgl_prefix_cache_pages"] == m["minisgl_prefix_cache_evictable_pages"]
            if (quiet and held_pages(m) == 0 and unlocked) or time.monotonic() > deadline:
                return m
            await asyncio.sleep(0.5)

    async def main(self) -> dict:
        import aiohttp
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        ctx.set(zmq.MAX_SOCKETS, max(4096, 4 * self.args.clients))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            t_replay = time.monotonic()
            await self.replay(session, ctx)
            replay_s = time.monotonic() - t_replay
            said = f"replayed {len(self.specs)} requests alone on each door in {replay_s:.0f} s"
            print(said, file=sys.stderr)
            zmq_vs_http = sum(
                self.refs[("zmq", s.index)].ids != self.refs[("http", s.index)].ids
                or self.refs[("zmq", s.index)].text != self.refs[("http", s.index)].text
                for s in self.specs
            )
            before = await self.idle(session)
            t0 = time.monotonic()
            stop_at = t0 + self.args.duration
            done = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(session, t0, done))
            clients = [
                asyncio.create_task(self.client(i, session, ctx, stop_at)) for i in range(self.args.clients)
            ]
            await asyncio.wait(clients, timeout=self.args.duration)
            self.progress.time_up = True
            _, pending = await asyncio.wait(clients, timeout=self.args.drain_s)
            for task in pending:
                task.cancel()
            ran_s = time.monotonic() - t0
            done.set()
            await sampler
            self.progress.watch.check(time.monotonic())
            after = await self.idle(session)
        ctx.term()
        return self.report(before, after, ran_s, replay_s, zmq_vs_http, len(pending))

    def report(
        self, before: dict, after: dict, ran_s: float, replay_s: float, zmq_vs_http: int, unfinished: int
    ) -> dict:
        t = self.tally
        rss = [(s["t"], s["rss_bytes"]) for s in self.samples if s["rss_bytes"]]
        half = [p for p in rss if p[0] >= ran_s / 2] or rss
        return {
            "clients": self.args.clients,
            "duration_s": self.args.duration,
            "ran_s": round(ran_s, 1),
            "replay_s": round(replay_s, 1),
            "distinct_requests": len(self.specs),
            "abort_fraction": self.args.abort_fraction,
            "requests": t.requests,
            "by_door": t.by_door,
            "complete": t.complete,
            "cut": t.cut,
            "cut_when_time_was_up": self.cut_at_end,
            "tokens": t.tokens,
            "verdicts": t.verdicts,
            "errors": t.errors,
            "stuck": self.progress.watch.stuck,
            "longest_wait_s": round(self.progress.watch.stuck_for, 1),
            "clients_unfinished": unfinished,
            "replays_differing_between_doors": zmq_vs_http,
            "before": idle_figures(before),
            "after": idle_figures(after),
            "rss_slope_mib_per_min_second_half": round(slope(half) * 60 / 2**20, 3),
            "failures": t.failures,
            "samples": self.samples,
        }


def idle_figures(m: dict) -> dict:
    free, evictable = m["minisgl_kv_pages_free"], m["minisgl_prefix_cache_evictable_pages"]
    return {
        "rss_bytes": m.get("minisgl_process_resident_memory_bytes"),
        "requests_running": m["minisgl_requests_running"],
        "requests_waiting": m["minisgl_requests_waiting"],
        "kv_pages_total": m["minisgl_kv_pages_used"] + free,
        "kv_pages_held_by_requests": held_pages(m),
        # The pool's free pages, and the prefix cache's: at idle they make up the total.
        "kv_pages_pool_free": free - evictable,
        "prefix_cache_pages": m["minisgl_prefix_cache_pages"],
        "prefix_cache_locked_pages": m["minisgl_prefix_cache_pages"] - evictable,
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var


def passed(r: dict) -> bool:
    a = r["after"]
    return (
        all(v == 0 for k, v in r["verdicts"].items() if k != "ok")
        and r["errors"] == 0
        and r["stuck"] == 0
        and r["clients_unfinished"] == 0
        and a["requests_running"] == 0
        and a["requests_waiting"] == 0
        and a["kv_pages_held_by_requests"] == 0
        and a["prefix_cache_locked_pages"] == 0
        and a["kv_pages_pool_free"] + a["prefix_cache_pages"] == a["kv_pages_total"]
    )


def raise_fd_limit() -> None:
    """A socket per client here, and as many in a server started here: the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    if (args.http is None) != (args.zmq is None):
        sub.error("--http and --zmq name a running server together")
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.abort_fraction <= 1 or args.distinct < 2:
        sub.error("--clients 1 or more, --duration above 0, --abort-fraction in [0, 1], --distinct 2 or more")
    raise_fd_limit()
    with contextlib.ExitStack() as stack:
        http, zmq_address = args.http, args.zmq
        if http is None:
            http, zmq_address = stack.enter_context(started_server(args))
        result = asyncio.run(Soak(args, http, zmq_address).main())
    result["passed"] = passed(result)
    summary = {k: v for k, v in result.items() if k not in ("samples", "failures")}
    print(json.dumps(summary, indent=1))
    for failure in result["failures"][:5]:
        print(json.dumps(failure)[:2000], file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


@contextlib.contextmanager
def started_server(args):
    """The CPU build serving --model on free loopback ports, yielding (HOST:PORT, ZeroMQ endpoint). Its limits
    leave room for every client: a connection each on both doors and, queued, every request at once."""
    from minisgl.launch import Engine, EngineConfig

    room = max(4096, 2 * args.clients)
    config = EngineConfig(
        model=args.model,
        listen=f"tcp://127.0.0.1:{free_port()}",
        http=f"127.0.0.1:{free_port()}",
        device="cpu",
        dtype="float32",
        max_batch=args.max_batch,
        num_pages=args.num_pages,
        max_connections=room,
        max_waiting=room,
        log_level="warn",
        ready_timeout_s=600,
    )
    print(f"starting {args.model} on the CPU: HTTP {config.http}, ZeroMQ {config.listen}", file=sys.stderr)
    with Engine(config) as engine:
        yield engine.config.http, engine.config.listen


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
