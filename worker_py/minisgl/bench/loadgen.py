"""One load-generating process of `minisgl bench serve`: an asyncio loop with one aiohttp session that sends
its share of the conversations and times every streamed chunk.

The parent starts K of these (spawned, so that nothing of its own state is shared), each with its own plan. A
process builds its request bodies and runs its warm-up, reports ready, waits for the common start, runs, and
sends back its measurements as columns (arrays of floats), not objects: one pickle for the whole run.

Timestamps are `time.perf_counter()`, CLOCK_MONOTONIC on Linux: one clock for every process of the machine, so
the parent can compare the starts and ends of requests made in different processes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import traceback
from array import array
from dataclasses import dataclass, field
from time import perf_counter

import aiohttp

from minisgl.bench.workloads import Conversation, Turn

QUOTE = ord('"')


@dataclass
class Plan:
    """What one process sends and how."""

    index: int
    url: str
    chat: bool
    headers: dict
    base: dict  # the body's fixed fields: model, stream, stream_options, temperature, ignore_eos...
    # With a rate, this process's share; with a concurrency, every conversation, taken in turn by all the
    # processes through a shared counter, so that none runs dry while others still have a queue.
    conversations: list[Conversation]
    warmup: list[Conversation]
    rate: float | None  # conversations per second started by this process (Poisson), inf: all at once
    concurrency: int | None  # or: this many conversations in flight, each started when one ends
    seed: int
    timeout_s: float
    want_text: bool  # multi-turn: the answers go into the next turn, so every chunk's text is decoded


@dataclass
class Columns:
    """One entry per request (`itl`: one per gap between content chunks, all requests together)."""

    start: array = field(default_factory=lambda: array("d"))
    end: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))  # NaN when the request failed
    tpot: array = field(default_factory=lambda: array("d"))  # NaN with fewer than 2 output tokens
    output_tokens: array = field(default_factory=lambda: array("q"))
    prompt_tokens: array = field(default_factory=lambda: array("q"))  # -1: the server did not say
    # usage.prompt_tokens_details.cached_tokens: the prompt tokens a prefix cache served; -1: not said
    cached_tokens: array = field(default_factory=lambda: array("q"))
    turn: array = field(default_factory=lambda: array("h"))  # 0 for the first turn of a conversation
    chunks: array = field(default_factory=lambda: array("q"))
    ok: array = field(default_factory=lambda: array("b"))
    itl: array = field(default_factory=lambda: array("d"))
    errors: list = field(default_factory=list)  # the text of each failure


def usage_is_null(payload: bytes, at: int) -> bool:
    """Whether the `"usage"` key found at `at` has the value null (servers send `"usage":null` in every
    chunk but the last)."""
    rest = payload[at + 7 : at + 16].lstrip(b": ")
    return rest.startswith(b"null")


class Runner:
    def __init__(self, plan: Plan, session: aiohttp.ClientSession, progress, cols: Columns):
        self.plan = plan
        self.session = session
        self.progress = progress
        self.cols = cols
        # The key of the generated text in a chunk, as compact JSON writes it and as Python's json.dumps does.
        # A JSON string cannot hold an unescaped quote, so these bytes only ever match the key itself.
        key = b'"content":' if plan.chat else b'"text":'
        self.keys = (key + b'"', key + b' "')

    def body(self, history: list | str, turn: Turn) -> bytes:
        body = dict(self.plan.base, max_tokens=turn.max_tokens)
        if self.plan.chat:
            if isinstance(turn.prompt, list) and turn.prompt and isinstance(turn.prompt[0], dict):
                body["messages"] = turn.prompt
            else:
                body["messages"] = [*history, {"role": "user", "content": turn.prompt}]
        else:
            body["prompt"] = turn.prompt if isinstance(turn.prompt, list) else history + turn.prompt
        return json.dumps(body).encode()

    @staticmethod
    def start_history(conv: Conversation, chat: bool) -> list | str:
        if chat:
            return [{"role": "system", "content": conv.system}] if conv.system else []
        return conv.system + "\n" if conv.system else ""

    async def conversation(self, conv: Conversation, first_body: bytes | None, record: bool) -> None:
        chat = self.plan.chat
        history = self.start_history(conv, chat)
        for i, turn in enumerate(conv.turns):
            body = first_body if i == 0 and first_body is not None else self.body(history, turn)
            answer = await self.request(body, record, turn.max_tokens, turn=i)
            if answer is None:
                return  # the rest of a conversation depends on this answer
            if i + 1 < len(conv.turns):
                if chat:
                    history = [
                        *history,
                        {"role": "user", "content": turn.prompt},
                        {"role": "assistant", "content": answer},
                    ]
                else:
                    history = history + turn.prompt + answer + "\n"

    def quick(self, payload: bytes) -> bool | None:
        """Whether a chunk carries generated text, from its bytes alone; None when that takes decoding it
        (the role, finish, usage and error chunks, other servers' spellings)."""
        for key in self.keys:
            at = payload.find(key)
            if at >= 0:
                u = payload.find(b'"usage"')
                if u >= 0 and not usage_is_null(payload, u):
                    return None
                return payload[at + len(key)] != QUOTE
        return None

    def decode(self, payload: bytes) -> tuple[str | None, str | None, dict | None, str | None]:
        """(any generated text, the answer's text, usage, error) of one chunk."""
        obj = json.loads(payload)
        if "error" in obj:
            err = obj["error"]
            return None, None, None, str(err.get("message", err) if isinstance(err, dict) else err)
        piece = content = None
        choices = obj.get("choices")
        if choices:
            if self.plan.chat:
                delta = choices[0].get("delta") or {}
                content = delta.get("content")
                # Reasoning models stream their thoughts first: tokens too, but not part of the answer.
                piece = content or delta.get("reasoning_content") or delta.get("reasoning")
            else:
                piece = content = choices[0].get("text")
        return piece, content, obj.get("usage"), None

    async def request(
        self, body: bytes, record: bool, max_tokens: int, turn: int = 0, stamps: array | None = None
    ) -> str | None:
        """Sends one streamed request; returns its text (empty unless the plan wants text), None if it
        failed. Per chunk: a few byte operations, a JSON decode only where `quick` cannot tell. `stamps`,
        if given, gets the arrival time of every chunk with text."""
        want_text = self.plan.want_text
        texts: list[str] = []
        ttft = -1.0
        last = 0.0
        chunks = 0
        out_tokens = prompt_tokens = cached_tokens = -1
        error = None
        gaps = array("d")
        t0 = perf_counter()  # before the send: connecting and queueing count
        end = t0
        try:
            async with self.session.post(self.plan.url, data=body, headers=self.plan.headers) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                else:
                    rest = b""
                    async for data in resp.content.iter_any():
                        now = perf_counter()  # every event of one read arrived together
                        if rest:
                            data = rest + data
                        cut = data.rfind(b"\n")
                        if cut < 0:
                            rest = data
                            continue
                        rest = data[cut + 1 :]
                        for line in data[:cut].split(b"\n"):
                            if line[:5] != b"data:":
                                continue  # event separators, comments (keep-alives), other fields
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                end = now
                                continue  # read on to the end of the body, so the connection is reused
                            nonempty = None if want_text else self.quick(payload)
                            if nonempty is None:
                                piece, content, usage, err = self.decode(payload)
                                if err is not None:
                                    error = err
                                    continue
                                if usage:
                                    out_tokens = usage.get("completion_tokens", out_tokens)
                                    prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                                    cached_tokens = cached_of(usage, cached_tokens)
                                if content and want_text:
                                    texts.append(content)
                                nonempty = bool(piece)
                            if nonempty:
                                if ttft < 0:
                                    ttft = now - t0
                                else:
                                    gaps.append(now - last)
                                last = now
                                chunks += 1
                                if stamps is not None:
                                    stamps.append(now)
                    if end == t0:
                        end = perf_counter()  # no [DONE]: the end of the body ends the request
                    if error is None and ttft < 0:
                        error = "the stream ended without any generated text"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, IndexError) as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            end = perf_counter()
        self.progress[self.plan.index] += 1
        if record:
            if out_tokens < 0:
                # No usage (mini-sglang sends none). With ignore_eos the server generates exactly max_tokens;
                # counting chunks instead would miss the tokens whose chunk is empty (a character split over
                # tokens), which some servers still send as a chunk of their own.
                out_tokens = max_tokens if self.plan.base.get("ignore_eos") else chunks
            self.record(t0, end, ttft, chunks, out_tokens, prompt_tokens, gaps, error, cached_tokens, turn)
        return None if error is not None else "".join(texts)

    def record(
        self, t0, end, ttft, chunks, out_tokens, prompt_tokens, gaps, error, cached_tokens=-1, turn=0
    ) -> None:
        cols = self.cols
        cols.start.append(t0)
        cols.end.append(end)
        cols.prompt_tokens.append(prompt_tokens)
        cols.cached_tokens.append(cached_tokens)
        cols.turn.append(turn)
        cols.chunks.append(chunks)
        if error is not None:
            cols.ok.append(0)
            cols.errors.append(error)
            cols.ttft.append(math.nan)
            cols.tpot.append(math.nan)
            cols.output_tokens.append(0)
            return
        cols.ok.append(1)
        cols.ttft.append(ttft)
        cols.tpot.append((end - t0 - ttft) / (out_tokens - 1) if out_tokens > 1 else math.nan)
        cols.output_tokens.append(out_tokens)
        cols.itl.extend(gaps)


