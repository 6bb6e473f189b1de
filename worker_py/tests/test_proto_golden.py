"""The golden files written by proto/tests/golden.rs, read with the Python mirror. Every expected value is
written out here by hand from docs/protocol.md, not taken from the Rust side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from minisgl.proto import messages
from minisgl.proto.ring import MAGIC
from minisgl.proto.step import (
    RESULT_ARRAYS,
    STEP_ARRAYS,
    Capacity,
    ResultLayout,
    ResultSlot,
    StepLayout,
    StepView,
    read_result,
)

ROOT = Path(__file__).resolve().parents[2]
TESTDATA = ROOT / "proto" / "testdata"
CAP = Capacity(max_reqs=4, max_tokens=8, max_kv_indices=6, mask_words=3)


def golden(name: str) -> bytes:
    path = TESTDATA / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run UPDATE_GOLDEN=1 cargo test -p minisgl-proto --test golden")
    return path.read_bytes()


def test_layout_offsets_match_the_protocol_by_hand():
    # 64-byte header, then each array on the next multiple of 64 after the previous one ends.
    layout = StepLayout(CAP)
    offsets = {a.name: (a.offset, a.nbytes) for a in layout.arrays}
    assert offsets == {
        "req_slot": (64, 16),
        "seq_len": (128, 16),
        "qo_indptr": (192, 20),
        "kv_indptr": (256, 20),
        "kv_last_page_len": (320, 16),
        "input_ids": (384, 32),
        "positions": (448, 32),
        "out_loc": (512, 32),
        "kv_indices": (576, 24),
        "join_slot": (640, 16),
        "join_temperature": (704, 16),
        "join_top_p": (768, 16),
        "join_top_k": (832, 16),
        "join_seed": (896, 32),
        "join_min_p": (960, 16),
        "join_presence_penalty": (1024, 16),
        "join_frequency_penalty": (1088, 16),
        "join_repetition_penalty": (1152, 16),
        "join_prompt_len": (1216, 16),
        "join_logprobs": (1280, 16),
        "join_bias_indptr": (1344, 20),
        "join_bias_ids": (1408, 4 * 4 * 300),
        "join_bias_values": (6208, 4 * 4 * 300),
        "mask_row": (11008, 16),
        "mask_bits": (11072, 4 * 3 * 4),
        "logprob_target": (11136, 8 * 4),
    }
    assert layout.slot_bytes == 11200
    result = ResultLayout(CAP)
    offsets = {a.name: (a.offset, a.nbytes) for a in result.arrays}
    assert offsets == {
        "tokens": (64, 16),
        "logprob": (128, 16),
        "top_ids": (192, 320),
        "top_logprobs": (512, 320),
        "prompt_logprob": (832, 8 * 4),
        "prompt_top_ids": (896, 8 * 20 * 4),
        "prompt_top_logprobs": (1536, 8 * 20 * 4),
    }
    assert result.slot_bytes == 2176


def layout_rows(layout) -> list[dict]:
    return [
        {
            "name": a.name,
            "type": {"<i4": "i32", "<u4": "u32", "<f4": "f32", "<u8": "u64"}[a.dtype.str],
            "capacity": a.capacity,
            "used": a.used_by,
            "offset": a.offset,
            "bytes": a.nbytes,
        }
        for a in layout.arrays
    ]


def test_both_sides_lay_out_the_same_arrays():
    """slot_layout.json is what the Rust tables generate; the Python tables must give the same rows."""
    doc = json.loads(golden("slot_layout.json"))
    cap = Capacity(**doc["capacity"])
    assert cap == CAP
    step, result = StepLayout(cap), ResultLayout(cap)
    assert layout_rows(step) == doc["step"]["arrays"]
    assert step.slot_bytes == doc["step"]["slot_bytes"]
    assert layout_rows(result) == doc["result"]["arrays"]
    assert result.slot_bytes == doc["result"]["slot_bytes"]


def doc_table(section: str) -> list[tuple[str, str, str]]:
    """(array, type, length used) of the arrays table under `### {section}` in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+)\[([^\]]+)\] \| ([^|]+?) \|", body, flags=re.M)
    return [(name, f"{elem}[{cap}]", used) for name, elem, cap, used in rows]


@pytest.mark.parametrize(
    ("section", "table"),
    [("Step slot (ring kind 1)", STEP_ARRAYS), ("Result slot (ring kind 2)", RESULT_ARRAYS)],
)
def test_the_protocol_tables_list_the_same_arrays(section, table):
    """docs/protocol.md is the specification: its tables name every array, in order, with type and length."""
    layout = StepLayout(CAP) if table is STEP_ARRAYS else ResultLayout(CAP)
    ours = [(r["name"], f"{r['type']}[{r['capacity']}]", r["used"]) for r in layout_rows(layout)]
    assert doc_table(section) == ours


