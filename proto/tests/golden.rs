//! Golden bytes under proto/testdata/, pinned here and read back by worker_py/tests/test_proto_golden.py.
//! `UPDATE_GOLDEN=1 cargo test -p minisgl-proto --test golden` rewrites them; otherwise each must match exactly.
//! The values are chosen to catch layout mistakes: every array used, a negative input id, a seed above 2^63,
//! floats that are not integers. `slot_layout.json` is the slot tables themselves (each array's name, type,
//! capacity, used length, offset and size at the capacities below), which the Python mirror must reproduce.

use proto::api::*;
use proto::ring::{ReaderState, RingHeader, RingKind};
use proto::step::{
    ArraySpec, Capacity, ResultHeader, ResultLayout, ResultMut, ResultRef, SlotBuf, StepHeader, StepLayout, StepMut,
    StepRef,
};
use serde_json::json;
use std::ops::Range;
use std::path::PathBuf;

const CAP: Capacity = Capacity { max_reqs: 4, max_tokens: 8, max_kv_indices: 6, mask_words: 3 };

fn check_golden(file: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let committed =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(committed == bytes, "{file} differs from what this build writes (UPDATE_GOLDEN=1 rewrites it)");
}

#[test]
fn ring_header() {
    let mut h = RingHeader::new(RingKind::Step, 4, RingKind::Step.min_slot_bytes(CAP) as u32, CAP, 16, 2);
    h.writer_pid = 4242;
    h.writer_heartbeat_ms = 1_764_000_000_123;
    h.write_seq = 7;
    h.readers[0] = ReaderState { read_seq: 5, pid: 4343, heartbeat_ms: 1_764_000_000_456 };
    h.readers[1] = ReaderState { read_seq: 6, pid: 4344, heartbeat_ms: 1_764_000_000_789 };
    let bytes = h.encode();
    assert_eq!(RingHeader::decode(&bytes).unwrap(), h);
    assert_eq!(h.slot_bytes, RingKind::Step.min_slot_bytes(CAP) as u32);
    check_golden("ring_header.bin", &bytes);
}

/// Three requests with page size 16: a prefill of 5 new tokens after 16 cached ones (slot 2), a decode (slot 0),
/// and 2 new tokens after 38 cached ones (slot 3); slots 2 and 3 join, slot 2 with penalties, min_p, 5 top
/// logprobs and two logit biases, slot 3 with one bias and the sampled token's logprob only. Slot 3 samples under
/// a token mask (W = 3 words: tokens 0, 33 and 95 allowed); the others under none. Slot 2 asks for its prompt's
/// logprobs with 3 top entries: its chunk's first 4 positions name their successors (its first 16 tokens came in
/// an earlier chunk), the last one's successor is the token it samples.
fn golden_step() -> SlotBuf {
    let layout = StepLayout::new(CAP);
    let mut buf = SlotBuf::zeroed(layout.slot_bytes);
    let s = StepMut::new(&layout, buf.bytes_mut());
    *s.header = StepHeader {
        step_id: 7,
        kind: 0,
        num_reqs: 3,
        num_tokens: 8,
        num_kv_indices: 6,
        num_joins: 2,
        num_bias: 3,
        num_masks: 1,
        prompt_logprobs: 1,
        prompt_top: 3,
        ..Default::default()
    };
    s.logprob_target.copy_from_slice(&[872, 198, 9707, 11, -1, -1, -1, -1]);
    s.mask_row[..3].copy_from_slice(&[-1, -1, 0]);
    s.mask_bits[..3].copy_from_slice(&[1, 1 << 1, 1 << 31]);
    s.req_slot[..3].copy_from_slice(&[2, 0, 3]);
    s.seq_len[..3].copy_from_slice(&[21, 6, 40]);
    s.qo_indptr[..4].copy_from_slice(&[0, 5, 6, 8]);
    s.kv_indptr[..4].copy_from_slice(&[0, 2, 3, 6]);
    s.kv_last_page_len[..3].copy_from_slice(&[5, 6, 8]);
    s.input_ids.copy_from_slice(&[151644, 872, 198, 9707, 11, -1, 1350, 0]);
    s.positions.copy_from_slice(&[16, 17, 18, 19, 20, 5, 38, 39]);
    s.out_loc.copy_from_slice(&[48, 49, 50, 51, 52, 149, 70, 71]);
    s.kv_indices.copy_from_slice(&[7, 3, 9, 0, 12, 4]);
    s.join_slot[..2].copy_from_slice(&[2, 3]);
    s.join_temperature[..2].copy_from_slice(&[0.7, 0.0]);
    s.join_top_p[..2].copy_from_slice(&[0.95, 1.0]);
    s.join_top_k[..2].copy_from_slice(&[40, -1]);
    s.join_seed[..2].copy_from_slice(&[(1 << 63) + 12345, 42]);
    s.join_min_p[..2].copy_from_slice(&[0.05, 0.0]);
    s.join_presence_penalty[..2].copy_from_slice(&[0.5, 0.0]);
    s.join_frequency_penalty[..2].copy_from_slice(&[-0.25, 0.0]);
    s.join_repetition_penalty[..2].copy_from_slice(&[1.1, 1.0]);
    s.join_prompt_len[..2].copy_from_slice(&[21, i32::MAX]);
    s.join_logprobs[..2].copy_from_slice(&[5, 0]);
    s.join_bias_indptr[..3].copy_from_slice(&[0, 2, 3]);
    s.join_bias_ids[..3].copy_from_slice(&[151645, 11, 198]);
    s.join_bias_values[..3].copy_from_slice(&[-100.0, 2.5, 0.75]);
    buf
}

