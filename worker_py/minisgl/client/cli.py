"""One-shot command: sends a prompt to a running engine and streams the answer to the terminal.

python -m minisgl.client.cli "Write a haiku about Rust"          # chat-templated
python -m minisgl.client.cli --raw "def quicksort(xs):"           # raw completion
"""

from __future__ import annotations

import argparse
import sys

from minisgl.client.client import DEFAULT_ADDRESS, Client, MinisglError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisgl-ask", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as raw text, without the chat template"
    )
    p.add_argument("--system", default=None, help="a system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

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
