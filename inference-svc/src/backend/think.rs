//! Removes `<think>…</think>` reasoning from a streamed reply.
//!
//! Reasoning models served without vLLM's `--reasoning-parser` put their
//! reasoning into the reply text. Clients must never see it, and it must not
//! be stored in the history. The tags can be split across chunks anywhere, so
//! this is a small state machine that holds back only what could still turn
//! out to be (part of) a tag.
//!
//! A reply may also start *inside* a think block whose opening tag was part
//! of the prompt (DeepSeek-R1's and QwQ's chat templates do that): only the
//! closing tag then shows up. Text already streamed cannot be taken back, so
//! that case needs to be known up front ([`ThinkFilter::new`] with
//! `starts_open`); without it, a stray `</think>` is still removed together
//! with whatever reasoning had not been passed on yet.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing visible passed on yet: leading whitespace is dropped and a
    /// `<think>` here opens a block.
    Start,
    /// Inside a think block: everything is dropped until `</think>`.
    Inside,
    /// Visible text.
    Outside,
}

/// Streaming `<think>` remover; feed it deltas, pass on what it returns.
#[derive(Debug)]
pub struct ThinkFilter {
    state: State,
    /// Received text not yet decided on.
    pending: String,
}

impl ThinkFilter {
    /// A filter for one reply; `starts_open` when the prompt opened `<think>`.
    pub fn new(starts_open: bool) -> Self {
        Self {
            state: if starts_open {
                State::Inside
            } else {
                State::Start
            },
            pending: String::new(),
        }
    }

    /// Takes the next delta; returns the visible text it completes.
    pub fn push(&mut self, delta: &str) -> String {
        self.pending.push_str(delta);
        let mut out = String::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.is_empty() {
                        self.pending.clear();
                        return out;
                    }
                    if let Some(after) = trimmed.strip_prefix(OPEN) {
                        self.pending = after.to_string();
                        self.state = State::Inside;
                    } else if OPEN.starts_with(trimmed) {
                        // "<thi": wait for more before deciding.
                        self.pending = trimmed.to_string();
                        return out;
                    } else {
                        self.pending = trimmed.to_string();
                        self.state = State::Outside;
                    }
                }
                State::Inside => match find_tag(&self.pending, &[CLOSE]) {
                    Found::Tag { at, .. } => {
                        self.pending.drain(..at + CLOSE.len());
                        // Models put blank lines between reasoning and answer.
                        self.state = State::Start;
                    }
                    Found::Held(at) => {
                        self.pending.drain(..at);
                        return out;
                    }
                },
                State::Outside => match find_tag(&self.pending, &[OPEN, CLOSE]) {
                    Found::Tag { at, opens: true } => {
                        out.push_str(&self.pending[..at]);
                        self.pending.drain(..at + OPEN.len());
                        self.state = State::Inside;
                    }
                    Found::Tag { at, opens: false } => {
                        // A closing tag without an opening one: what is
                        // still held before it was reasoning.
                        self.pending.drain(..at + CLOSE.len());
                        self.state = State::Start;
                    }
                    Found::Held(at) => {
                        out.push_str(&self.pending[..at]);
                        self.pending.drain(..at);
                        return out;
                    }
                },
            }
        }
    }

    /// Ends the reply; returns the visible text still held back.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            // An unterminated think block was all reasoning.
            State::Inside => String::new(),
            State::Start | State::Outside => rest,
        }
    }
}

/// What [`find_tag`] found first in the text held.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A whole tag at byte `at`; `opens` when it is [`OPEN`].
    Tag { at: usize, opens: bool },
    /// No whole tag. The text before byte `at` is decided; from `at` on it
    /// is the start of a tag that the next delta may complete, to hold back
    /// (`at` is the text's length when there is none).
    Held(usize),
}

/// The first of `tags` in `text`, or the start of one at its very end.
///
/// Every tag begins with '<', so only the places holding one are looked at,
/// with memchr: most deltas have none and cost one scan, where a substring
/// search per tag would build a searcher each time.
fn find_tag(text: &str, tags: &[&str]) -> Found {
    for at in memchr::memchr_iter(b'<', text.as_bytes()) {
        // '<' is ASCII: `at` is a char boundary.
        let rest = &text[at..];
        if let Some(tag) = tags.iter().find(|t| rest.starts_with(**t)) {
            return Found::Tag {
                at,
                opens: *tag == OPEN,
            };
        }
        // Shorter than the tag it begins, so it runs to the end of `text`.
        if tags.iter().any(|t| t.starts_with(rest)) {
            return Found::Held(at);
        }
    }
    Found::Held(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&str], starts_open: bool) -> String {
        let mut f = ThinkFilter::new(starts_open);
        let mut out: String = chunks.iter().map(|c| f.push(c)).collect();
        out.push_str(&f.finish());
        out
    }

    /// Feeds `text` cut at every pair of positions (three chunks), so each
    /// tag is split at every possible place.
    fn check_all_splits(text: &str, starts_open: bool, expected: &str) {
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let got = run(&[&text[..a], &text[a..b], &text[b..]], starts_open);
                assert_eq!(got, expected, "{text:?} cut at {a} and {b}");
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs, starts_open), expected, "{text:?} char by char");
    }

    #[test]
    fn strips_a_leading_block() {
        check_all_splits(
            "<think>\nthe user wants x < y</think>\n\nHello <b>there</b>",
            false,
            "Hello <b>there</b>",
        );
    }

    #[test]
    fn strips_blocks_in_the_middle() {
        check_all_splits("a <think>hidden</think>b ✓", false, "a b ✓");
    }

    #[test]
    fn keeps_plain_text_and_lookalikes() {
        check_all_splits(
            "x <thin and </thinking> y <",
            false,
            "x <thin and </thinking> y <",
        );
        check_all_splits("  plain reply", false, "plain reply");
    }

    #[test]
    fn reply_starting_inside_think() {
        check_all_splits("reasoning here</think>\n\nThe answer.", true, "The answer.");
        // Unknown up front: a stray closing tag in the first chunk is handled too.
        assert_eq!(run(&["reasoning</think>answer"], false), "answer");
        // Never closed: all of it was reasoning.
        assert_eq!(run(&["still thinking"], true), "");
    }

    #[test]
    fn unterminated_block_yields_nothing() {
        assert_eq!(run(&["<think>abc", "def"], false), "");
    }

    #[test]
    fn streams_without_waiting_for_the_end() {
        let mut f = ThinkFilter::new(false);
        assert_eq!(f.push("Hello"), "Hello");
        assert_eq!(f.push(" world <"), " world ");
        assert_eq!(f.push("b>"), "<b>");
    }
}