#[test]
fn step_slot() {
    let buf = golden_step();
    let layout = StepLayout::new(CAP);
    let r = StepRef::new(&layout, buf.bytes());
    assert_eq!(r.join_seed, &[9_223_372_036_854_788_153, 42]);
    assert_eq!(r.input_ids[5], -1);
    assert_eq!(r.join_bias_ids, &[151645, 11, 198]);
    assert_eq!((r.mask_row, r.mask_bits), (&[-1, -1, 0][..], &[1, 2, 1 << 31][..]));
    assert_eq!(r.logprob_target, &[872, 198, 9707, 11, -1, -1, -1, -1]);
    assert_eq!(buf.bytes().len(), layout.slot_bytes);
    check_golden("step_slot.bin", buf.bytes());
}

#[test]
fn result_slot() {
    let layout = ResultLayout::new(CAP);
    let mut buf = SlotBuf::zeroed(layout.slot_bytes);
    let r = ResultMut::new(&layout, buf.bytes_mut());
    r.header.step_id = 7;
    r.header.num_reqs = 3;
    r.header.status = 0;
    r.tokens[..3].copy_from_slice(&[151645, 13, 2]);
    assert_eq!(buf.bytes().len(), 2176);
    check_golden("result_slot.bin", buf.bytes());
}

/// The step above answered with logprobs: 2 top logprobs per request (the most any request of it asked for), and
/// the 4 prompt-logprob entries of slot 2 with 3 top entries each.
#[test]
fn result_slot_logprobs() {
    let layout = ResultLayout::new(CAP);
    let mut buf = SlotBuf::zeroed(layout.slot_bytes);
    let r = ResultMut::new(&layout, buf.bytes_mut());
    *r.header = ResultHeader { step_id: 7, num_reqs: 3, status: 0, logprobs: 1, num_top: 2, ..Default::default() };
    r.tokens[..3].copy_from_slice(&[151645, 13, 2]);
    r.logprob[..3].copy_from_slice(&[-0.125, -2.5, -0.75]);
    r.top_ids[..6].copy_from_slice(&[151645, 198, 11, 13, 2, 0]);
    r.top_logprobs[..6].copy_from_slice(&[-0.125, -3.0, -1.5, -2.5, -0.75, -0.875]);
    (r.header.num_prompt, r.header.prompt_top) = (4, 3);
    r.prompt_logprob[..4].copy_from_slice(&[-5.5, -0.25, -12.0, -1.75]);
    r.prompt_top_ids[..12].copy_from_slice(&[9, 872, 2, 198, 5, 6, 7, 8, 9707, 11, 0, 1]);
    r.prompt_top_logprobs[..12]
        .copy_from_slice(&[-1.5, -5.5, -6.0, -0.25, -3.5, -4.0, -0.5, -1.25, -12.0, -1.75, -2.25, -3.0]);
    let read = ResultRef::new(&layout, buf.bytes());
    assert_eq!(read.logprobs_of(1), Some((-2.5, &[11, 13][..], &[-1.5, -2.5][..])));
    assert_eq!(read.prompt_logprobs_of(2), Some((-12.0, &[7, 8, 9707][..], &[-0.5, -1.25, -12.0][..])));
    check_golden("result_slot_logprobs.bin", buf.bytes());
}