def test_ring_header():
    b = golden("ring_header.bin")
    assert len(b) == 512
    u32 = np.frombuffer(b, dtype="<u4")
    u64 = np.frombuffer(b, dtype="<u8")
    assert b[:8] == b"MSGLRING" and int(u64[0]) == MAGIC == 0x474E49524C47534D
    assert [int(u32[i]) for i in range(2, 16)] == [
        4,  # version
        1,  # kind: step ring
        512,  # header bytes
        4,  # slot count
        11200,  # slot bytes
        2,  # readers
        4242,  # writer pid
        0,  # reserved
        1_764_000_000_123 & 0xFFFFFFFF,  # writer heartbeat, low half
        1_764_000_000_123 >> 32,  # writer heartbeat, high half
        4,  # R
        8,  # T
        6,  # K
        16,  # page size
    ]
    assert int(u64[5]) == 1_764_000_000_123
    assert int(u64[8]) == 7  # write sequence
    assert int(u32[18]) == 3  # W: mask words, at 72
    readers = [
        (int(u64[(128 + 64 * i) // 8]), int(u32[(136 + 64 * i) // 4]), int(u64[(144 + 64 * i) // 8]))
        for i in range(4)
    ]
    assert readers == [(5, 4343, 1_764_000_000_456), (6, 4344, 1_764_000_000_789), (0, 0, 0), (0, 0, 0)]
    # Nothing else is set: the write sequence's cache line past its word, the readers' lines past theirs, and
    # the reserved tail are all zero.
    words = set(range(0, 64, 1))
    used = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 18, 24, 25, 26}
    assert all(int(u64[w]) == 0 for w in words - used)


def test_step_slot():
    b = golden("step_slot.bin")
    assert len(b) == 11200
    step = StepView(StepLayout(CAP), b)
    header = (step.step_id, step.kind, step.num_reqs, step.num_tokens, step.num_kv_indices, step.num_joins)
    assert header + (step.num_bias, step.num_masks) == (7, messages.STEP_EXTEND, 3, 8, 6, 2, 3, 1)
    assert (step.prompt_logprobs, step.prompt_top) == (1, 3)  # at 36 and 40
    assert step.logprob_target.tolist() == [872, 198, 9707, 11, -1, -1, -1, -1]
    assert step.req_slot.tolist() == [2, 0, 3]
    assert step.seq_len.tolist() == [21, 6, 40]
    assert step.qo_indptr.tolist() == [0, 5, 6, 8]
    assert step.kv_indptr.tolist() == [0, 2, 3, 6]
    assert step.kv_last_page_len.tolist() == [5, 6, 8]
    assert step.input_ids.tolist() == [151644, 872, 198, 9707, 11, -1, 1350, 0]
    assert step.positions.tolist() == [16, 17, 18, 19, 20, 5, 38, 39]
    assert step.out_loc.tolist() == [48, 49, 50, 51, 52, 149, 70, 71]
    assert step.kv_indices.tolist() == [7, 3, 9, 0, 12, 4]
    assert step.join_slot.tolist() == [2, 3]
    assert step.join_temperature.dtype == np.float32
    assert step.join_temperature.tolist() == [np.float32(0.7), 0.0]
    assert step.join_top_p.tolist() == [np.float32(0.95), 1.0]
    assert step.join_top_k.tolist() == [40, -1]
    assert step.join_seed.dtype == np.uint64
    assert step.join_seed.tolist() == [2**63 + 12345, 42]
    assert step.join_min_p.tolist() == [np.float32(0.05), 0.0]
    assert step.join_presence_penalty.tolist() == [0.5, 0.0]
    assert step.join_frequency_penalty.tolist() == [-0.25, 0.0]
    assert step.join_repetition_penalty.tolist() == [np.float32(1.1), 1.0]
    assert step.join_prompt_len.tolist() == [21, 2**31 - 1]
    assert step.join_logprobs.tolist() == [5, 0]
    assert step.join_bias_indptr.tolist() == [0, 2, 3]
    assert step.join_bias_ids.tolist() == [151645, 11, 198]
    assert step.join_bias_values.tolist() == [-100.0, 2.5, 0.75]
    assert step.mask_row.tolist() == [-1, -1, 0]
    assert step.mask_bits.dtype == np.uint32
    assert step.mask_bits.tolist() == [1, 2, 2**31]  # tokens 0, 33 and 95
    # The unused tails are zero: the scheduler writes only what the counts cover.
    raw = np.frombuffer(b, dtype=np.uint8)
    assert not raw[64 + 44 : 128].any() and not raw[6208 + 12 : 11008].any()
    assert not raw[11008 + 12 : 11072].any() and not raw[11072 + 12 : 11136].any()


def test_result_slot():
    b = golden("result_slot.bin")
    assert len(b) == 2176
    step_id, status, tokens = read_result(ResultLayout(CAP), b)
    assert (step_id, status, tokens.tolist()) == (7, messages.RESULT_OK, [151645, 13, 2])
    assert ResultSlot(ResultLayout(CAP), bytearray(b)).read_logprobs() is None


def test_result_slot_logprobs():
    b = golden("result_slot_logprobs.bin")
    slot = ResultSlot(ResultLayout(CAP), bytearray(b))
    step_id, status, tokens = slot.read()
    assert (step_id, status, tokens.tolist()) == (7, messages.RESULT_OK, [151645, 13, 2])
    lp = slot.read_logprobs()
    assert lp.logprob.tolist() == [-0.125, -2.5, -0.75]
    assert lp.top_ids.tolist() == [[151645, 198], [11, 13], [2, 0]]
    assert lp.top_logprobs.tolist() == [[-0.125, -3.0], [-1.5, -2.5], [-0.75, -0.875]]
    prompt = slot.read_prompt_logprobs()
    assert prompt.logprob.tolist() == [-5.5, -0.25, -12.0, -1.75]
    assert prompt.top_ids.tolist() == [[9, 872, 2], [198, 5, 6], [7, 8, 9707], [11, 0, 1]]
    assert prompt.top_logprobs.tolist()[2] == [-0.5, -1.25, -12.0]
    # The Python writer gives the same bytes.
    ours = bytearray(len(b))
    slot = ResultSlot(ResultLayout(CAP), ours)
    slot.write(7, np.array([151645, 13, 2], np.int32), logprobs=lp, prompt=prompt)
    assert bytes(ours) == b


SAMPLING_ALL = {
    "max_tokens": 64,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "seed": 2**64 - 1,
    "stop": ["\n\n", "END"],
    "stop_token_ids": [151645, 151643],
    "ignore_eos": True,
}

# Every sampling option, none at its default, in the order the scheduler writes them.
OPTIONS = {
    "min_p": 0.05,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "repetition_penalty": 1.2,
    "logit_bias": [[9707, 5.0], [151645, -100.0]],
    "logprobs": 2,
    "prompt_logprobs": 3,
    "skip_special_tokens": False,
}

# The JSON schema of client_generate_json_schema.msgpack, keys in the order the scheduler wrote them.
USER_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name"],
}

CLIENT = {
    "client_generate.msgpack": {
        "type": "generate",
        "rid": "req-1",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Héllo 🌍", "name": "ana"},
        ],
        "sampling": SAMPLING_ALL,
        "stream": False,
    },
    "client_generate_input_ids.msgpack": {
        "type": "generate",
        "rid": "req-2",
        "input_ids": [1, 2, 151643],
        "sampling": {
            "max_tokens": 128,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "seed": None,
            "stop": [],
            "stop_token_ids": [],
            "ignore_eos": False,
        },
        "stream": True,
    },
    "client_generate_text.msgpack": {
        "type": "generate",
        "rid": "req-3",
        "text": "def fib(n):",
        "sampling": {**messages.SAMPLING_DEFAULTS, "seed": 7},
        "stream": True,
    },
    "client_generate_n.msgpack": {
        "type": "generate",
        "rid": "req-5",
        "text": "def fib(n):",
        "sampling": {**messages.SAMPLING_DEFAULTS, "temperature": 0.8, "seed": 7},
        "stream": True,
        "n": 3,
    },
    "client_generate_options.msgpack": {
        "type": "generate",
        "rid": "req-6",
        "text": "def fib(n):",
        "sampling": {**messages.SAMPLING_DEFAULTS, "seed": 7, **OPTIONS},
        "stream": True,
    },
    "client_generate_tools.msgpack": {
        "type": "generate",
        "rid": "req-7",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "sampling": {**messages.SAMPLING_DEFAULTS, "temperature": 0.0},
        "stream": True,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    },
    "client_generate_json_schema.msgpack": {
        "type": "generate",
        "rid": "req-7",
        "text": "A user as JSON:",
        "sampling": {**messages.SAMPLING_DEFAULTS, "min_tokens": 3, "json_schema": USER_SCHEMA},
        "stream": True,
    },
    "client_generate_grammar.msgpack": {
        "type": "generate",
        "rid": "req-8",
        "text": "Yes or no?",
        "sampling": {**messages.SAMPLING_DEFAULTS, "grammar": 'start: "yes" | "no"'},
        "stream": True,
    },
    "client_abort.msgpack": {"type": "abort", "rid": "req-1"},
    "client_info.msgpack": {"type": "info"},
    "client_generate_keepalive.msgpack": {
        "type": "generate",
        "rid": "req-7",
        "text": "def fib(n):",
        "sampling": messages.SAMPLING_DEFAULTS,
        "stream": True,
        "keepalive": True,
    },
    "client_keepalive.msgpack": {"type": "keepalive"},
}

