//! Streamed replies: a request with `"stream": true` also gets its reply in
//! pieces on `<replyTopic>/stream`.
//!
//! Pieces are JSON: `{"seq": n, "delta": "…"}` from seq 0, then
//! `{"seq": n, "done": true, "finishReason": "…"}`, or `{"seq": n, "error":
//! "…"}`. Deltas are coalesced: the first goes out at once (it is what a
//! waiting user sees first), later ones at most every [`MIN_GAP`], so a
//! turn publishes at most ~20 pieces a second however fast the model is.
//! session-svc's deltas are whole `String`s, so a piece never splits a
//! UTF-8 character.
//!
//! A turn retried after a broken connection may be generated again from the
//! start: what the new attempt repeats of the text already sent is not sent
//! twice. If it says something else (a fresh sample), the stream ends with
//! an error piece and the reply topic still gets the whole reply.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::errors::ErrorKind;
use crate::metrics::OutKind;
use crate::publish::{Correlation, Publisher};
use crate::topics::{self, Route};

/// Least time between two delta pieces of one turn.
pub const MIN_GAP: Duration = Duration::from_millis(50);

/// The last level of a stream topic, after the reply topic.
pub const STREAM_LEVEL: &str = "stream";

/// Error piece when a retried turn's text did not continue what was sent.
pub const DIVERGED_TEXT: &str =
    "Error: The stream was interrupted; the whole reply follows on the reply topic.";

/// The stream topic of a reply topic.
pub fn stream_topic(reply_topic: &str) -> String {
    format!("{reply_topic}/{STREAM_LEVEL}")
}

/// The coalescing and numbering of one turn's pieces, free of I/O.
#[derive(Debug, Default)]
pub struct Pieces {
    seq: u64,
    /// Text given out so far: published, or waiting in `pending`.
    sent: String,
    /// Text not yet published.
    pending: String,
    /// This attempt's text so far.
    attempt: String,
    /// A retried attempt said something else than what was sent.
    diverged: bool,
    last: Option<Instant>,
}

impl Pieces {
    /// A new attempt at the turn starts from its first token again.
    pub fn new_attempt(&mut self) {
        self.attempt.clear();
    }

    /// Takes in one delta of the current attempt.
    pub fn push(&mut self, delta: &str) {
        if self.diverged {
            return;
        }
        self.attempt.push_str(delta);
        if self.attempt.len() <= self.sent.len() {
            self.diverged = !self.sent.starts_with(&self.attempt);
        } else if self.attempt.starts_with(&self.sent) {
            // `sent` is a prefix, so its length is a character boundary.
            let new = &self.attempt[self.sent.len()..];
            self.pending.push_str(new);
            self.sent.push_str(new);
        } else {
            self.diverged = true;
        }
    }

    /// When the pending text should go out; `None` with nothing pending.
    pub fn due(&self) -> Option<Instant> {
        if self.pending.is_empty() || self.diverged {
            return None;
        }
        Some(self.last.map_or_else(Instant::now, |at| at + MIN_GAP))
    }

    /// The delta piece of everything pending, if any.
    pub fn take_delta(&mut self, now: Instant) -> Option<String> {
        if self.pending.is_empty() || self.diverged {
            return None;
        }
        self.last = Some(now);
        let delta = std::mem::take(&mut self.pending);
        Some(self.piece(json!({ "delta": delta })))
    }

    /// The pieces that end a turn whose whole reply is `text`: the rest of
    /// the text, then `done`, or an error piece if the stream cannot end in
    /// exactly that text.
    pub fn finish(&mut self, text: &str, finish_reason: &str, now: Instant) -> Vec<String> {
        if self.diverged || !text.starts_with(&self.sent) {
            self.diverged = true;
            return vec![self.error(DIVERGED_TEXT)];
        }
        // A reply replayed from the store, or a turn sent `final_only`,
        // comes as `done` alone.
        self.pending.push_str(&text[self.sent.len()..]);
        self.sent = text.to_owned();
        let mut out: Vec<String> = self.take_delta(now).into_iter().collect();
        let reason = if finish_reason.is_empty() {
            "stop"
        } else {
            finish_reason
        };
        out.push(self.piece(json!({ "done": true, "finishReason": reason })));
        out
    }

    /// The error piece that ends a failed turn.
    pub fn error(&mut self, text: &str) -> String {
        self.pending.clear();
        self.piece(json!({ "error": text }))
    }

    fn piece(&mut self, mut body: serde_json::Value) -> String {
        body["seq"] = json!(self.seq);
        self.seq += 1;
        body.to_string()
    }
}

/// One turn's stream: its pieces and where they go.
pub struct ReplyStream {
    publisher: Publisher,
    topic: String,
    /// The request's MQTT 5 Correlation Data, echoed on every piece.
    correlation: Correlation,
    pieces: Pieces,
}

impl ReplyStream {
    /// The stream of a turn replying on `reply_topic`; `None` when the
    /// stream topic would not be publishable (a reply topic near the length
    /// limit), in which case the client gets the reply alone.
    pub fn new(publisher: Publisher, reply_topic: &str, correlation: Correlation) -> Option<Self> {
        let topic = stream_topic(reply_topic);
        if !topics::confined(publisher.project(), Route::Reply, &topic) {
            tracing::debug!(topic, "no stream: its topic cannot be published to");
            return None;
        }
        Some(Self {
            publisher,
            topic,
            correlation,
            pieces: Pieces::default(),
        })
    }