/// One slot's table as JSON text, an array per line (reviewable diffs when a field is added).
fn layout_json<'a>(ranges: impl Iterator<Item = (&'static ArraySpec, &'a Range<usize>)>, slot_bytes: usize) -> String {
    let arrays: Vec<_> = ranges
        .map(|(a, r)| {
            let row = json!({
                "name": a.name,
                "type": a.elem,
                "capacity": a.basis.capacity_name(),
                "used": a.basis.name(),
                "offset": r.start,
                "bytes": r.len(),
            });
            format!("      {row}")
        })
        .collect();
    format!("{{\n    \"arrays\": [\n{}\n    ],\n    \"slot_bytes\": {slot_bytes}\n  }}", arrays.join(",\n"))
}

#[test]
fn slot_layout() {
    let (step, result) = (StepLayout::new(CAP), ResultLayout::new(CAP));
    let capacity = json!({
        "max_reqs": CAP.max_reqs,
        "max_tokens": CAP.max_tokens,
        "max_kv_indices": CAP.max_kv_indices,
        "mask_words": CAP.mask_words,
    });
    let text = format!(
        "{{\n  \"capacity\": {capacity},\n  \"step\": {},\n  \"result\": {}\n}}\n",
        layout_json(step.ranges(), step.slot_bytes),
        layout_json(result.ranges(), result.slot_bytes),
    );
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(parsed["step"]["slot_bytes"], step.slot_bytes);
    check_golden("slot_layout.json", text.as_bytes());
}

fn golden_generate() -> Generate {
    let mut g = Generate::new("req-1");
    g.messages = Some(vec![
        json!({"role": "system", "content": "You are terse."}),
        json!({"role": "user", "content": "Héllo 🌍", "name": "ana"}),
    ]);
    g.sampling = Sampling {
        max_tokens: 64,
        temperature: 0.7,
        top_p: 0.9,
        top_k: 50,
        seed: Some(u64::MAX),
        stop: vec!["\n\n".into(), "END".into()],
        stop_token_ids: vec![151645, 151643],
        ignore_eos: true,
        ..Sampling::default()
    };
    g.stream = false;
    g
}

/// Every sampling option past `ignore_eos`, each set to something other than its default.
fn golden_options() -> Generate {
    let mut g = Generate::new("req-6");
    g.text = Some("def fib(n):".into());
    g.sampling = Sampling {
        seed: Some(7),
        min_p: 0.05,
        presence_penalty: 0.5,
        frequency_penalty: -0.25,
        repetition_penalty: 1.2,
        logit_bias: vec![(9707, 5.0), (151645, -100.0)],
        logprobs: Some(2),
        prompt_logprobs: Some(3),
        skip_special_tokens: false,
        ..Sampling::default()
    };
    g
}

/// A chat request offering two tools (one without parameters), parsed for calls, one call at most.
fn golden_tools() -> Generate {
    let mut g = Generate::new("req-7");
    g.messages = Some(vec![json!({"role": "user", "content": "Weather in Oslo?"})]);
    g.tools = Some(vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
        json!({"type": "function", "function": {"name": "now"}}),
    ]);
    g.tool_choice = Some(json!("auto"));
    g.parallel_tool_calls = Some(false);
    g.sampling.temperature = 0.0;
    g
}

/// Two calls, as the scheduler parses them from Qwen's `<tool_call>` blocks.
fn golden_tool_calls() -> Vec<ToolCall> {
    vec![
        ToolCall {
            index: 0,
            id: "call_AbC123xyz789AbC123xyz789".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Oslo"}"#.into(),
        },
        ToolCall { index: 1, id: "call_Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2".into(), name: "now".into(), arguments: "{}".into() },
    ]
}

/// Structured output: a JSON schema (a map on the wire) with `min_tokens`, and a Lark grammar.
fn golden_constrained() -> (Generate, Generate) {
    let mut schema = Generate::new("req-7");
    schema.text = Some("A user as JSON:".into());
    schema.sampling = Sampling {
        min_tokens: 3,
        json_schema: Some(json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name"],
        })),
        ..Sampling::default()
    };
    let mut grammar = Generate::new("req-8");
    grammar.text = Some("Yes or no?".into());
    grammar.sampling = Sampling { grammar: Some("start: \"yes\" | \"no\"".into()), ..Sampling::default() };
    (schema, grammar)
}

