//! The `tojson` filter as transformers defines it for chat templates: Python's `json.dumps` with
//! `ensure_ascii=False` by default, Python's separators (`", "` and `": "`), and no HTML escaping (minijinja's
//! built-in escapes `<`, `>`, `&` and `'`, which changes tool schemas).

use std::fmt::Write;

use minijinja::value::{Kwargs, Rest, ValueKind, ValueOrKwargs};
use minijinja::{Error, ErrorKind, Value};

use super::py_repr::float_repr;

/// The options of `json.dumps` that a template can pass.
pub struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl JsonStyle {
    /// Reads `tojson`'s arguments, positional (`ensure_ascii, indent, separators, sort_keys`, the order of
    /// transformers' filter) or by keyword.
    fn from_args(mut args: Vec<Value>) -> Result<Self, Error> {
        let kwargs = match args.last() {
            Some(last) if last.is_kwargs() => Kwargs::try_from(args.pop().expect("checked"))?,
            _ => Kwargs::from_iter(std::iter::empty::<(String, Value)>()),
        };
        let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
        if args.len() > names.len() {
            return Err(Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 positional arguments"));
        }
        let mut positional = args.into_iter();
        let mut args: [Option<Value>; 4] = std::array::from_fn(|_| positional.next());
        for (slot, name) in args.iter_mut().zip(names) {
            if let Some(value) = kwargs.get::<Option<Value>>(name)? {
                if slot.is_some() {
                    return Err(Error::new(ErrorKind::TooManyArguments, format!("tojson got {name} twice")));
                }
                *slot = Some(value);
            }
        }
        kwargs.assert_all_used()?;
        let [ensure_ascii, indent, separators, sort_keys] = args.map(|a| a.filter(|v| !v.is_none()));
        let indent = match indent {
            None => None,
            Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            Some(v) => {
                let n = i64::try_from(v)?;
                Some(" ".repeat(n.max(0) as usize))
            }
        };
        let (item_separator, key_separator) = match separators {
            Some(v) => {
                let parts: Vec<Value> = v.try_iter()?.collect();
                match parts.as_slice() {
                    [item, key] => (item.to_string(), key.to_string()),
                    _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson separators must be a pair")),
                }
            }
            // Python drops the space after the comma when indenting, so lines do not end in a space.
            None if indent.is_some() => (",".to_string(), ": ".to_string()),
            None => (", ".to_string(), ": ".to_string()),
        };
        Ok(Self {
            ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
            indent,
            item_separator,
            key_separator,
            sort_keys: sort_keys.is_some_and(|v| v.is_true()),
        })
    }
}

/// The filter registered as `tojson`.
pub fn tojson_filter(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    let style = JsonStyle::from_args(args.into_values())?;
    Ok(Value::from(dumps(value, &style)?))
}

pub fn dumps(value: &Value, style: &JsonStyle) -> Result<String, Error> {
    let mut out = String::new();
    write_value(value, style, 0, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, style: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => write!(out, "{value}").unwrap(),
        ValueKind::Number => out.push_str(&json_float(f64::try_from(value.clone())?)),
        ValueKind::String => write_string(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', &items, |item, out| write_value(item, style, depth + 1, out))?
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, depth, '{', '}', &entries, |(key, item), out| {
                write_string(key, style.ensure_ascii, out);
                out.push_str(&style.key_separator);
                write_value(item, style, depth + 1, out)
            })?
        }
        kind => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: a {kind} is not JSON serializable")));
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&T, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(item, out)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python turns non-string keys into strings: `true`, `null`, digits, float repr.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => json_float(f64::try_from(key.clone())?),
        kind => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: keys must be str, not {kind}")));
        }
    })
}

fn json_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        float_repr(f)
    }
}

fn write_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, ctx: serde_json::Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson_filter);
        env.render_str(template, minijinja::value::Serde(ctx)).unwrap()
    }

    #[test]
    fn default_style_matches_python_json_dumps() {
        let ctx = serde_json::json!({"x": {"name": "f", "desc": "<a & 'b'>\n\"q\" 中🙂", "n": [1, 2.0, -0.5, null, true],
                                           "empty": {}, "list": []}});
        assert_eq!(
            render("{{ x | tojson }}", ctx),
            r#"{"name": "f", "desc": "<a & 'b'>\n\"q\" 中🙂", "n": [1, 2.0, -0.5, null, true], "empty": {}, "list": []}"#
        );
    }

    #[test]
    fn indent_sort_keys_ascii_and_separators() {
        let ctx = serde_json::json!({"x": {"b": [1, {"c": "é"}], "a": {}}});
        assert_eq!(
            render("{{ x | tojson(indent=2, sort_keys=true) }}", ctx.clone()),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"c\": \"é\"\n    }\n  ]\n}"
        );
        assert_eq!(
            render("{{ x | tojson(ensure_ascii=true) }}", ctx.clone()),
            r#"{"b": [1, {"c": "\u00e9"}], "a": {}}"#
        );
        assert_eq!(render("{{ x | tojson(separators=[',', ':']) }}", ctx.clone()), r#"{"b":[1,{"c":"é"}],"a":{}}"#);
        assert_eq!(render("{{ '🙂' | tojson(true) }}", ctx), r#""\ud83d\ude42""#);
    }
}
