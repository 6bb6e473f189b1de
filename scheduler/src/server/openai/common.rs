//! What `/v1/chat/completions` and `/v1/completions` share: the typed fields both read, the body's parsing
//! (with the JSON path of a bad field as the error's `param`), and the sampling fields' mapping onto the wire's
//! `Sampling`, whose ranges `proto::api::validate` checks for both doors.

use super::ApiError;
use proto::api::{self, Generate, Sampling};
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// Reads a body into `T`: not JSON, or not an object, is `invalid_json`; a field of the wrong type names its
/// path (`messages[0].role`, `stream_options.include_usage`); a field `T` does not know is `unknown_parameter`.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => value,
        Ok(_) => return Err(ApiError::new(400, "invalid_json", "the request body must be a JSON object")),
        Err(e) => return Err(ApiError::new(400, "invalid_json", format!("the request body is not valid JSON: {e}"))),
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        field_error(if path == "." { None } else { Some(path) }, &e.into_inner().to_string())
    })
}

/// The API's error for serde's `message` about the value at `path` (None: the body itself).
fn field_error(path: Option<String>, message: &str) -> ApiError {
    // The path of an unknown field already ends with its name; that of a missing one is its container's.
    let join = |name: &str| match &path {
        Some(p) if p == name || p.ends_with(&format!(".{name}")) => p.clone(),
        Some(p) => format!("{p}.{name}"),
        None => name.to_owned(),
    };
    // serde words these two as "unknown field `x`, expected ..." and "missing field `x`".
    if let Some(name) = backticked(message, "unknown field `") {
        return ApiError::unknown(join(name));
    }
    if let Some(name) = backticked(message, "missing field `") {
        let param = join(name);
        return ApiError::invalid(param.clone(), format!("{param} is required"));
    }
    let param = path.unwrap_or_else(|| "body".into());
    ApiError::invalid(param.clone(), format!("{param}: {message}"))
}

fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