# Two calls as the scheduler parses them: index, id, name, arguments (JSON text).
TOOL_CALLS = [
    {
        "index": 0,
        "id": "call_AbC123xyz789AbC123xyz789",
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    },
    {"index": 1, "id": "call_Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2", "name": "now", "arguments": "{}"},
]

# One entry per token id: its logprob, and the most likely tokens as [id, logprob] pairs.
LOGPROBS = [
    {"logprob": -0.25, "top": [[9707, -0.25], [13048, -1.5]]},
    {"logprob": -2.0, "top": [[11, -0.5], [0, -2.0]]},
]

SERVER = {
    "server_delta.msgpack": {
        "type": "delta",
        "rid": "req-1",
        "index": 1,
        "token_ids": [9707, 0],
        "text": "Hi!",
    },
    "server_final.msgpack": {
        "type": "final",
        "rid": "req-1",
        "index": 1,
        "finish_reason": "stop",
        "prompt_tokens": 21,
        "completion_tokens": 3,
        "cached_tokens": 16,
        "token_ids": [9707, 0, 151645],
        "text": "Hi!",
        "message": None,
    },
    "server_delta_logprobs.msgpack": {
        "type": "delta",
        "rid": "req-6",
        "index": 0,
        "token_ids": [9707, 0],
        "text": "Hi!",
        "logprobs": LOGPROBS,
    },
    "server_final_logprobs.msgpack": {
        "type": "final",
        "rid": "req-6",
        "index": 0,
        "finish_reason": "length",
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "token_ids": [9707, 0],
        "text": "Hi!",
        "message": None,
        "logprobs": LOGPROBS,
    },
    "server_final_prompt_logprobs.msgpack": {
        "type": "final",
        "rid": "req-9",
        "index": 0,
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "token_ids": [9707, 0],
        "text": "Hi!",
        "message": None,
        "prompt_logprobs": [
            None,
            {"logprob": -3.5, "top": [[872, -0.75]]},
            {"logprob": -0.125, "top": [[198, -0.125]]},
        ],
        "prompt_token_ids": [151644, 872, 198],
    },
    "server_delta_tool_calls.msgpack": {
        "type": "delta",
        "rid": "req-7",
        "index": 0,
        "token_ids": [151658],
        "text": "",
        "tool_calls": TOOL_CALLS[:1],
    },
    "server_final_tool_calls.msgpack": {
        "type": "final",
        "rid": "req-7",
        "index": 0,
        "finish_reason": "stop",
        "prompt_tokens": 180,
        "completion_tokens": 40,
        "cached_tokens": 0,
        "token_ids": [151657, 198, 151658, 151645],
        "text": "Let me check.",
        "message": None,
        "tool_calls": TOOL_CALLS,
    },
    "server_final_error.msgpack": {
        "type": "final",
        "rid": "req-4",
        "index": 0,
        "finish_reason": "error",
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "token_ids": [],
        "text": "",
        "message": "worker failed the step",
    },
    "server_final_memory.msgpack": {
        "type": "final",
        "rid": "req-8",
        "index": 0,
        "finish_reason": "memory",
        "prompt_tokens": 40,
        "completion_tokens": 139,
        "cached_tokens": 0,
        "token_ids": [],
        "text": "",
        "message": None,
    },
    "server_heartbeat.msgpack": {"type": "heartbeat"},
    "server_error.msgpack": {
        "type": "error",
        "rid": "req-1",
        "code": "invalid_params",
        "message": "top_p must be in (0, 1], got 1.5",
    },
    "server_error_no_rid.msgpack": {
        "type": "error",
        "rid": None,
        "code": "malformed",
        "message": "the message is not a map",
    },
    "server_info.msgpack": {
        "type": "info",
        "model": "Qwen2.5-Coder-0.5B-Instruct",
        "vocab_size": 151936,
        "max_seq_len": 32768,
        "max_batch": 256,
        "page_size": 16,
        "num_pages": 8192,
        "eos_token_ids": [151645, 151643],
        "live_requests": 3,
    },
}

