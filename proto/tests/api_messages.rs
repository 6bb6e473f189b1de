//! The request-socket and control-socket messages: what they look like on the wire, and how client frames are
//! accepted or refused.

use proto::api::*;
use serde_json::{Value, json};

/// The msgpack bytes of a JSON value, as a Python client would send them (maps with string keys).
fn pack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

/// The wire form of an encoded message, read back as a dynamic value.
fn wire<T: serde::Serialize>(msg: &T) -> Value {
    rmp_serde::from_slice(&encode(msg)).unwrap()
}

fn rejection(v: &Value) -> Rejection {
    decode_client(&pack(v)).unwrap_err()
}

#[test]
fn a_minimal_generate_gets_every_default() {
    let msg = decode_client(&pack(&json!({"type": "generate", "rid": "a", "text": "hi"}))).unwrap();
    let ClientMsg::Generate(g) = msg else { panic!("{msg:?}") };
    assert_eq!(g.rid, "a");
    assert_eq!(g.prompt(), Some(Prompt::Text("hi")));
    assert_eq!(g.sampling, Sampling::default());
    assert_eq!(
        (g.sampling.max_tokens, g.sampling.temperature, g.sampling.top_p, g.sampling.top_k),
        (128, 1.0, 1.0, -1)
    );
    assert!(g.stream);
    assert!(validate(&g).is_ok());
}

#[test]
fn nil_means_absent() {
    let v = json!({"type": "generate", "rid": "a", "text": null, "input_ids": [1, 2], "stream": null,
                   "sampling": {"seed": null, "temperature": null, "stop": null}});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!(g.prompt(), Some(Prompt::InputIds(&[1, 2])));
    assert_eq!(g.sampling, Sampling::default());
    assert!(g.stream);
    let v = json!({"type": "generate", "rid": "a", "input_ids": [1], "sampling": null});
    assert!(decode_client(&pack(&v)).is_ok());
}

#[test]
fn every_field_of_a_generate_is_read() {
    let v = json!({
        "type": "generate", "rid": "r-1", "stream": false, "unknown_key": [1, 2],
        "messages": [{"role": "user", "content": "hi", "tool_calls": [{"name": "f"}]}],
        "sampling": {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": u64::MAX,
                     "stop": ["\n"], "stop_token_ids": [5], "ignore_eos": true},
    });
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    let messages = v["messages"].as_array().unwrap();
    assert_eq!(g.prompt(), Some(Prompt::Messages(messages)));
    let s = &g.sampling;
    assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed), (7, 0.0, 0.5, 3, Some(u64::MAX)));
    assert_eq!(
        (s.stop.as_slice(), s.stop_token_ids.as_slice(), s.ignore_eos),
        (&["\n".to_string()][..], &[5][..], true)
    );
    assert!(!g.stream);
}

#[test]
fn python_floats_keep_their_f64_value() {
    let v = json!({"type": "generate", "rid": "a", "text": "x", "sampling": {"temperature": 0.7, "top_p": 0.9}});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!((g.sampling.temperature, g.sampling.top_p), (0.7, 0.9));
}

#[test]
fn abort_and_info_decode() {
    assert_eq!(
        decode_client(&pack(&json!({"type": "abort", "rid": "x"}))).unwrap(),
        ClientMsg::Abort { rid: "x".into() }
    );
    assert_eq!(decode_client(&pack(&json!({"type": "info", "extra": 1}))).unwrap(), ClientMsg::Info);
}

