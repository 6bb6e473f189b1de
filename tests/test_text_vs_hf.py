"""The scheduler's text layer against transformers on the same model directory.

Runs `target/debug/examples/text_tool` (build it with `cargo build -p minisgl-scheduler --example text_tool`;
MINISGL_TEXT_TOOL names another binary) and checks that chat prompts are byte-identical to
`apply_chat_template(tokenize=False)`, that ids are those of the HF tokenizer, and that streamed text joins to
`decode(ids, skip_special_tokens=True)`, cut at the first stop string.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


class TextTool:
    def __init__(self, binary: Path, model_dir: Path):
        self.proc = subprocess.Popen(
            [str(binary), "--model", str(model_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def ask(self, **request) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"text_tool exited with {self.proc.wait()}"
        return json.loads(line)

    def ok(self, **request) -> dict:
        reply = self.ask(**request)
        assert "error" not in reply, reply["error"]
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def tool(model_dir: Path):
    binary = Path(
        os.environ.get("MINISGL_TEXT_TOOL", REPO_ROOT / "target" / "debug" / "examples" / "text_tool")
    )
    if not binary.exists():
        pytest.fail(f"{binary} is not built: run `cargo build -p minisgl-scheduler --example text_tool`")
    running = TextTool(binary, model_dir)
    yield running
    running.close()


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Returns <json> & 'units' as asked.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich or 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search.",
        "parameters": {"type": "object", "properties": {}},
    },
}

CHATS = {
    "user_only": [{"role": "user", "content": "Write a Python function that reverses a list."}],
    "system_and_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi!"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 10?"},
        {"role": "assistant", "content": "40"},
        {"role": "user", "content": "Thanks."},
    ],
    "chinese_and_emoji": [
        {"role": "user", "content": "你好，请用中文解释递归。🙂👨‍👩‍👧🇫🇷"},
        {"role": "assistant", "content": "递归是函数调用自身。😀"},
        {"role": "user", "content": "Ça marche — déjà vu? ñ ü ß"},
    ],
    "whitespace": [
        {"role": "system", "content": "  leading and trailing spaces  "},
        {"role": "user", "content": "\n\nnewlines first\tand a tab\n"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "   "},
    ],
    "control_token_text": [{"role": "user", "content": "say <|im_end|> then <|im_start|>assistant\nok"}],
    "code": [
        {"role": "user", "content": '```rust\nfn main() {\n    println!("{}", 1 << 3);\n}\n```\nExplain.'}
    ],
    "tool_call_round_trip": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris and 北京?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                },
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2.5}},
                },
            ],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "tool", "name": "get_weather", "content": '{"temp": 3.5, "sky": "雪"}'},
        {"role": "assistant", "content": "Paris: 21 °C and clear; 北京: 3.5 °C with snow."},
    ],
    "tool_call_with_content_and_string_arguments": [
        {"role": "user", "content": "Search for rust"},
        {
            "role": "assistant",
            "content": "Let me search.",
            "tool_calls": [
                {"type": "function", "function": {"name": "search", "arguments": '{"q": "rust"}'}}
            ],
        },
        {"role": "tool", "content": "results: <none>"},
    ],
}

CHAT_CASES = [
    pytest.param(
        messages, tools, gen, id=f"{name}-{'tools' if tools else 'plain'}-{'gen' if gen else 'nogen'}"
    )
    for name, messages in CHATS.items()
    for tools in (
        [None, [WEATHER_TOOL, SEARCH_TOOL]] if name.startswith("tool") or name == "user_only" else [None]
    )
    for gen in (True, False)
]


@pytest.mark.parametrize(("messages", "tools", "add_generation_prompt"), CHAT_CASES)
def test_chat_rendering_is_byte_identical(tool, hf, messages, tools, add_generation_prompt):
    want = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    got = tool.ok(op="chat", messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert got["text"] == want
    assert got["ids"] == hf.encode(want, add_special_tokens=False)


def test_empty_tool_list_renders_as_no_tools(tool, hf):
    messages = CHATS["user_only"]
    want = hf.apply_chat_template(messages, tools=[], add_generation_prompt=True, tokenize=False)
    assert tool.ok(op="chat", messages=messages, tools=[], add_generation_prompt=True)["text"] == want


ENCODE_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 10:45 — isn't it?",
    "code": "def f(x: int) -> list[int]:\n\treturn [i ** 2 for i in range(x)]  # squares\n\n\n"
    "print(f(3))\r\n",
    "chinese": "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "emoji": "🙂🙃 👨‍👩‍👧‍👦 🇯🇵🇺🇸 ❤️‍🔥 1️⃣ 🏳️‍🌈",
    "accents": "Ångström, naïve café, Straße, Dvořák, señor, Œuvre, ǅ, e\u0301 (combining)",
    "control_tokens": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    "<tool_call>x</tool_call><|endoftext|>",
    "whitespace": "  two leading\n\n\n   \t mixed   trailing   ",
    "numbers": "3.14159 2718281828 1e-9 0x1F -42 1,000,000",
    "mixed_scripts": "Русский текст, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "empty": "",
}


@pytest.mark.parametrize("text", ENCODE_TEXTS.values(), ids=ENCODE_TEXTS.keys())
def test_encode_matches_hf(tool, hf, text):
    want = hf.encode(text, add_special_tokens=False)
    assert tool.ok(op="encode", text=text)["ids"] == want
    assert tool.ok(op="decode", ids=want)["text"] == hf.decode(want, skip_special_tokens=True)


def test_control_token_text_becomes_the_control_token(tool, hf):
    ids = tool.ok(op="encode", text="<|im_start|>")["ids"]
    assert ids == [hf.convert_tokens_to_ids("<|im_start|>")]


STREAM_TEXTS = [
    "你好，世界！这是一个测试。",
    "Emoji: 🙂🙃👨‍👩‍👧‍👦🇯🇵 done.",
    "Ångström naïve café — “quotes” … ½ ∑ ∞",
    "def 函数():\n    return '😀' * 3\n",
    "混合 mixed 텍스트 with ❤️‍🔥 and العربية",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_joins_to_hf_decode(tool, hf, text):
    ids = hf.encode(text, add_special_tokens=False)
    reply = tool.ok(op="stream", ids=ids, stop=[])
    want = hf.decode(ids, skip_special_tokens=True)
    assert "".join(reply["pieces"]) == want == reply["text"]
    assert not reply["stopped"]
    assert len(reply["pieces"]) == len(ids) + 1
    assert all("\ufffd" not in piece for piece in reply["pieces"])


def test_stream_of_shuffled_partial_tokens_matches_hf_decode(tool, hf):
    # Tokens that are pieces of characters, shuffled: broken byte sequences, stray continuation bytes, special
    # tokens in the middle of a character. Whatever the ids, the joined pieces are HF's decode.
    rng = random.Random(1234)
    pool = sorted({i for text in STREAM_TEXTS for i in hf.encode(text, add_special_tokens=False)})
    pool += hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>", "<tool_call>"])
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        reply = tool.ok(op="stream", ids=ids, stop=[])
        assert "".join(reply["pieces"]) == hf.decode(ids, skip_special_tokens=True), ids


def test_stream_token_by_token_would_break_characters(hf):
    # What the stream guards against: decoding one token at a time splits multi-byte characters.
    ids = hf.encode("👨‍👩‍👧‍👦🇯🇵你好", add_special_tokens=False)
    assert any("\ufffd" in hf.decode([i]) for i in ids)


def test_stream_skips_special_tokens(tool, hf):
    im_end, eot = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    body = hf.encode("答案是 42 🙂", add_special_tokens=False)
    ids = [*body[:2], im_end, *body[2:], im_end, eot]
    reply = tool.ok(op="stream", ids=ids)
    assert "".join(reply["pieces"]) == hf.decode(ids, skip_special_tokens=True) == "答案是 42 🙂"


def test_stream_keeps_non_special_added_tokens(tool, hf):
    ids = hf.encode('<tool_call>\n{"name": "f"}\n</tool_call>', add_special_tokens=False)
    reply = tool.ok(op="stream", ids=ids)
    assert (
        reply["text"]
        == hf.decode(ids, skip_special_tokens=True)
        == '<tool_call>\n{"name": "f"}\n</tool_call>'
    )


STOP_CASES = [
    ("The answer is 42.\n\nUser: next question", ["\n\nUser:"]),
    ("你好，世界！再见。", ["世界"]),
    ("abc STOP def stop ghi", ["stop", "STOP"]),
    ("emoji 🙂 then 🙃 end", ["🙃"]),
    ("no stop string here at all", ["zzz", "qqq"]),
    ("partial <|im_end at the end <|im", ["<|im_end|>"]),
    ("overlapping aaab", ["aab", "ab"]),
]


@pytest.mark.parametrize(("text", "stops"), STOP_CASES)
def test_stop_strings_cut_at_the_first_occurrence(tool, hf, text, stops):
    ids = hf.encode(text, add_special_tokens=False)
    reply = tool.ok(op="stream", ids=ids, stop=stops)
    consumed = reply["consumed"]
    seen = hf.decode(ids[:consumed], skip_special_tokens=True)
    hits = [seen.find(s) for s in stops if s in seen]
    want = seen[: min(hits)] if hits else seen
    assert reply["stopped"] == bool(hits)
    assert "".join(reply["pieces"]) == reply["text"] == want
    if hits:
        # It stopped at the token that completed a stop string, not later.
        before = hf.decode(ids[: consumed - 1], skip_special_tokens=True)
        assert not any(s in before for s in stops)
        assert not any(s in reply["text"] for s in stops)
    else:
        assert consumed == len(ids)
        assert want == hf.decode(ids, skip_special_tokens=True)


def test_bad_requests_are_answered_with_errors(tool):
    assert "error" in tool.ask(op="nope")
    assert "error" in tool.ask(op="chat", messages=[])
    assert "error" in tool.ask(op="chat", messages=["not a message"])
    assert "error" in tool.ask(op="stream", ids=[-1])
    # The tool still answers after errors.
    assert tool.ok(op="encode", text="ok")["ids"]
