"""A stand-in OpenAI-compatible server with known timings, for checking the numbers of `minisgl bench serve`:
every request answers `max_tokens` chunks of one word each, the first after --ttft-ms and the others
--itl-ms apart (due times from the first chunk, so that timer slack does not accumulate).

    python -m minisgl.bench.standin --port 8001 --ttft-ms 50 --itl-ms 5

GET /v1/models; POST /v1/chat/completions and /v1/completions, streamed (with the usage chunk when
`stream_options.include_usage` is set) or not. Prompt tokens are counted as words (token ids: their number),
as the bench's prompts are built. With --api-key, requests without `Authorization: Bearer KEY` get a 401;
--log FILE appends every request body to FILE as a JSON line. With --prefix-cache the usage says, as
`prompt_tokens_details.cached_tokens`, how many leading words of the prompt (all its messages' words in order)
an earlier request already had: what a server with a prefix cache of one-word pages would report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

WORD = " tok"


def prompt_words(body: dict) -> list:
    """The prompt as the stand-in counts it: words (of every message, in order), or token ids."""
    if "messages" in body:
        return [w for m in body["messages"] for w in str(m.get("content", "")).split()]
    prompt = body.get("prompt", "")
    return list(prompt) if isinstance(prompt, list) else str(prompt).split()


def prompt_tokens(body: dict) -> int:
    return len(prompt_words(body))


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Standin:
    def __init__(
        self,
        ttft_s: float,
        itl_s: float,
        model: str,
        api_key: str | None,
        log: str | None,
        prefix_cache: bool = False,
    ):
        self.ttft_s = ttft_s
        self.seen: list[list] | None = [] if prefix_cache else None  # every prompt so far, for the cache
        self.itl_s = itl_s
        self.model = model
        self.api_key = api_key
        self.log = open(log, "a") if log else None  # noqa: SIM115 (open as long as the server)
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions),
            ]
        )
        return app

    def refused(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            error = {"message": "invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)
        return None

    async def models(self, request: web.Request) -> web.Response:
        if refused := self.refused(request):
            return refused
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "standin"}
        return web.json_response({"object": "list", "data": [model]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.answer(request, chat=False)

    async def answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if refused := self.refused(request):
            return refused
        body = await request.json()
        if self.log:
            self.log.write(json.dumps(body) + "\n")
            self.log.flush()
        self.served += 1
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        words = prompt_words(body)
        usage = {"prompt_tokens": len(words), "completion_tokens": n}
        if self.seen is not None:
            cached = max((common_prefix(words, s) for s in self.seen), default=0)
            self.seen.append(words)
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.served}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion"}
        head |= {"created": int(time.time()), "model": self.model}
        if not body.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * (n - 1))
            text = WORD * n
            choice = {"index": 0, "finish_reason": "length"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            obj = "chat.completion" if chat else "text_completion"
            return web.json_response({**head, "object": obj, "choices": [choice], "usage": usage})

        def event(piece: str | None, finish: str | None = None, role: bool = False) -> bytes:
            choice: dict = {"index": 0}
            if chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | (
                    {"content": piece} if piece is not None else {}
                )
            else:
                choice["text"] = piece or ""
            choice["finish_reason"] = finish
            return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        first, later = event(WORD, role=True), event(WORD)  # the same bytes every time: cheap at ITL 0
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.ttft_s)
        start = loop.time()
        for i in range(n):
            if i and self.itl_s > 0:
                await asyncio.sleep(max(0.0, start + i * self.itl_s - loop.time()))
            await resp.write(first if i == 0 else later)
        await resp.write(event(None if chat else "", finish="length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(
                b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n"
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m minisgl.bench.standin",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=50.0, help="delay before the first chunk")
    p.add_argument("--itl-ms", type=float, default=5.0, help="delay between chunks (0: as fast as it can)")
    p.add_argument("--model", default="standin", help="the model id GET /v1/models lists")
    p.add_argument("--api-key", default=None, help="answer 401 to requests without this bearer key")
    p.add_argument("--log", default=None, help="append each request body to this file (JSON lines)")
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="report the words an earlier prompt shared as usage.prompt_tokens_details.cached_tokens",
    )
    a = p.parse_args(argv)
    server = Standin(a.ttft_ms / 1000, a.itl_ms / 1000, a.model, a.api_key, a.log, a.prefix_cache)
    ready = f"standin serving on http://{a.host}:{a.port} (TTFT {a.ttft_ms:g} ms, ITL {a.itl_ms:g} ms)"
    web.run_app(
        server.app(), host=a.host, port=a.port, print=lambda _: print(ready, flush=True), access_log=None
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