#[test]
fn frames_that_are_not_maps_of_the_right_shape_are_malformed() {
    for bytes in [vec![], vec![0xc1], b"\x93\x01\x02\x03".to_vec(), b"hello".to_vec(), pack(&json!("generate"))] {
        let r = decode_client(&bytes).unwrap_err();
        assert_eq!((r.code, r.rid), (ErrorCode::Malformed, None), "{bytes:?}");
    }
    for (v, rid) in [
        (json!({"rid": "a"}), Some("a")),
        (json!({"type": 3, "rid": "a"}), Some("a")),
        (json!({"type": "abort"}), None),
        (json!({"type": "abort", "rid": 5}), None),
        (json!({"type": "generate", "text": "x"}), None),
        (json!({"type": "generate", "rid": "b", "text": 5}), Some("b")),
        (json!({"type": "generate", "rid": "b", "messages": ["not a map"]}), Some("b")),
        (json!({"type": "generate", "rid": "b", "messages": {"role": "user"}}), Some("b")),
        (json!({"type": "generate", "rid": "b", "input_ids": [1, -2]}), Some("b")),
        (json!({"type": "generate", "rid": "b", "input_ids": [1.5]}), Some("b")),
        (json!({"type": "generate", "rid": "b", "text": "x", "sampling": {"max_tokens": "9"}}), Some("b")),
        (json!({"type": "generate", "rid": "b", "text": "x", "sampling": {"max_tokens": 9.0}}), Some("b")),
        (json!({"type": "generate", "rid": "b", "text": "x", "sampling": {"seed": -1}}), Some("b")),
        (json!({"type": "generate", "rid": "b", "text": "x", "sampling": [1]}), Some("b")),
        (json!({"type": "generate", "rid": "b", "text": "x", "stream": 1}), Some("b")),
    ] {
        let r = rejection(&v);
        assert_eq!((r.code, r.rid.as_deref()), (ErrorCode::Malformed, rid), "{v}: {}", r.message);
    }
}

#[test]
fn an_unknown_type_is_told_apart_and_keeps_the_rid() {
    let r = rejection(&json!({"type": "generat", "rid": "q"}));
    assert_eq!((r.code, r.rid.as_deref()), (ErrorCode::UnknownType, Some("q")));
    assert!(r.message.contains("generat"));
    assert_eq!(rejection(&json!({"type": "x"})).rid, None);
}

#[test]
fn out_of_range_parameters_are_invalid_params() {
    let base = |sampling: Value| json!({"type": "generate", "rid": "v", "text": "x", "sampling": sampling});
    let check = |v: Value, ok: bool| {
        let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
        match validate(&g) {
            Ok(()) => assert!(ok, "{v} accepted"),
            Err(r) => {
                assert!(!ok, "{v} refused: {}", r.message);
                assert_eq!((r.code, r.rid.as_deref()), (ErrorCode::InvalidParams, Some("v")));
            }
        }
    };
    for (s, ok) in [
        (json!({"max_tokens": 1}), true),
        (json!({"max_tokens": 0}), false),
        (json!({"max_tokens": -3}), false),
        (json!({"temperature": 0.0}), true),
        (json!({"temperature": -0.1}), false),
        (json!({"top_p": 1.0}), true),
        (json!({"top_p": 1e-9}), true),
        (json!({"top_p": 0.0}), false),
        (json!({"top_p": 1.01}), false),
        (json!({"top_k": -1}), true),
        (json!({"top_k": 0}), true),
        (json!({"top_k": 50}), true),
        (json!({"top_k": -2}), false),
        (json!({"stop": ["a", "bc"]}), true),
        (json!({"stop": ["a", ""]}), false),
        (json!({"seed": 0}), true),
    ] {
        check(base(s), ok);
    }
    // serde_json cannot hold NaN, so build that one directly.
    let mut g = Generate::new("v");
    g.text = Some("x".into());
    g.sampling.temperature = f64::NAN;
    assert_eq!(validate(&g).unwrap_err().code, ErrorCode::InvalidParams);
    g.sampling.temperature = 1.0;
    g.sampling.top_p = f64::NAN;
    assert_eq!(validate(&g).unwrap_err().code, ErrorCode::InvalidParams);

    check(json!({"type": "generate", "rid": "v"}), false);
    check(json!({"type": "generate", "rid": "v", "text": "x", "input_ids": [1]}), false);
    check(json!({"type": "generate", "rid": "v", "text": "x", "messages": [], "input_ids": [1]}), false);
}

