"""`minisgl ask`: sends one prompt to a running engine over ZeroMQ and streams the answer to the terminal.

minisgl ask "Write a haiku about Rust"          # chat-templated
minisgl ask --raw "def quicksort(xs):"          # raw completion
"""

from __future__ import annotations

import argparse
import sys

from minisgl.launch import DEFAULT_LISTEN


def main(argv: list[str] | None = None, prog: str = "minisgl ask") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("prompt", help="the user message (or, with --raw, the text to continue)")
    p.add_argument(
        "--address",
        default=DEFAULT_LISTEN,
        metavar="ENDPOINT",
        help=f"the server's ZeroMQ socket [{DEFAULT_LISTEN}]",
    )
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="longest answer [256]")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy [0]")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling [1: off]")
    p.add_argument("--top-k", type=int, default=-1, metavar="K", help="top-k sampling [-1: off]")
    p.add_argument("--seed", type=int, metavar="N", help="for a reproducible sample [drawn by the server]")
    args = p.parse_args(argv)
    # Only now: --help needs no package beyond the standard library.
    from minisgl.client.client import Client, MinisglError

    if args.raw:
        prompt = {"text": args.prompt}
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = {"messages": [*messages, {"role": "user", "content": args.prompt}]}
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    with Client(args.address) as client:
        rid = client.submit(**prompt, sampling=sampling, stream=True)
        try:
            for msg in client.replies(rid):
                if msg["type"] == "delta":
                    sys.stdout.write(msg["text"])
                    sys.stdout.flush()
                else:
                    sys.stdout.write("\n")
                    tail = f"[{msg['finish_reason']}: {msg['prompt_tokens']} prompt + "
                    print(tail + f"{msg['completion_tokens']} completion tokens]", file=sys.stderr)
                    if msg["finish_reason"] == "error":
                        print(msg.get("message"), file=sys.stderr)
                        return 1
        except MinisglError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            client.abort(rid)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
