//! Turning a runner's raw output bytes into log lines, the same on the agent and the SSH
//! runner: split on `\n`, at most [`MAX_LINE`] bytes kept of each line (the rest dropped as it
//! arrives and counted), invalid UTF-8 replaced rather than ending the stream.
//!
//! Memory is bounded while reading: a hook that prints endless bytes without a newline costs
//! [`MAX_LINE`] bytes, not the size of its output; and every byte is looked at once.

/// The most bytes kept of one line.
pub const MAX_LINE: usize = 4096;

/// The longest line, in characters, the control plane stores: [`MAX_LINE`] and the marker
/// saying how much was cut (` …[N bytes cut]`, at most 36 characters). What a hostile agent
/// sends is cut to this.
pub const MAX_STORED_LINE_CHARS: usize = MAX_LINE + 64;

/// Splits a byte stream into bounded lines.
#[derive(Debug, Default)]
pub struct LineAssembler {
    /// The start of the current line (at most [`MAX_LINE`] bytes).
    kept: Vec<u8>,
    /// Bytes of the current line dropped past [`MAX_LINE`].
    dropped: usize,
}

impl LineAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `data`; returns the lines it completed (without their `\n`).
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(pos) => {
                    self.keep(&rest[..pos]);
                    lines.push(self.take());
                    rest = &rest[pos + 1..];
                }
                None => {
                    self.keep(rest);
                    rest = &[];
                }
            }
        }
        lines
    }

    /// The last line, if the stream ended without a newline after it.
    pub fn finish(&mut self) -> Option<String> {
        (!self.kept.is_empty() || self.dropped > 0).then(|| self.take())
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.kept.len());
        let (kept, dropped) = bytes.split_at(bytes.len().min(room));
        self.kept.extend_from_slice(kept);
        self.dropped += dropped.len();
    }

    fn take(&mut self) -> String {
        // NUL is valid UTF-8 but no PostgreSQL text can hold it: replaced like invalid bytes,
        // so that a hook printing it cannot make its log unstorable.
        let mut line = String::from_utf8_lossy(&self.kept).replace('\0', "\u{fffd}");
        if self.dropped > 0 {
            line.push_str(&format!(" …[{} bytes cut]", self.dropped));
        }
        self.kept.clear();
        self.dropped = 0;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut a = LineAssembler::new();
        assert_eq!(a.push(b"hel"), Vec::<String>::new());
        assert_eq!(a.push(b"lo\nwor"), vec!["hello"]);
        assert_eq!(a.push(b"ld\n\nx"), vec!["world", ""]);
        assert_eq!(a.finish().as_deref(), Some("x"));
        assert_eq!(a.finish(), None);
    }

    #[test]
    fn an_endless_line_keeps_its_start_and_counts_the_rest() {
        let mut a = LineAssembler::new();
        let chunk = vec![b'y'; 1000];
        for _ in 0..10_000 {
            assert!(a.push(&chunk).is_empty());
            // Never more than one line's worth held, however long the line.
            assert!(a.kept.len() <= MAX_LINE);
        }
        let lines = a.push(b"\nnext\n");
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&"y".repeat(MAX_LINE)));
        assert!(lines[0].ends_with(&format!(" …[{} bytes cut]", 10_000_000 - MAX_LINE)));
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn nul_bytes_are_replaced() {
        let mut a = LineAssembler::new();
        assert_eq!(a.push(b"a\0b\n"), vec!["a\u{fffd}b"]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut a = LineAssembler::new();
        let lines = a.push(b"ok \xff\xfe bytes\n\xc3\xa9t\xc3\xa9\n");
        assert_eq!(lines, vec!["ok \u{fffd}\u{fffd} bytes", "été"]);
    }

    #[test]
    fn a_character_split_at_the_limit_is_replaced_not_panicked_on() {
        let mut a = LineAssembler::new();
        let mut line = vec![b'a'; MAX_LINE - 1];
        line.extend_from_slice("é\n".as_bytes());
        let lines = a.push(&line);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].ends_with("\u{fffd} …[1 bytes cut]"),
            "{}",
            &lines[0][MAX_LINE - 4..]
        );
    }
}