#[test]
fn sampling_options_are_read_and_each_refusal_names_its_field() {
    let v = json!({"type": "generate", "rid": "o", "text": "x", "sampling": {
        "min_p": 0.1, "presence_penalty": -2, "frequency_penalty": 2.0, "repetition_penalty": 1.3,
        "logit_bias": [[5, 100], [7, -1.5]], "logprobs": 20, "prompt_logprobs": 0,
        "skip_special_tokens": false}});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    let s = &g.sampling;
    assert_eq!((s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty), (0.1, -2.0, 2.0, 1.3));
    assert_eq!(
        (s.logit_bias.clone(), s.logprobs, s.skip_special_tokens),
        (vec![(5, 100.0), (7, -1.5)], Some(20), false)
    );
    assert_eq!(s.prompt_logprobs, Some(0));
    assert!(validate(&g).is_ok());
    // Sent back, they come out as they went in; at their defaults they are not sent at all.
    assert_eq!(decode_client(&encode(&ClientMsg::Generate(g.clone()))).unwrap(), ClientMsg::Generate(g));

    let refused = |sampling: Value| {
        let v = json!({"type": "generate", "rid": "o", "text": "x", "sampling": sampling});
        let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
        let r = validate(&g).expect_err("refused");
        assert_eq!(r.code, ErrorCode::InvalidParams);
        (r.param.unwrap_or_default(), r.message)
    };
    let many: Vec<Value> = (0..301).map(|i| json!([i, 1.0])).collect();
    for (sampling, param) in [
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"min_p": -0.1}), "min_p"),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"logit_bias": [[1, 101]]}), "logit_bias"),
        (json!({"logit_bias": [[1, 1], [1, 2]]}), "logit_bias"),
        (json!({"logit_bias": many}), "logit_bias"),
        (json!({"logprobs": 21}), "logprobs"),
        (json!({"logprobs": -1}), "logprobs"),
        (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt_logprobs": -1}), "prompt_logprobs"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
    ] {
        let (got, message) = refused(sampling.clone());
        assert_eq!(got, param, "{sampling}");
        assert!(message.starts_with(param), "{message}");
    }
    // A bias given as a map (OpenAI's shape) is not the wire's.
    let v = json!({"type": "generate", "rid": "o", "text": "x", "sampling": {"logit_bias": {"5": 1}}});
    assert_eq!(rejection(&v).code, ErrorCode::Malformed);
}

#[test]
fn non_finite_floats_arriving_over_the_wire_are_invalid_not_defaults() {
    // A Python client can send float('nan') or float('inf'); they must reach validation as what they are.
    #[derive(serde::Serialize)]
    struct Wire {
        #[serde(rename = "type")]
        ty: &'static str,
        rid: &'static str,
        text: &'static str,
        sampling: WireSampling,
    }
    #[derive(serde::Serialize)]
    struct WireSampling {
        temperature: f64,
        top_p: f64,
    }
    for (temperature, top_p) in [(f64::NAN, 0.5), (f64::INFINITY, 0.5), (1.0, f64::NAN)] {
        let bytes =
            encode(&Wire { ty: "generate", rid: "n", text: "x", sampling: WireSampling { temperature, top_p } });
        let ClientMsg::Generate(g) = decode_client(&bytes).unwrap() else { panic!() };
        assert_eq!(g.sampling.temperature.to_bits(), temperature.to_bits());
        let r = validate(&g).unwrap_err();
        assert_eq!((r.code, r.rid.as_deref()), (ErrorCode::InvalidParams, Some("n")));
    }
}

#[test]
fn client_messages_encode_as_the_protocol_writes_them() {
    let mut g = Generate::new("r");
    g.input_ids = Some(vec![1, 2]);
    assert_eq!(
        wire(&ClientMsg::Generate(g.clone())),
        json!({"type": "generate", "rid": "r", "input_ids": [1, 2], "stream": true, "sampling": {
            "max_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": null, "stop": [],
            "stop_token_ids": [], "ignore_eos": false}})
    );
    assert_eq!(decode_client(&encode(&ClientMsg::Generate(g.clone()))).unwrap(), ClientMsg::Generate(g));
    assert_eq!(wire(&ClientMsg::Abort { rid: "r".into() }), json!({"type": "abort", "rid": "r"}));
    assert_eq!(wire(&ClientMsg::Info), json!({"type": "info"}));
}