MODEL = {
    "architecture": "Qwen2ForCausalLM",
    "vocab_size": 151936,
    "num_layers": 24,
    "hidden_size": 896,
    "num_heads": 14,
    "num_kv_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 32768,
    "dtype": "float32",
    "device": "cpu",
}

CONTROL = {
    "control_hello.msgpack": {
        "type": "hello",
        "pid": 31337,
        "model": MODEL,
        "num_pages": 4096,
        "page_size": 16,
        "max_batch": 64,
        "max_tokens": 8192,
    },
    "control_ready.msgpack": {"type": "ready"},
    "control_status.msgpack": {"type": "status", "phase": "loading weights"},
    "control_welcome.msgpack": {
        "type": "welcome",
        "step_ring": "minisgl-1234-step",
        "result_ring": "minisgl-1234-result",
        "pid": 1234,
    },
    "control_ok.msgpack": {"type": "ok"},
    "control_error.msgpack": {"type": "error", "message": "expected hello"},
}


@pytest.mark.parametrize("name,expected", [*CLIENT.items(), *SERVER.items(), *CONTROL.items()])
def test_message(name: str, expected: dict):
    got = msgpack.unpackb(golden(name))
    assert got == expected
    # Same keys in the same order as the protocol tables (dict equality ignores order).
    assert list(got) == list(expected)
    if isinstance(got.get("sampling"), dict):
        basic = list(got["sampling"])[: len(messages.SAMPLING_DEFAULTS)]
        assert basic == list(messages.SAMPLING_DEFAULTS)
        options = list(got["sampling"])[len(messages.SAMPLING_DEFAULTS) :]
        assert options == [k for k in messages.SAMPLING_OPTIONS if k in options]
        assert isinstance(got["sampling"]["temperature"], float)


