//! What the commands print: the API's JSON as it is with `--json`, aligned tables otherwise.

use std::io::IsTerminal;

use serde_json::Value;

/// Prints `value` as indented JSON on standard output.
pub fn json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A field as text: strings as they are (made safe for a terminal), null as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => safe(s),
        other => other.to_string(),
    }
}

/// `s` with every control character but the tab replaced by `?`. Log lines come from hooks
/// and their dependencies, names from other members: none of them may drive the terminal of
/// whoever reads them (escape sequences that set the clipboard, fake links, move the cursor
/// or retitle the window).
pub fn safe(s: &str) -> String {
    if !s.chars().any(|c| c.is_control() && c != '\t') {
        return s.to_owned();
    }
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// A timestamp of the API (RFC 3339) as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time(value: &Value) -> String {
    value
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// The first 12 characters of a commit.
pub fn short_commit(value: &Value) -> String {
    value
        .as_str()
        .map(|c| c.chars().take(12).collect())
        .unwrap_or_else(|| "-".into())
}

/// Labels as `k=v,k=v`.
pub fn labels(value: &Value) -> String {
    match value.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// Whether standard error is a terminal people watch (progress bars, prompts).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal() && std::io::stdin().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_from_a_log_line_cannot_reach_the_terminal() {
        // OSC 52 (set the clipboard), a C1 CSI, a carriage return that overwrites the line.
        let hostile = "ok\u{1b}]52;c;cm0gLXJm\u{7}\u{9b}2J\rfake\tend";
        assert_eq!(safe(hostile), "ok?]52;c;cm0gLXJm??2J?fake\tend");
        assert_eq!(text(&Value::String("plain".into())), "plain");
    }
}