#[test]
fn server_messages_encode_as_the_protocol_writes_them() {
    let delta = ServerMsg::Delta(Delta {
        rid: "r".into(),
        index: 2,
        token_ids: vec![9],
        text: "é".into(),
        logprobs: None,
        prompt_logprobs: None,
        prompt_token_ids: None,
        tool_calls: None,
    });
    assert_eq!(wire(&delta), json!({"type": "delta", "rid": "r", "index": 2, "token_ids": [9], "text": "é"}));
    let fin = ServerMsg::Final(Final {
        rid: "r".into(),
        index: 2,
        finish_reason: FinishReason::Length,
        prompt_tokens: 3,
        completion_tokens: 1,
        cached_tokens: 2,
        token_ids: vec![9],
        text: "é".into(),
        message: None,
        logprobs: None,
        prompt_logprobs: None,
        prompt_token_ids: None,
        tool_calls: None,
    });
    assert_eq!(
        wire(&fin),
        json!({"type": "final", "rid": "r", "index": 2, "finish_reason": "length", "prompt_tokens": 3,
               "completion_tokens": 1, "cached_tokens": 2, "token_ids": [9], "text": "é", "message": null})
    );
    let err = Rejection::new(None, ErrorCode::UnknownType, "no").to_msg();
    assert_eq!(wire(&err), json!({"type": "error", "rid": null, "code": "unknown_type", "message": "no"}));
    for (code, name) in [
        (ErrorCode::Malformed, "malformed"),
        (ErrorCode::InvalidParams, "invalid_params"),
        (ErrorCode::EmptyPrompt, "empty_prompt"),
        (ErrorCode::PromptTooLong, "prompt_too_long"),
        (ErrorCode::UnknownRequest, "unknown_request"),
        (ErrorCode::DuplicateRequest, "duplicate_request"),
        (ErrorCode::ShuttingDown, "shutting_down"),
        (ErrorCode::Overloaded, "overloaded"),
    ] {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
    }
    for (r, name) in [(FinishReason::Stop, "stop"), (FinishReason::Abort, "abort"), (FinishReason::Error, "error")] {
        assert_eq!(serde_json::to_value(r).unwrap(), json!(name));
    }
    for m in [delta, fin, err] {
        assert_eq!(decode::<ServerMsg>(&encode(&m)).unwrap(), m);
    }
}

#[test]
fn control_messages_encode_as_the_protocol_writes_them() {
    assert_eq!(wire(&WorkerMsg::Ready), json!({"type": "ready"}));
    assert_eq!(wire(&SchedulerMsg::Ok), json!({"type": "ok"}));
    assert_eq!(wire(&SchedulerMsg::Error { message: "bad".into() }), json!({"type": "error", "message": "bad"}));
    let welcome = SchedulerMsg::Welcome(Welcome { step_ring: "s".into(), result_ring: "r".into(), pid: 7 });
    assert_eq!(wire(&welcome), json!({"type": "welcome", "step_ring": "s", "result_ring": "r", "pid": 7}));
    assert_eq!(decode::<SchedulerMsg>(&encode(&welcome)).unwrap(), welcome);
    // A worker message of the wrong type must not decode as a WorkerMsg.
    assert!(decode::<WorkerMsg>(&pack(&json!({"type": "welcome"}))).is_err());
    assert_eq!(decode::<WorkerMsg>(&pack(&json!({"type": "ready"}))).unwrap(), WorkerMsg::Ready);
}

#[test]
fn replies_of_a_scheduler_without_index_and_cached_tokens_still_decode() {
    // What schedulers sent before `n` and the prefix cache: a client built now reads them as sample 0, no cache.
    let old_final = json!({"type": "final", "rid": "r", "finish_reason": "stop", "prompt_tokens": 3,
                           "completion_tokens": 1, "token_ids": [9], "text": "x", "message": null});
    let ServerMsg::Final(f) = decode::<ServerMsg>(&pack(&old_final)).unwrap() else { panic!() };
    assert_eq!((f.index, f.cached_tokens, f.prompt_tokens), (0, 0, 3));
    let old_delta = json!({"type": "delta", "rid": "r", "token_ids": [9], "text": "x"});
    let ServerMsg::Delta(d) = decode::<ServerMsg>(&pack(&old_delta)).unwrap() else { panic!() };
    assert_eq!((d.index, d.token_ids), (0, vec![9]));
}

#[test]
fn n_is_read_checked_and_left_off_the_wire_when_it_is_one() {
    let v = json!({"type": "generate", "rid": "s", "text": "x", "n": 4});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!(g.n, 4);
    assert!(validate(&g).is_ok());
    assert_eq!(wire(&ClientMsg::Generate(g.clone()))["n"], json!(4));
    let one = Generate { n: 1, ..g.clone() };
    assert!(wire(&ClientMsg::Generate(one)).get("n").is_none(), "a plain request's bytes are unchanged");
    let v = json!({"type": "generate", "rid": "s", "text": "x", "n": null});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!(g.n, 1, "nil means the default");
    for bad in [0, -3] {
        let v = json!({"type": "generate", "rid": "s", "text": "x", "n": bad});
        let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
        let r = validate(&g).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidParams);
        assert!(r.message.starts_with("n must be >= 1"), "{}", r.message);
    }
    let v = json!({"type": "generate", "rid": "s", "text": "x", "n": "two"});
    assert_eq!(rejection(&v).code, ErrorCode::Malformed);
}

