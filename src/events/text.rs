//! Text that stays one line whatever it holds: notes and file names with
//! their hidden characters written out, and the JSON line of `log_json()`.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters that can end a line or steer a terminal: C0 (newline, carriage
/// return, ESC...), DEL, C1 (U+0085 ends a line for `str.splitlines()`) and
/// the Unicode line and paragraph separators.
pub(super) fn is_hidden(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// `text` with every hidden character written out (`\n`, `\x1b`, `\u2028`), so
/// a file name cannot forge a log line or recolour a terminal.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_hidden(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_hidden(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `value` as one line of JSON that stays one line for every reader:
/// serde_json escapes C0 but writes DEL, C1 (U+0085) and U+2028/U+2029 raw,
/// which `str.splitlines()` and some log shippers take as line ends. They can
/// only occur inside strings, where `\uXXXX` is the same character.
pub fn json_line(value: &serde_json::Value) -> String {
    let text = ordered(value);
    if !text.chars().any(is_hidden) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_hidden(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Keys an object's text starts with, as ECS logging libraries write them
/// (the rest follow in name order).
const LEADING_KEYS: [&str; 4] = ["@timestamp", "log.level", "message", "ecs.version"];

/// `value` as JSON text, an object's `LEADING_KEYS` first.
fn ordered(value: &serde_json::Value) -> String {
    let Some(object) = value.as_object() else {
        return value.to_string();
    };
    let lead = LEADING_KEYS.iter().filter_map(|k| object.get_key_value(*k));
    let rest = object
        .iter()
        .filter(|(k, _)| !LEADING_KEYS.contains(&k.as_str()));
    let mut out = String::from("{");
    for (i, (key, item)) in lead.chain(rest).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out += &serde_json::Value::from(key.as_str()).to_string();
        out.push(':');
        out += &item.to_string();
    }
    out.push('}');
    out
}