#[test]
fn client_messages() {
    let generate = ClientMsg::Generate(golden_generate());
    let mut ids = Generate::new("req-2");
    ids.input_ids = Some(vec![1, 2, 151643]);
    let mut text = Generate::new("req-3");
    text.text = Some("def fib(n):".into());
    text.sampling.seed = Some(7);
    let mut samples = Generate::new("req-5");
    samples.text = Some("def fib(n):".into());
    samples.sampling.temperature = 0.8;
    samples.sampling.seed = Some(7);
    samples.n = 3;
    let mut keepalive = Generate::new("req-7");
    keepalive.text = Some("def fib(n):".into());
    keepalive.keepalive = true;
    for (file, msg) in [
        ("client_generate.msgpack", generate),
        ("client_generate_input_ids.msgpack", ClientMsg::Generate(ids)),
        ("client_generate_text.msgpack", ClientMsg::Generate(text)),
        ("client_generate_n.msgpack", ClientMsg::Generate(samples)),
        ("client_generate_options.msgpack", ClientMsg::Generate(golden_options())),
        ("client_generate_tools.msgpack", ClientMsg::Generate(golden_tools())),
        ("client_generate_json_schema.msgpack", ClientMsg::Generate(golden_constrained().0)),
        ("client_generate_grammar.msgpack", ClientMsg::Generate(golden_constrained().1)),
        ("client_abort.msgpack", ClientMsg::Abort { rid: "req-1".into() }),
        ("client_info.msgpack", ClientMsg::Info),
        ("client_generate_keepalive.msgpack", ClientMsg::Generate(keepalive)),
        ("client_keepalive.msgpack", ClientMsg::Keepalive),
    ] {
        let bytes = encode(&msg);
        assert_eq!(decode_client(&bytes).unwrap(), msg, "{file}");
        check_golden(file, &bytes);
    }
}

/// Two tokens' logprobs with two top entries each; values exact in f32, so Python compares them as they are.
fn golden_logprobs() -> Vec<TokenLogprobs> {
    vec![
        TokenLogprobs { logprob: -0.25, top: vec![(9707, -0.25), (13048, -1.5)] },
        TokenLogprobs { logprob: -2.0, top: vec![(11, -0.5), (0, -2.0)] },
    ]
}