#[test]
fn tool_fields_are_read_and_left_off_the_wire_when_absent() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let v = json!({"type": "generate", "rid": "t", "messages": [{"role": "user", "content": "x"}], "tools": tools,
                   "tool_choice": "auto", "parallel_tool_calls": false});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!(g.tools.as_deref(), tools.as_array().map(Vec::as_slice));
    assert_eq!((g.tool_choice.clone(), g.parallel_tool_calls), (Some(json!("auto")), Some(false)));
    assert_eq!(wire(&ClientMsg::Generate(g.clone()))["tools"], tools);
    let plain = Generate { tools: None, tool_choice: None, parallel_tool_calls: None, ..g };
    let w = wire(&ClientMsg::Generate(plain));
    assert!(["tools", "tool_choice", "parallel_tool_calls"].iter().all(|k| w.get(k).is_none()), "{w}");
    let v = json!({"type": "generate", "rid": "t", "text": "x", "tools": null, "tool_choice": null});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert_eq!((g.tools, g.tool_choice), (None, None), "nil means absent");
    let v = json!({"type": "generate", "rid": "t", "text": "x", "tools": "get_weather"});
    assert_eq!(rejection(&v).code, ErrorCode::Malformed);
}

#[test]
fn tool_calls_ride_on_deltas_and_finals_and_are_left_off_without_them() {
    let call = ToolCall { index: 0, id: "call_x".into(), name: "f".into(), arguments: "{\"a\":1}".into() };
    let delta = ServerMsg::Delta(Delta {
        rid: "r".into(),
        index: 0,
        token_ids: vec![9],
        text: String::new(),
        logprobs: None,
        prompt_logprobs: None,
        prompt_token_ids: None,
        tool_calls: Some(vec![call.clone()]),
    });
    assert_eq!(
        wire(&delta)["tool_calls"],
        json!([{"index": 0, "id": "call_x", "name": "f", "arguments": "{\"a\":1}"}])
    );
    assert_eq!(decode::<ServerMsg>(&encode(&delta)).unwrap(), delta);
    let old = json!({"type": "final", "rid": "r", "finish_reason": "stop", "prompt_tokens": 3,
                     "completion_tokens": 1, "token_ids": [9], "text": "x", "message": null});
    let ServerMsg::Final(f) = decode::<ServerMsg>(&pack(&old)).unwrap() else { panic!() };
    assert_eq!(f.tool_calls, None);
}

#[test]
fn stop_strings_are_bounded_in_count_and_length_and_the_refusal_says_the_bound() {
    let refusal = |stop: Vec<String>| {
        let v = json!({"type": "generate", "rid": "s", "text": "x", "sampling": {"stop": stop}});
        let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
        validate(&g).err().map(|r| (r.code, r.param.unwrap_or_default(), r.message))
    };
    let at_most = vec!["é".repeat(MAX_STOP_CHARS); MAX_STOP_STRINGS];
    assert_eq!(refusal(at_most), None, "16 strings of 256 characters (not bytes) are fine");
    let (code, param, message) = refusal(vec!["x".into(); MAX_STOP_STRINGS + 1]).unwrap();
    assert_eq!((code, param.as_str()), (ErrorCode::InvalidParams, "stop"));
    assert!(message.contains("at most 16 strings, got 17"), "{message}");
    let (_, param, message) = refusal(vec!["ok".into(), "y".repeat(MAX_STOP_CHARS + 1)]).unwrap();
    assert_eq!(param, "stop");
    assert!(message.contains("at most 256 characters, got one of 257"), "{message}");
}

#[test]
fn keepalive_is_read_from_generate_and_as_a_message_of_its_own() {
    let v = json!({"type": "generate", "rid": "k", "text": "x", "keepalive": true});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert!(g.keepalive);
    let v = json!({"type": "generate", "rid": "k", "text": "x", "keepalive": null});
    let ClientMsg::Generate(g) = decode_client(&pack(&v)).unwrap() else { panic!() };
    assert!(!g.keepalive, "nil is the default, off");
    assert_eq!(decode_client(&pack(&json!({"type": "keepalive"}))).unwrap(), ClientMsg::Keepalive);
    let r = decode_client(&pack(&json!({"type": "generate", "rid": "k", "text": "x", "keepalive": 1}))).unwrap_err();
    assert_eq!((r.code, r.rid.as_deref()), (ErrorCode::Malformed, Some("k")));
}