    /// See [`Pieces::new_attempt`].
    pub fn new_attempt(&mut self) {
        self.pieces.new_attempt();
    }

    /// When [`Self::flush`] should run next; `None` with nothing to send.
    pub fn due(&self) -> Option<Instant> {
        self.pieces.due()
    }

    /// Takes in a delta, and sends what is pending if it is due.
    pub async fn push(&mut self, delta: &str) {
        self.pieces.push(delta);
        if self.due().is_some_and(|at| at <= Instant::now()) {
            self.flush().await;
        }
    }

    /// Sends what is pending now.
    pub async fn flush(&mut self) {
        if let Some(piece) = self.pieces.take_delta(Instant::now()) {
            self.send(piece, None).await;
        }
    }

    /// Ends the stream of a turn answered with `text`.
    pub async fn finish(&mut self, text: &str, finish_reason: &str) {
        for piece in self.pieces.finish(text, finish_reason, Instant::now()) {
            self.send(piece, None).await;
        }
    }

    /// Ends the stream of a failed turn; the piece names its `kind` too.
    pub async fn fail(&mut self, kind: ErrorKind, text: &str) {
        let piece = self.pieces.error(text);
        self.send(piece, Some(kind)).await;
    }

    /// Ends the stream without waiting for room in the client's queue.
    pub fn fail_now(&mut self, kind: ErrorKind, text: &str) {
        let piece = self.pieces.error(text);
        let _ = self.publisher.try_publish_answer(
            OutKind::Piece,
            &self.topic,
            piece.into_bytes(),
            &self.correlation,
            Some(kind),
        );
    }

    async fn send(&self, piece: String, error: Option<ErrorKind>) {
        let _ = self
            .publisher
            .publish_answer(
                OutKind::Piece,
                &self.topic,
                piece.into_bytes(),
                &self.correlation,
                error,
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(piece: &str) -> Value {
        serde_json::from_str(piece).unwrap()
    }

    #[test]
    fn the_first_delta_is_due_at_once_and_later_ones_after_the_gap() {
        let mut p = Pieces::default();
        assert_eq!(p.due(), None);
        let t0 = Instant::now();
        p.push("Hel");
        assert!(p.due().unwrap() <= Instant::now());
        assert_eq!(
            parse(&p.take_delta(t0).unwrap()),
            json!({"seq": 0, "delta": "Hel"})
        );
        assert_eq!(p.due(), None);
        p.push("lo");
        p.push(" wö");
        assert_eq!(p.due(), Some(t0 + MIN_GAP));
        let later = t0 + MIN_GAP;
        assert_eq!(
            parse(&p.take_delta(later).unwrap()),
            json!({"seq": 1, "delta": "lo wö"})
        );
        let end = p.finish("Hello wörld 👋", "length", later);
        let end: Vec<Value> = end.iter().map(|s| parse(s)).collect();
        assert_eq!(
            end,
            [
                json!({"seq": 2, "delta": "rld 👋"}),
                json!({"seq": 3, "done": true, "finishReason": "length"})
            ]
        );
    }

    #[test]
    fn a_reply_without_deltas_comes_whole_before_done() {
        let mut p = Pieces::default();
        let end: Vec<Value> = p
            .finish("stored reply", "", Instant::now())
            .iter()
            .map(|s| parse(s))
            .collect();
        assert_eq!(
            end,
            [
                json!({"seq": 0, "delta": "stored reply"}),
                json!({"seq": 1, "done": true, "finishReason": "stop"})
            ]
        );
    }

    #[test]
    fn a_retry_repeating_the_text_sends_only_what_is_new() {
        let mut p = Pieces::default();
        p.push("one two ");
        p.take_delta(Instant::now()).unwrap();
        p.new_attempt();
        p.push("one ");
        assert_eq!(p.due(), None, "repeated text is not sent again");
        p.push("two three");
        let piece = parse(&p.take_delta(Instant::now()).unwrap());
        assert_eq!(piece, json!({"seq": 1, "delta": "three"}));
        let end = p.finish("one two three", "stop", Instant::now());
        assert_eq!(end.len(), 1, "only done: {end:?}");
    }

    #[test]
    fn a_retry_saying_something_else_ends_in_an_error_piece() {
        let mut p = Pieces::default();
        p.push("one two ");
        p.take_delta(Instant::now()).unwrap();
        p.new_attempt();
        p.push("uno ");
        assert_eq!(p.due(), None);
        let end = p.finish("uno dos", "stop", Instant::now());
        assert_eq!(
            end.iter().map(|s| parse(s)).collect::<Vec<_>>(),
            [json!({"seq": 1, "error": DIVERGED_TEXT})]
        );
    }

    #[test]
    fn an_error_drops_what_is_pending() {
        let mut p = Pieces::default();
        p.push("a");
        p.take_delta(Instant::now()).unwrap();
        p.push("b");
        assert_eq!(
            parse(&p.error("Error: Cancelled.")),
            json!({"seq": 1, "error": "Error: Cancelled."})
        );
        assert_eq!(p.due(), None);
    }

    #[test]
    fn stream_topic_is_below_the_reply_topic() {
        assert_eq!(
            stream_topic("p/assistant_response/s/c/1"),
            "p/assistant_response/s/c/1/stream"
        );
    }
}
