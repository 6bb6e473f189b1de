"""`minisgl chat`: chat in the terminal with a running server, over its OpenAI-compatible HTTP API.

The whole conversation is sent each turn, and the answer streams as it is generated. /reset forgets the
conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer. When stdin is not a terminal, each line of it
is one user message, and each answer is printed on stdout.

    minisgl chat --system "You answer in one sentence."
    printf 'Hi!\\nSay that again.\\n' | minisgl chat --max-tokens 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8000/v1"
# Long enough for a long prefill on the CPU; the server also sends a comment every 15 s of silence.
TIMEOUT_S = 300.0
COMMANDS_HELP = "/reset forgets the conversation, /exit or Ctrl-D leaves"


class ChatError(RuntimeError):
    pass


class Api:
    """The few calls of the OpenAI HTTP API that chat needs, over http.client: no dependency to install."""

    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ChatError(f"{url}: expected an http:// or https:// URL such as {DEFAULT_URL}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def _request(
        self, method: str, path: str, body: dict | None = None
    ) -> tuple[HTTPConnection, HTTPResponse]:
        kind = HTTPSConnection if self._https else HTTPConnection
        conn = kind(self._host, self._port, timeout=TIMEOUT_S)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, self._base + path, body=payload, headers=self._headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status != 200:
            with contextlib.closing(conn):
                raise ChatError(f"{method} {self._base + path}: {resp.status} {_error_message(resp.read())}")
        return conn, resp

    def models(self) -> list[str]:
        conn, resp = self._request("GET", "/models")
        with contextlib.closing(conn):
            return [m["id"] for m in json.loads(resp.read()).get("data", [])]

    def stream_chat(self, body: dict) -> Iterator[dict]:
        """The chunks of a streamed chat completion; closing the iterator early closes the connection, which
        the server takes as an abort."""
        conn, resp = self._request("POST", "/chat/completions", {**body, "stream": True})
        with contextlib.closing(conn):
            for data in sse_data(resp):
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(_error_message(data.encode()))
                yield chunk


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()


def sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """The data of each server-sent event: `data:` lines up to a blank line, joined by newlines. Comments (the
    server's keep-alives) and other fields are skipped."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class Chat:
    def __init__(self, api: Api, args: argparse.Namespace, model: str | None):
        self.api = api
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history = list(self.system)
        self.options: dict = {"stream_options": {"include_usage": True}}
        for key, value in (
            ("model", model),
            ("temperature", args.temperature),
            ("max_tokens", args.max_tokens),
        ):
            if value is not None:
                self.options[key] = value

    def reset(self) -> None:
        self.history = list(self.system)

    def turn(self, user: str) -> None:
        """Streams the answer to `user` to stdout; the exchange joins the history only once it is complete, so
        a failed or interrupted turn leaves the conversation as it was."""
        messages = [*self.history, {"role": "user", "content": user}]
        parts: list[str] = []
        finish, usage, answering = None, None, False
        stream = self.api.stream_chat({**self.options, "messages": messages})
        try:
            with contextlib.closing(stream):  # at once, also on Ctrl-C: the server aborts the request
                for chunk in stream:
                    answering = True
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            parts.append(piece)
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
        finally:
            if answering:
                sys.stdout.write("\n")
                sys.stdout.flush()
        if finish is None:
            raise ChatError("the stream ended before the answer did")
        if usage:
            tokens = f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
            print(f"[{finish}: {tokens}]", file=sys.stderr)
        self.history = [*messages, {"role": "assistant", "content": "".join(parts)}]


def _user_lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()  # like a shell: Ctrl-C at the prompt drops the line, Ctrl-D leaves


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server's OpenAI API base URL [{DEFAULT_URL}]")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MINISGL_API_KEY"),
        metavar="KEY",
        help="bearer token, for a server that requires one [$MINISGL_API_KEY]",
    )
    p.add_argument("--model", metavar="NAME", help="the model to ask for [the first the server lists]")
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    p.add_argument("--temperature", type=float, metavar="T", help="0 is greedy [the server's default]")
    p.add_argument("--max-tokens", type=int, metavar="N", help="longest answer [what the context leaves]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "minisgl chat") -> int:
    args = parse_args(argv, prog)
    interactive = sys.stdin.isatty()
    try:
        api = Api(args.url, args.api_key)
        model = args.model or next(iter(api.models()), None)
    except (ChatError, OSError, ValueError) as e:
        print(f"minisgl chat: cannot use {args.url}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if interactive:
        with contextlib.suppress(ImportError):  # not every Python is built with it
            import readline  # noqa: F401  (importing it gives input() line editing and history)

        print(f"chatting with {model} at {args.url}; {COMMANDS_HELP}", file=sys.stderr)
    chat = Chat(api, args, model)
    failed = 0
    for line in _user_lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            chat.reset()
            print("[the conversation is forgotten]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}: {COMMANDS_HELP}]", file=sys.stderr)
            continue
        try:
            chat.turn(text)
        except (ChatError, OSError, ValueError) as e:
            print(f"[error: {e}]", file=sys.stderr)
            failed += 1
        except KeyboardInterrupt:
            if not interactive:
                return 130
            print("[stopped]", file=sys.stderr)
    return 1 if failed else 0