#[test]
fn server_messages() {
    let msgs = [
        (
            "server_delta.msgpack",
            ServerMsg::Delta(Delta {
                rid: "req-1".into(),
                index: 1,
                token_ids: vec![9707, 0],
                text: "Hi!".into(),
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_delta_logprobs.msgpack",
            ServerMsg::Delta(Delta {
                rid: "req-6".into(),
                index: 0,
                token_ids: vec![9707, 0],
                text: "Hi!".into(),
                logprobs: Some(golden_logprobs()),
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_final.msgpack",
            ServerMsg::Final(Final {
                rid: "req-1".into(),
                index: 1,
                finish_reason: FinishReason::Stop,
                prompt_tokens: 21,
                completion_tokens: 3,
                cached_tokens: 16,
                token_ids: vec![9707, 0, 151645],
                text: "Hi!".into(),
                message: None,
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_final_logprobs.msgpack",
            ServerMsg::Final(Final {
                rid: "req-6".into(),
                index: 0,
                finish_reason: FinishReason::Length,
                prompt_tokens: 4,
                completion_tokens: 2,
                cached_tokens: 0,
                token_ids: vec![9707, 0],
                text: "Hi!".into(),
                message: None,
                logprobs: Some(golden_logprobs()),
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_final_prompt_logprobs.msgpack",
            ServerMsg::Final(Final {
                rid: "req-9".into(),
                index: 0,
                finish_reason: FinishReason::Length,
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 0,
                token_ids: vec![9707, 0],
                text: "Hi!".into(),
                message: None,
                logprobs: None,
                prompt_logprobs: Some(vec![
                    None,
                    Some(TokenLogprobs { logprob: -3.5, top: vec![(872, -0.75)] }),
                    Some(TokenLogprobs { logprob: -0.125, top: vec![(198, -0.125)] }),
                ]),
                prompt_token_ids: Some(vec![151644, 872, 198]),
                tool_calls: None,
            }),
        ),
        (
            "server_delta_tool_calls.msgpack",
            ServerMsg::Delta(Delta {
                rid: "req-7".into(),
                index: 0,
                token_ids: vec![151658],
                text: String::new(),
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: Some(golden_tool_calls()[..1].to_vec()),
            }),
        ),
        (
            "server_final_tool_calls.msgpack",
            ServerMsg::Final(Final {
                rid: "req-7".into(),
                index: 0,
                finish_reason: FinishReason::Stop,
                prompt_tokens: 180,
                completion_tokens: 40,
                cached_tokens: 0,
                token_ids: vec![151657, 198, 151658, 151645],
                text: "Let me check.".into(),
                message: None,
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: Some(golden_tool_calls()),
            }),
        ),
        (
            "server_final_error.msgpack",
            ServerMsg::Final(Final {
                rid: "req-4".into(),
                index: 0,
                finish_reason: FinishReason::Error,
                prompt_tokens: 5,
                completion_tokens: 0,
                cached_tokens: 0,
                token_ids: vec![],
                text: String::new(),
                message: Some("worker failed the step".into()),
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_final_memory.msgpack",
            ServerMsg::Final(Final {
                rid: "req-8".into(),
                index: 0,
                finish_reason: FinishReason::Memory,
                prompt_tokens: 40,
                completion_tokens: 139,
                cached_tokens: 0,
                token_ids: vec![],
                text: String::new(),
                message: None,
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }),
        ),
        (
            "server_error.msgpack",
            ServerMsg::Error(ErrorMsg {
                rid: Some("req-1".into()),
                code: ErrorCode::InvalidParams,
                message: "top_p must be in (0, 1], got 1.5".into(),
            }),
        ),
        (
            "server_error_no_rid.msgpack",
            Rejection::new(None, ErrorCode::Malformed, "the message is not a map").to_msg(),
        ),
        (
            "server_info.msgpack",
            ServerMsg::Info(InfoMsg {
                model: "Qwen2.5-Coder-0.5B-Instruct".into(),
                vocab_size: 151936,
                max_seq_len: 32768,
                max_batch: 256,
                page_size: 16,
                num_pages: 8192,
                eos_token_ids: vec![151645, 151643],
                live_requests: 3,
            }),
        ),
    ];
    for (file, msg) in msgs {
        let bytes = encode(&msg);
        assert_eq!(decode::<ServerMsg>(&bytes).unwrap(), msg, "{file}");
        check_golden(file, &bytes);
    }
    let heartbeat = encode(&Notice::Heartbeat);
    assert_eq!(decode::<Notice>(&heartbeat).unwrap(), Notice::Heartbeat);
    check_golden("server_heartbeat.msgpack", &heartbeat);
}

#[test]
fn control_messages() {
    let hello = WorkerMsg::Hello(Hello {
        pid: 31337,
        model: ModelFacts {
            architecture: "Qwen2ForCausalLM".into(),
            vocab_size: 151936,
            num_layers: 24,
            hidden_size: 896,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            max_position_embeddings: 32768,
            dtype: "float32".into(),
            device: "cpu".into(),
        },
        num_pages: 4096,
        page_size: 16,
        max_batch: 64,
        max_tokens: 8192,
    });
    let welcome = SchedulerMsg::Welcome(Welcome {
        step_ring: "minisgl-1234-step".into(),
        result_ring: "minisgl-1234-result".into(),
        pid: 1234,
    });
    for (file, bytes) in [
        ("control_hello.msgpack", encode(&hello)),
        ("control_ready.msgpack", encode(&WorkerMsg::Ready)),
        ("control_status.msgpack", encode(&WorkerMsg::Status { phase: "loading weights".into() })),
        ("control_welcome.msgpack", encode(&welcome)),
        ("control_ok.msgpack", encode(&SchedulerMsg::Ok)),
        ("control_error.msgpack", encode(&SchedulerMsg::Error { message: "expected hello".into() })),
    ] {
        check_golden(file, &bytes);
    }
    assert_eq!(decode::<WorkerMsg>(&encode(&hello)).unwrap(), hello);
    assert_eq!(decode::<SchedulerMsg>(&encode(&welcome)).unwrap(), welcome);
}
