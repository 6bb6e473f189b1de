//! The minijinja environment that renders chat templates as Jinja2 does under transformers'
//! `apply_chat_template`: its whitespace settings, its `tojson`, its globals, and Python's way of printing values.

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, State, Value};

use super::{py_json, py_repr, strftime};

/// Marks the error `raise_exception` returns, so the caller can tell a template's refusal from a broken template.
#[derive(Debug)]
pub struct RaisedByTemplate;

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for RaisedByTemplate {}

pub fn chat_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().expect("default delimiters are valid"),
    );
    // Jinja2's builtins that minijinja keeps in contrib (truncate, cycler, joiner, ...), and Python's string and
    // dict methods (`.strip()`, `.items()`, `.startswith()`), which templates call all the time.
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", py_json::tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime::strftime_now);
    env.set_formatter(python_formatter);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(RaisedByTemplate))
}

/// Prints `{{ value }}` as Jinja2 does, which is Python's `str(value)`: `None`, `True`, `['a', 1]`, `1e+16`.
fn python_formatter(out: &mut minijinja::Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match py_repr::python_str(value)? {
        Some(text) => out.write_str(&text).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, ctx: serde_json::Value) -> Result<String, Error> {
        chat_environment().render_str(template, minijinja::value::Serde(ctx))
    }

    #[test]
    fn blocks_trim_like_transformers_jinja() {
        let template = "{% for m in messages %}\n    {% if m %}\n{{ m }}\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(template, serde_json::json!({"messages": ["a", "b"]})).unwrap(), "a\nb\n");
    }

    #[test]
    fn values_print_as_python_prints_them() {
        let ctx = serde_json::json!({"d": {"k": [1, null, false]}, "n": null, "f": 1e20});
        assert_eq!(
            render("{{ d }}|{{ n }}|{{ f }}|{{ true }}", ctx).unwrap(),
            "{'k': [1, None, False]}|None|1e+20|True"
        );
    }

    #[test]
    fn raise_exception_is_an_error_marked_as_raised() {
        let err = render("{{ raise_exception('only user and assistant roles') }}", serde_json::json!({})).unwrap_err();
        assert_eq!(err.detail(), Some("only user and assistant roles"));
        let source = std::error::Error::source(&err).expect("the marker is the source");
        assert!(source.is::<RaisedByTemplate>());
    }

    #[test]
    fn python_methods_and_strftime_are_available() {
        let out = render(
            "{{ ' x '.strip() }}{{ strftime_now('%%') }}{% for k, v in d.items() %}{{ k }}{{ v }}{% endfor %}",
            serde_json::json!({"d": {"b": 1, "a": 2}}),
        )
        .unwrap();
        assert_eq!(out, "x%b1a2");
    }
}