def cached_of(usage: dict, default: int) -> int:
    """The cached prompt tokens of a usage object: OpenAI's `prompt_tokens_details.cached_tokens` (ours,
    vLLM, SGLang), else `default`."""
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        return details["cached_tokens"]
    return default


def take(counter) -> int:
    """The index of the next conversation no process has started yet."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    return index


async def run_plan(plan: Plan, ready, go, progress, counter) -> Columns:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = Runner(plan, session, progress, Columns())
        await asyncio.gather(*(warm.conversation(c, None, True) for c in plan.warmup))
        progress[plan.index] = 0
        runner = Runner(plan, session, progress, Columns())
        first = [runner.body(runner.start_history(c, plan.chat), c.turns[0]) for c in plan.conversations]
        ready.put((plan.index, warm.cols.errors))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)

        if plan.concurrency is not None:

            async def stream() -> None:
                while (i := take(counter)) < len(plan.conversations):
                    await runner.conversation(plan.conversations[i], first[i], True)

            await asyncio.gather(*(stream() for _ in range(plan.concurrency)))
        else:
            rng = random.Random(plan.seed)
            tasks = []
            due = perf_counter()
            for conv, body in zip(plan.conversations, first, strict=True):
                tasks.append(asyncio.create_task(runner.conversation(conv, body, True)))
                if plan.rate != math.inf:
                    # Absolute due times: a late wake-up shortens the next gap instead of slowing the rate.
                    due += rng.expovariate(plan.rate)
                    delay = due - perf_counter()
                    await asyncio.sleep(delay if delay > 0 else 0)
            await asyncio.gather(*tasks)
        return runner.cols


def process_main(plan: Plan, ready, go, results, progress, counter) -> None:
    """The target of each spawned process. Whatever happens, it puts one message on `results`."""
    try:
        cols = asyncio.run(run_plan(plan, ready, go, progress, counter))
    except BaseException:
        ready.put((plan.index, None))
        results.put((plan.index, None, traceback.format_exc()))
        sys.exit(1)
    results.put((plan.index, cols, None))
