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
                State::Inside => match self.pending.find(CLOSE) {
                    Some(i) => {
                        self.pending.drain(..i + CLOSE.len());
                        // Models put blank lines between reasoning and answer.
                        self.state = State::Start;
                    }
                    None => {
                        let keep = tag_prefix_suffix(&self.pending, &[CLOSE]);
                        self.pending.drain(..self.pending.len() - keep);
                        return out;
                    }
                },
                State::Outside => {
                    // No '<', no tag, nor the start of one: all of it is
                    // visible. Most deltas take this way, which spares the
                    // two substring searches below (each builds a searcher).
                    if !self.pending.as_bytes().contains(&b'<') {
                        out.push_str(&self.pending);
                        self.pending.clear();
                        return out;
                    }
                    let open = self.pending.find(OPEN);
                    let close = self.pending.find(CLOSE);
                    match (open, close) {
                        (Some(o), c) if c.is_none_or(|c| o < c) => {
                            out.push_str(&self.pending[..o]);
                            self.pending.drain(..o + OPEN.len());
                            self.state = State::Inside;
                        }
                        (_, Some(c)) => {
                            // A closing tag without an opening one: what is
                            // still held before it was reasoning.
                            self.pending.drain(..c + CLOSE.len());
                            self.state = State::Start;
                        }
                        _ => {
                            let keep = tag_prefix_suffix(&self.pending, &[OPEN, CLOSE]);
                            let emit = self.pending.len() - keep;
                            out.push_str(&self.pending[..emit]);
                            self.pending.drain(..emit);
                            return out;
                        }
                    }
                }
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

/// Length of the longest suffix of `text` that is a proper prefix of one of
/// `tags` (the start of a tag that the next chunk may complete).
fn tag_prefix_suffix(text: &str, tags: &[&str]) -> usize {
    let longest = tags.iter().map(|t| t.len() - 1).max().unwrap_or(0);
    (1..=longest.min(text.len()))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && tags.iter().any(|t| t.starts_with(&text[text.len() - n..]))
        })
        .unwrap_or(0)
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
