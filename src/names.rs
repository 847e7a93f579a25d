//! File names as text (pure: no file is opened here).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// `name` as text, losing nothing: UTF-8 as it is, and if it is not all
/// UTF-8, each other byte as `%XX` and `%` as `%25`. Names that differ only in
/// such bytes stay different (where `to_string_lossy` would make both `\u{FFFD}`).
pub(crate) fn printable(name: &OsStr) -> String {
    match name.to_str() {
        Some(text) => text.to_string(),
        None => {
            let mut out = String::new();
            for chunk in name.as_bytes().utf8_chunks() {
                out.push_str(&chunk.valid().replace('%', "%25"));
                for byte in chunk.invalid() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            out
        }
    }
}