/// An integer, also when written as an integral float (`16.0`): JavaScript clients cannot tell them apart.
/// Past `i64`, it saturates (a count that large means "as many as possible", and the ranges cap it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Int, E> {
                if v.fract() == 0.0 && v.abs() < 9e15 {
                    Ok(Int(v as i64))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A number (an integer is one too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Float(pub f64);

impl<'de> Deserialize<'de> for Float {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Float;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Float, E> {
                Ok(Float(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Float, E> {
                Ok(Float(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `stop`: one string or several.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's: usage on every chunk. Refused unless false.
    pub continuous_usage_stats: Option<bool>,
}

/// Declares an endpoint's request struct: its own fields, then those both completion endpoints share (one list,
/// so that the two cannot drift apart), with `deny_unknown_fields` so that a field neither lists is refused.
macro_rules! completion_request {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Accepted and ignored: one model is served.
            #[allow(dead_code, reason = "accepted, and has no effect")]
            pub model: Option<String>,
            pub max_tokens: Option<$crate::server::openai::common::Int>,
            pub temperature: Option<$crate::server::openai::common::Float>,
            pub top_p: Option<$crate::server::openai::common::Float>,
            pub top_k: Option<$crate::server::openai::common::Int>,
            pub min_p: Option<$crate::server::openai::common::Float>,
            pub presence_penalty: Option<$crate::server::openai::common::Float>,
            pub frequency_penalty: Option<$crate::server::openai::common::Float>,
            pub repetition_penalty: Option<$crate::server::openai::common::Float>,
            /// Token ids (as strings, JSON keys being strings) to biases.
            pub logit_bias: Option<std::collections::BTreeMap<String, $crate::server::openai::common::Float>>,
            pub seed: Option<u64>,
            pub stop: Option<$crate::server::openai::common::Stop>,
            pub stop_token_ids: Option<Vec<u32>>,
            pub ignore_eos: Option<bool>,
            pub min_tokens: Option<$crate::server::openai::common::Int>,
            pub skip_special_tokens: Option<bool>,
            /// Structured output: OpenAI's `response_format`, and the extensions `regex` and `grammar` (Lark).
            pub response_format: Option<serde_json::Value>,
            pub regex: Option<String>,
            pub grammar: Option<String>,
            pub n: Option<$crate::server::openai::common::Int>,
            pub stream: Option<bool>,
            pub stream_options: Option<$crate::server::openai::common::StreamOptions>,
            pub return_tokens_as_token_ids: Option<bool>,
            /// SGLang's, which sglang-router sends on every request with its default (false): refused otherwise.
            pub no_stop_trim: Option<bool>,
            pub return_hidden_states: Option<bool>,
            /// Accepted and ignored: an end-user id for abuse monitoring, which we do not do.
            #[allow(dead_code, reason = "accepted, and has no effect")]
            pub user: Option<String>,
        }

        impl $name {
            pub fn shared(&self) -> $crate::server::openai::common::Shared<'_> {
                $crate::server::openai::common::Shared {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    logit_bias: self.logit_bias.as_ref(),
                    seed: self.seed,
                    stop: self.stop.as_ref(),
                    stop_token_ids: self.stop_token_ids.as_deref(),
                    ignore_eos: self.ignore_eos,
                    min_tokens: self.min_tokens,
                    skip_special_tokens: self.skip_special_tokens,
                    response_format: self.response_format.as_ref(),
                    regex: self.regex.as_deref(),
                    grammar: self.grammar.as_deref(),
                    n: self.n,
                    stream: self.stream,
                    stream_options: self.stream_options.as_ref(),
                    return_tokens_as_token_ids: self.return_tokens_as_token_ids,
                    no_stop_trim: self.no_stop_trim,
                    return_hidden_states: self.return_hidden_states,
                }
            }
        }
    };
}
pub(crate) use completion_request;

/// The shared fields of a request, borrowed.
pub struct Shared<'a> {
    pub max_tokens: Option<Int>,
    pub temperature: Option<Float>,
    pub top_p: Option<Float>,
    pub top_k: Option<Int>,
    pub min_p: Option<Float>,
    pub presence_penalty: Option<Float>,
    pub frequency_penalty: Option<Float>,
    pub repetition_penalty: Option<Float>,
    pub logit_bias: Option<&'a BTreeMap<String, Float>>,
    pub seed: Option<u64>,
    pub stop: Option<&'a Stop>,
    pub stop_token_ids: Option<&'a [u32]>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<Int>,
    pub skip_special_tokens: Option<bool>,
    pub response_format: Option<&'a Value>,
    pub regex: Option<&'a str>,
    pub grammar: Option<&'a str>,
    pub n: Option<Int>,
    pub stream: Option<bool>,
    pub stream_options: Option<&'a StreamOptions>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub no_stop_trim: Option<bool>,
    pub return_hidden_states: Option<bool>,
}

/// What the shared fields come to: the sampling (its `max_tokens` and `logprobs` set by the endpoint) and
/// how the response is sent.
pub struct Common {
    pub sampling: Sampling,
    pub n: i64,
    pub stream: bool,
    pub include_usage: bool,
    pub tokens_as_ids: bool,
}

impl Shared<'_> {
    /// Reads the shared fields; ranges are `proto::api::validate`'s (see [`check`]).
    pub fn read(&self, max_tokens: i64) -> Result<Common, ApiError> {
        refuse_unless(self.no_stop_trim != Some(true), "no_stop_trim", "a stop string is always cut from the text")?;
        refuse_unless(
            self.return_hidden_states != Some(true),
            "return_hidden_states",
            "hidden states stay on the worker",
        )?;
        let json_schema = response_format(self.response_format)?;
        let options = self.stream_options;
        if options.is_some_and(|o| o.continuous_usage_stats == Some(true)) {
            let message = "stream_options.continuous_usage_stats is not supported: usage comes in the last chunk";
            return Err(ApiError::unsupported("stream_options.continuous_usage_stats", message));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
        if options.is_some() && !stream {
            // OpenAI refuses it too: the options say how to stream.
            return Err(ApiError::invalid("stream_options", "stream_options is only allowed with stream: true"));
        }
        let d = Sampling::default();
        let float = |f: Option<Float>, default: f64| f.map_or(default, |Float(x)| x);
        let sampling = Sampling {
            max_tokens,
            temperature: float(self.temperature, d.temperature),
            top_p: float(self.top_p, d.top_p),
            top_k: self.top_k.map_or(d.top_k, |Int(k)| k),
            seed: self.seed,
            stop: match self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            stop_token_ids: self.stop_token_ids.map(<[u32]>::to_vec).unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(d.ignore_eos),
            min_p: float(self.min_p, d.min_p),
            presence_penalty: float(self.presence_penalty, d.presence_penalty),
            frequency_penalty: float(self.frequency_penalty, d.frequency_penalty),
            repetition_penalty: float(self.repetition_penalty, d.repetition_penalty),
            logit_bias: logit_bias(self.logit_bias)?,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(d.skip_special_tokens),
            min_tokens: self.min_tokens.map_or(0, |Int(m)| m),
            json_schema,
            regex: self.regex.map(str::to_owned),
            grammar: self.grammar.map(str::to_owned),
        };
        let s = &sampling;
        let given = [
            ("response_format", s.json_schema.is_some()),
            ("regex", s.regex.is_some()),
            ("grammar", s.grammar.is_some()),
        ];
        // The second constraint given is the one at fault.
        if let Some((param, _)) = given.iter().filter(|(_, on)| *on).nth(1) {
            let message = "give at most one of response_format (json_object, json_schema), regex, grammar";
            return Err(ApiError::invalid(*param, message));
        }
        Ok(Common {
            sampling,
            // Its upper bound depends on the batch size: the hub checks it.
            n: self.n.map_or(1, |Int(n)| n),
            stream,
            include_usage,
            tokens_as_ids: self.return_tokens_as_token_ids.unwrap_or(false),
        })
    }
}

/// OpenAI's `response_format` as the JSON schema the text must follow: none for `text`, any object for
/// `json_object`, the given schema for `json_schema` (whose `strict` changes nothing: the output always follows it).
fn response_format(format: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    let Some(kind) = format.get("type").and_then(Value::as_str) else {
        return Err(ApiError::invalid(
            "response_format.type",
            "response_format needs a type: text, json_object or json_schema",
        ));
    };
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(serde_json::json!({"type": "object"}))),
        "json_schema" => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                let message = "response_format of type json_schema needs a json_schema object";
                return Err(ApiError::invalid("response_format.json_schema", message));
            };
            if spec.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(ApiError::invalid("response_format.json_schema.strict", "strict must be a boolean"));
            }
            match spec.get("schema") {
                Some(schema) if schema.is_object() || schema.is_boolean() => Ok(Some(schema.clone())),
                // OpenAI's default: any JSON object.
                None | Some(Value::Null) => Ok(Some(serde_json::json!({"type": "object"}))),
                Some(_) => {
                    Err(ApiError::invalid("response_format.json_schema.schema", "the JSON schema must be an object"))
                }
            }
        }
        other => Err(ApiError::invalid(
            "response_format.type",
            format!("response_format.type must be text, json_object or json_schema, got {other:?}"),
        )),
    }
}

