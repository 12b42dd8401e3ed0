//! Server-sent events, incrementally: bytes go in as the network delivers
//! them (split anywhere, even inside a UTF-8 character or a `\r\n`), the
//! `data` of each complete event comes out.
//!
//! Only what an OpenAI-compatible stream uses is kept: `data:` lines (joined
//! with `\n` when an event has several); comments and other fields are
//! skipped.

/// The longest line accepted; a peer that never sends a newline must not make
/// palaver buffer without bound. vLLM's chunks are a few hundred bytes.
const MAX_LINE: usize = 1 << 20;

/// A line longer than [`MAX_LINE`] arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTooLong;

/// Incremental SSE decoder.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being received.
    line: Vec<u8>,
    /// Set when the last byte seen was `\r`: a `\n` right after belongs to it.
    after_cr: bool,
    /// `data` of the event being received, `None` while it has no data line.
    data: Option<String>,
}

impl SseParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, LineTooLong> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            // memchr scans a word (or a vector register) at a time, where a
            // byte loop was a visible share of a turn's instructions.
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(i) => {
                    self.line.extend_from_slice(&rest[..i]);
                    self.after_cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    self.end_line(&mut events);
                }
                None => {
                    self.line.extend_from_slice(rest);
                    rest = &[];
                }
            }
            if self.line.len() > MAX_LINE {
                return Err(LineTooLong);
            }
        }
        Ok(events)
    }

    /// Ends the input: returns the data of an event the peer did not close
    /// with a blank line (lenient: some servers end the body right after).
    pub fn finish(&mut self) -> Option<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut events);
        }
        self.end_line(&mut events);
        events.pop()
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        // Read in place (a copy only where the bytes are not UTF-8), then
        // keep the buffer for the next line. `from_utf8` first: it checks
        // ASCII a word at a time, while `from_utf8_lossy` walks the line
        // byte by byte even when it is valid.
        let mut raw = std::mem::take(&mut self.line);
        match std::str::from_utf8(&raw) {
            Ok(line) => self.field(line, events),
            Err(_) => self.field(&String::from_utf8_lossy(&raw), events),
        }
        raw.clear();
        self.line = raw;
    }

    /// One complete line: a field, a comment, or the blank end of an event.
    fn field(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        if line.starts_with(':') {
            return; // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        ": keep-alive comment\r\n\r\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"héllo ✓\"}}]}\n\n",
        "event: ignored\r\ndata:{\"a\":1}\r\n\r\n",
        "data: line one\ndata: line two\n\n",
        "data: [DONE]\r\r",
    );

    fn expected() -> Vec<String> {
        vec![
            "{\"choices\":[{\"delta\":{\"content\":\"héllo ✓\"}}]}".to_string(),
            "{\"a\":1}".to_string(),
            "line one\nline two".to_string(),
            "[DONE]".to_string(),
        ]
    }

    #[test]
    fn whole_input() {
        let mut p = SseParser::new();
        assert_eq!(p.push(STREAM.as_bytes()).unwrap(), expected());
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&bytes[..cut]).unwrap();
            got.extend(p.push(&bytes[cut..]).unwrap());
            got.extend(p.finish());
            assert_eq!(got, expected(), "split at byte {cut}");
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in STREAM.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, expected());
    }

    #[test]
    fn unterminated_last_event_is_returned_by_finish() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DONE]").unwrap().is_empty());
        assert_eq!(p.finish().as_deref(), Some("[DONE]"));
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let mut p = SseParser::new();
        let got = p.push(b"data: caf\xc3\n\ndata: ok\n\n").unwrap();
        assert_eq!(got, ["caf\u{fffd}", "ok"]);
    }

    #[test]
    fn refuses_endless_lines() {
        let mut p = SseParser::new();
        let big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(p.push(&big), Err(LineTooLong));
    }
}
