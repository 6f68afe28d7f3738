//! A validation report and the typed getters that fill it: each getter checks one JSON value's
//! type, records a problem instead of stopping, and hands back what it could read.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Report {
    pub fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub fn warn(&mut self, field: &str, message: impl Into<String>) {
        self.warnings.push(Problem {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// An object with only `known` keys expected; `None` (and a problem) when not an object.
    pub fn object<'a>(
        &mut self,
        v: &'a Value,
        field: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Some(o) = v.as_object() else {
            self.problem(field, format!("must be an object, got {}", kind(v)));
            return None;
        };
        for key in o.keys() {
            if !known.contains(&key.as_str()) {
                self.warn(&join(field, key), "unknown field, ignored");
            }
        }
        Some(o)
    }

    pub fn int(
        &mut self,
        o: &Map<String, Value>,
        field: &str,
        key: &str,
        required: bool,
    ) -> Option<i64> {
        let path = join(field, key);
        match o.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.problem(&path, "is required");
                }
                None
            }
            Some(v) => match v.as_i64() {
                Some(n) => Some(n),
                None => {
                    self.problem(&path, format!("must be a whole number, got {}", show(v)));
                    None
                }
            },
        }
    }

    pub fn string<'a>(
        &mut self,
        o: &'a Map<String, Value>,
        field: &str,
        key: &str,
    ) -> Option<&'a str> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                self.problem(
                    &join(field, key),
                    format!("must be a string, got {}", kind(v)),
                );
                None
            }
        }
    }

    pub fn boolean(&mut self, o: &Map<String, Value>, field: &str, key: &str) -> Option<bool> {
        match o.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                self.problem(
                    &join(field, key),
                    format!("must be true or false, got {}", show(v)),
                );
                None
            }
        }
    }

    pub fn string_list(
        &mut self,
        o: &Map<String, Value>,
        field: &str,
        key: &str,
    ) -> Vec<(String, String)> {
        let path = join(field, key);
        match o.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::String(s) => Some((format!("{path}[{i}]"), s.clone())),
                    other => {
                        self.problem(
                            &format!("{path}[{i}]"),
                            format!("must be a string, got {}", kind(other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(v) => {
                self.problem(&path, format!("must be a list of strings, got {}", kind(v)));
                Vec::new()
            }
        }
    }

    /// An object whose values are all strings (options, metadata).
    pub fn string_map<'a>(
        &mut self,
        o: &'a Map<String, Value>,
        field: &str,
        key: &str,
    ) -> Vec<(&'a str, &'a str)> {
        let path = join(field, key);
        match o.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k.as_str(), s.as_str())),
                    other => {
                        self.problem(
                            &join(&path, k),
                            format!("must be a string, got {}", kind(other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(v) => {
                self.problem(
                    &path,
                    format!("must be an object of strings, got {}", kind(v)),
                );
                Vec::new()
            }
        }
    }
}

pub fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_owned()
    } else {
        format!("{field}.{key}")
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}