/// OpenAI's `{"token id": bias}` as the wire's pairs. Ranges and the vocabulary are checked with the rest.
fn logit_bias(map: Option<&BTreeMap<String, Float>>) -> Result<Vec<(u32, f64)>, ApiError> {
    let Some(map) = map else { return Ok(Vec::new()) };
    map.iter()
        .map(|(key, &Float(bias))| match key.trim().parse::<u32>() {
            Ok(id) => Ok((id, bias)),
            Err(_) => Err(ApiError::invalid("logit_bias", format!("logit_bias keys must be token ids, got {key:?}"))),
        })
        .collect()
}

/// The protocol's range checks (the same as the ZeroMQ door's), on every request of a body.
pub fn check(requests: &[Generate]) -> Result<(), ApiError> {
    for g in requests {
        api::validate(g).map_err(|r| super::rejection_error(&r))?;
    }
    Ok(())
}

/// A field that must be absent (or null, or the value that means "off") because what it asks for is not done.
pub fn refuse_unless(off: bool, param: &str, why: &str) -> Result<(), ApiError> {
    if off { Ok(()) } else { Err(ApiError::unsupported(param, format!("{param} is not supported: {why}"))) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        count: Option<Int>,
        ratio: Option<Float>,
        stop: Option<Stop>,
        options: Option<StreamOptions>,
    }

    fn probe(body: &str) -> Result<Probe, ApiError> {
        parse_body(body.as_bytes())
    }

    #[test]
    fn integers_may_be_integral_floats_and_numbers_may_be_integers() {
        let p = probe(r#"{"count": 8.0, "ratio": 2, "stop": "x"}"#).unwrap();
        assert_eq!((p.count, p.ratio, p.stop), (Some(Int(8)), Some(Float(2.0)), Some(Stop::One("x".into()))));
        assert_eq!(probe(r#"{"count": 18446744073709551615}"#).unwrap().count, Some(Int(i64::MAX)));
        let p = probe(r#"{"count": null, "stop": ["a", "b"]}"#).unwrap();
        assert_eq!((p.count, p.stop), (None, Some(Stop::Many(vec!["a".into(), "b".into()]))));
    }

    #[test]
    fn a_bad_field_is_named_by_its_path() {
        let e = probe(r#"{"count": 1.5}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), ("invalid_params", Some("count")));
        assert!(e.message.starts_with("count: ") && e.message.contains("an integer"), "{}", e.message);
        let e = probe(r#"{"ratio": "hot"}"#).unwrap_err();
        assert_eq!(e.message, "ratio: invalid type: string \"hot\", expected a number");
        let e = probe(r#"{"stop": 3}"#).unwrap_err();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("stop"), "stop: a string or an array of strings"));
        let e = probe(r#"{"options": {"include_usage": "yes"}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("options.include_usage"));
        let options = probe(r#"{"options": {"include_usage": true}}"#).unwrap().options.unwrap();
        assert_eq!(options.include_usage, Some(true));
    }

    #[test]
    fn unknown_fields_are_refused_as_openai_refuses_them_even_nested() {
        let e = probe(r#"{"count": 1, "frobnicate": true}"#).unwrap_err();
        assert_eq!((e.status, e.code, e.param.as_deref()), (400, "unknown_parameter", Some("frobnicate")));
        assert_eq!(e.message, "Unrecognized request argument supplied: frobnicate");
        let e = probe(r#"{"options": {"include_usage": true, "extra": 1}}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), ("unknown_parameter", Some("options.extra")));
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_invalid_json() {
        for body in ["{\"count\": ", "", "[1, 2]", "\"x\""] {
            let e = probe(body).unwrap_err();
            assert_eq!((e.status, e.code), (400, "invalid_json"), "{body:?}");
        }
    }

    #[test]
    fn response_formats_become_json_schemas() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let read = |f: Value| response_format(Some(&f));
        assert_eq!(read(json!({"type": "text"})).unwrap(), None);
        assert_eq!(read(json!({"type": "json_object"})).unwrap(), Some(json!({"type": "object"})));
        let f = json!({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}});
        assert_eq!(read(f).unwrap(), Some(schema));
        for (bad, param) in [
            (json!({"type": "yaml"}), "response_format.type"),
            (json!({}), "response_format.type"),
            (json!({"type": "json_schema"}), "response_format.json_schema"),
            (json!({"type": "json_schema", "json_schema": {"schema": 3}}), "response_format.json_schema.schema"),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
        ] {
            assert_eq!(read(bad.clone()).unwrap_err().param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn logit_bias_keys_are_token_ids() {
        let map: BTreeMap<String, Float> = [("5".into(), Float(1.0)), ("12".into(), Float(-100.0))].into();
        assert_eq!(logit_bias(Some(&map)).unwrap(), vec![(12, -100.0), (5, 1.0)]);
        let bad: BTreeMap<String, Float> = [("hello".into(), Float(1.0))].into();
        let e = logit_bias(Some(&bad)).unwrap_err();
        assert_eq!(
            (e.param.as_deref(), e.message.as_str()),
            (Some("logit_bias"), "logit_bias keys must be token ids, got \"hello\"")
        );
    }
}