def test_every_golden_file_is_checked():
    checked = {
        "ring_header.bin",
        "step_slot.bin",
        "result_slot.bin",
        "result_slot_logprobs.bin",
        "slot_layout.json",
    }
    checked |= {*CLIENT, *SERVER, *CONTROL}
    assert {p.name for p in TESTDATA.iterdir()} == checked


def test_python_builders_give_the_schedulers_bytes():
    """What the Python side sends packs to exactly the bytes the Rust encoder writes for the same message."""
    built = {
        "client_generate.msgpack": messages.generate(
            "req-1",
            messages=CLIENT["client_generate.msgpack"]["messages"],
            sampling=SAMPLING_ALL,
            stream=False,
        ),
        "client_generate_input_ids.msgpack": messages.generate(
            "req-2", input_ids=[1, 2, 151643], sampling=messages.SAMPLING_DEFAULTS
        ),
        "client_generate_n.msgpack": messages.generate(
            "req-5",
            text="def fib(n):",
            sampling={**messages.SAMPLING_DEFAULTS, "temperature": 0.8, "seed": 7},
            n=3,
        ),
        "client_generate_options.msgpack": messages.generate(
            "req-6",
            text="def fib(n):",
            sampling=messages.sampling(seed=7, **{**OPTIONS, "logit_bias": [(9707, 5.0), (151645, -100.0)]}),
        ),
        "client_generate_tools.msgpack": messages.generate(
            "req-7",
            messages=CLIENT["client_generate_tools.msgpack"]["messages"],
            sampling={**messages.SAMPLING_DEFAULTS, "temperature": 0.0},
            tools=CLIENT["client_generate_tools.msgpack"]["tools"],
            tool_choice="auto",
            parallel_tool_calls=False,
        ),
        "client_generate_json_schema.msgpack": messages.generate(
            "req-7", text="A user as JSON:", sampling=messages.sampling(min_tokens=3, json_schema=USER_SCHEMA)
        ),
        "client_generate_grammar.msgpack": messages.generate(
            "req-8", text="Yes or no?", sampling=messages.sampling(grammar='start: "yes" | "no"')
        ),
        "client_abort.msgpack": messages.abort("req-1"),
        "client_info.msgpack": messages.info(),
        "client_generate_keepalive.msgpack": messages.generate(
            "req-7", text="def fib(n):", sampling=messages.SAMPLING_DEFAULTS, keepalive=True
        ),
        "client_keepalive.msgpack": messages.keepalive(),
        "control_hello.msgpack": messages.hello(
            pid=31337,
            model=messages.model_facts(**MODEL),
            num_pages=4096,
            page_size=16,
            max_batch=64,
            max_tokens=8192,
        ),
        "control_ready.msgpack": messages.ready(),
        "control_status.msgpack": messages.status("loading weights"),
    }
    for name, msg in built.items():
        assert msgpack.packb(msg) == golden(name), name
