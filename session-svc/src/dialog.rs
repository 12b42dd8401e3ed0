//! A conversation as stored: the pure data model and its rules.
//!
//! Nothing here does I/O. The turn engine loads a [`Dialog`] under the
//! session's lock, calls one of these methods, and stores it back, so every
//! rule about history (ordering, idempotency, trimming) lives in this file and
//! is tested without Redis.

use serde::{Deserialize, Serialize};

/// One session's stored conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialog {
    /// The session's own system prompt; `None` uses the project's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Sequence number of the next turn. Never reused, so a reply finds its
    /// turn even after older turns were trimmed or the history was cleared.
    /// A dialog's first number is random ([`random_first_seq`]), so that a
    /// session deleted and begun again does not reuse the numbers of the
    /// dialog it replaced either.
    pub next_seq: u64,
    /// Turns, oldest first.
    #[serde(default)]
    pub turns: Vec<Turn>,
    /// The latest turns taken back after their generation failed, so that a
    /// retry that was waiting on one gets the same error (newest last, at
    /// most [`MAX_FAILURES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

/// Failed turns a dialog remembers: enough for the retries of one burst.
pub const MAX_FAILURES: usize = 8;

/// How long past its deadline an unanswered turn may still be ended by its
/// owner (which keeps trying to take it back for a while, on clocks that
/// differ between replicas); after that it is an orphan.
pub const ORPHAN_AFTER_MS: u64 = 60_000;

/// A turn taken back because its generation failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub request_id: String,
    /// The attempt that failed: only a retry that waited on this attempt
    /// gets its error; a later retry starts a new turn.
    pub attempt: String,
    /// The gRPC status code and message the attempt ended with.
    pub code: i32,
    pub message: String,
    /// The error kind the gateway reads (e.g. overloaded), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A user message and, once generated, the reply to it.
///
/// Keeping the reply inside its turn is what makes the history read
/// u1 a1 u2 a2 even when a2 finished before a1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub seq: u64,
    /// The client's request id, for not appending a retried turn twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The attempt that owns the turn while its reply is generated: only it
    /// may store the reply or take the turn back. `None` once answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// When the owner's deadline passes (Unix ms): an unanswered turn well
    /// past it was left by an owner that could not end it, and goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_by: Option<u64>,
    pub user: String,
    /// `None` while the reply is being generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// A role in the message list sent to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A user message that opens a turn, with everything the store needs to
/// take it in one atomic step.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    pub message: &'a str,
    pub request_id: Option<&'a str>,
    /// The attempt opening it (see [`Turn::attempt`]).
    pub attempt: &'a str,
    /// The attempt's deadline and the time now, in Unix ms (see
    /// [`Turn::ends_by`]).
    pub ends_by: u64,
    pub now_ms: u64,
    /// A new system prompt for the session from this turn on.
    pub system_prompt: Option<&'a str>,
    pub limits: Limits,
    /// The first turn number, should this turn begin a new dialog: from
    /// [`random_first_seq`] in the service, fixed in tests.
    pub first_seq: u64,
}

/// A first turn number for a new dialog.
///
/// A reply still being generated when its session is deleted comes back
/// with its turn's number. Had the new dialog that a next message starts
/// under the same key numbered from 0 again, that reply would find and fill
/// the new dialog's turn of the same number (or, on a failed generation,
/// take it away). Random starts make that a chance of one in 2^52 per turn
/// of the old dialog. Below 2^52: the number never overflows and stays exact
/// for any tool that reads the stored JSON as doubles.
pub fn random_first_seq() -> u64 {
    rand::random_range(0..1u64 << 52)
}

impl Opening<'_> {
    /// Whether this is a retry of a request `dialog` already holds: it gets
    /// that turn's outcome and is not counted against the rate limit again.
    pub fn is_retry_in(&self, dialog: Option<&Dialog>) -> bool {
        matches!((self.request_id, dialog), (Some(r), Some(d)) if d.knows(r))
    }
}

/// What opening a turn produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Opened {
    /// Generate turn `seq` from `history` (without the system prompt);
    /// `system_prompt` is the session's own, if it has one.
    Generate {
        seq: u64,
        system_prompt: Option<String>,
        history: Vec<(Role, String)>,
    },
    /// A retried request whose reply is already stored.
    Replay(String),
    /// A retried request whose turn is still being generated by `attempt`:
    /// wait for that attempt's outcome, never generate a second time.
    InFlight { attempt: String },
}

/// How a turn ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ending<'a> {
    /// The reply was generated: store it after its message.
    Reply(&'a str),
    /// Generation failed: take the message back and remember why, for a
    /// retry waiting on this attempt.
    Fail {
        code: i32,
        message: &'a str,
        kind: Option<&'a str>,
    },
    /// The caller left or the outcome is unknown: take the message back.
    Abandon,
}

/// History limits of a project.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages kept (system prompt not counted).
    pub max_messages: usize,
    /// Rough token budget for the kept messages.
    pub max_tokens: usize,
}

/// A rough token count: about four characters per token, at least one per
/// message. Good enough to keep the prompt well under the model's context.
pub fn approx_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4).max(1)
}

impl Turn {
    fn message_count(&self) -> usize {
        1 + usize::from(self.reply.is_some())
    }

    fn token_estimate(&self) -> usize {
        approx_tokens(&self.user) + self.reply.as_deref().map_or(0, approx_tokens)
    }
}

impl Dialog {
    /// An empty dialog whose first turn is numbered `first_seq`.
    pub fn starting_at(first_seq: u64) -> Self {
        Self {
            system_prompt: None,
            next_seq: first_seq,
            turns: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Whether a turn with this request id is stored (answered or not).
    pub fn knows(&self, request_id: &str) -> bool {
        self.turns
            .iter()
            .any(|t| t.request_id.as_deref() == Some(request_id))
    }

    /// Starts a turn for `message` owned by `attempt`. With a request id
    /// seen before, nothing is appended: a finished turn is replayed, and an
    /// unfinished one is left to the attempt generating it.
    fn begin(&mut self, o: &Opening<'_>) -> Result<u64, Opened> {
        if let Some(rid) = o.request_id {
            if let Some(t) = self
                .turns
                .iter_mut()
                .find(|t| t.request_id.as_deref() == Some(rid))
            {
                return match (&t.reply, &t.attempt) {
                    (Some(reply), _) => Err(Opened::Replay(reply.clone())),
                    (None, Some(attempt)) => Err(Opened::InFlight {
                        attempt: attempt.clone(),
                    }),
                    // Stored before turns had owners: this attempt takes it.
                    (None, None) => {
                        t.attempt = Some(o.attempt.to_owned());
                        t.ends_by = Some(o.ends_by);
                        Ok(t.seq)
                    }
                };
            }
        }
        if let Some(p) = o.system_prompt {
            self.system_prompt = Some(p.to_owned());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.turns.push(Turn {
            seq,
            request_id: o.request_id.map(str::to_owned),
            attempt: Some(o.attempt.to_owned()),
            ends_by: Some(o.ends_by),
            user: o.message.to_owned(),
            reply: None,
        });
        Ok(seq)
    }

    fn owned_by(&mut self, attempt: &str) -> Option<&mut Turn> {
        self.turns
            .iter_mut()
            .find(|t| t.reply.is_none() && t.attempt.as_deref() == Some(attempt))
    }

    /// Stores the reply of the turn `attempt` owns. False when that turn is
    /// gone (trimmed, cleared, or taken over by a retry meanwhile); the
    /// reply is then only delivered.
    pub fn complete(&mut self, attempt: &str, reply: &str) -> bool {
        match self.owned_by(attempt) {
            Some(t) => {
                t.reply = Some(reply.to_owned());
                t.attempt = None;
                true
            }
            None => false,
        }
    }

    /// Removes the unanswered turn `attempt` owns: a failed generation must
    /// not leave its message behind (a too-long message would poison every
    /// later turn of the session). With `failure`, remembers it for a retry
    /// that waited on this attempt.
    pub fn abandon(&mut self, attempt: &str, failure: Option<(i32, &str, Option<&str>)>) -> bool {
        let Some(i) = self
            .turns
            .iter()
            .position(|t| t.reply.is_none() && t.attempt.as_deref() == Some(attempt))
        else {
            return false;
        };
        let turn = self.turns.remove(i);
        if let (Some(request_id), Some((code, message, kind))) = (turn.request_id, failure) {
            if self.failures.len() >= MAX_FAILURES {
                self.failures.remove(0);
            }
            self.failures.push(Failure {
                request_id,
                attempt: attempt.to_owned(),
                code,
                message: message.to_owned(),
                kind: kind.map(str::to_owned),
            });
        }
        true
    }

    /// The failure of `attempt` at request `request_id`, if it was taken back
    /// after failing.
    pub fn failure_of(&self, request_id: &str, attempt: &str) -> Option<&Failure> {
        self.failures
            .iter()
            .find(|f| f.request_id == request_id && f.attempt == attempt)
    }

    /// Removes unanswered turns whose owner's deadline passed more than
    /// [`ORPHAN_AFTER_MS`] ago: their owner could not end them (its store
    /// was unreachable until it gave up), and nobody else will.
    pub fn drop_orphans(&mut self, now_ms: u64) {
        self.turns.retain(|t| {
            t.reply.is_some()
                || t.ends_by
                    .is_none_or(|end| end.saturating_add(ORPHAN_AFTER_MS) >= now_ms)
        });
    }

    /// Moves the unanswered turn of `request_id` from attempt `from` (whose
    /// process died) to attempt `to`, and snapshots its prompt; `None` if
    /// the turn is no longer `from`'s.
    pub fn take_over(
        &mut self,
        request_id: &str,
        from: &str,
        to: &str,
        ends_by: u64,
    ) -> Option<Opened> {
        let t = self.turns.iter_mut().find(|t| {
            t.request_id.as_deref() == Some(request_id)
                && t.reply.is_none()
                && t.attempt.as_deref() == Some(from)
        })?;
        t.attempt = Some(to.to_owned());
        t.ends_by = Some(ends_by);
        let seq = t.seq;
        Some(Opened::Generate {
            seq,
            system_prompt: self.system_prompt.clone(),
            history: self.prompt_for(seq),
        })
    }

    /// Drops whole oldest turns until both limits hold, never the turn `keep`.
    pub fn trim(&mut self, limits: Limits, keep: Option<u64>) {
        let mut messages: usize = self.turns.iter().map(Turn::message_count).sum();
        let mut tokens: usize = self.turns.iter().map(Turn::token_estimate).sum();
        let mut drop = 0;
        for t in &self.turns {
            if messages <= limits.max_messages && tokens <= limits.max_tokens {
                break;
            }
            if Some(t.seq) == keep {
                break;
            }
            messages -= t.message_count();
            tokens -= t.token_estimate();
            drop += 1;
        }
        self.turns.drain(..drop);
    }

    /// The history to send for turn `seq` (the system prompt goes first and
    /// is the caller's): every earlier *answered* turn, message and reply,
    /// then the turn's own message. Later turns are left out, so a retried
    /// old turn sees what it saw the first time.
    ///
    /// An earlier message still waiting for its reply is left out: it gets
    /// its own reply, and sending it here would put two user messages in a
    /// row, which chat templates (Gemma, Mistral, ...) refuse. So roles
    /// always alternate user/assistant and the prompt ends with the message
    /// being answered.
    pub fn prompt_for(&self, seq: u64) -> Vec<(Role, String)> {
        let mut out = Vec::with_capacity(self.turns.len() * 2);
        for t in self.turns.iter().take_while(|t| t.seq <= seq) {
            if t.seq == seq {
                out.push((Role::User, t.user.clone()));
                break;
            }
            if let Some(r) = &t.reply {
                out.push((Role::User, t.user.clone()));
                out.push((Role::Assistant, r.clone()));
            }
        }
        out
    }

    /// Phase 1 as one step: begins the turn, trims to `limits` (never the
    /// turn itself) and snapshots what the model is to see. Both stores call
    /// this inside their atomic step (Redis: computed here, swapped in by a
    /// compare-and-set).
    pub fn open(&mut self, o: &Opening<'_>) -> Opened {
        self.drop_orphans(o.now_ms);
        match self.begin(o) {
            Err(known) => known,
            Ok(seq) => {
                self.trim(o.limits, Some(seq));
                Opened::Generate {
                    seq,
                    system_prompt: self.system_prompt.clone(),
                    history: self.prompt_for(seq),
                }
            }
        }
    }

    /// [`Dialog::open`] on the stored dialog, if there is one, else on a new
    /// one numbered from the opening's `first_seq`.
    pub fn open_in(dialog: &mut Option<Dialog>, o: &Opening<'_>) -> Opened {
        dialog
            .get_or_insert_with(|| Dialog::starting_at(o.first_seq))
            .open(o)
    }

    /// Phase 3 as one step, for the turn `attempt` owns; false if it
    /// changed nothing.
    pub fn end(&mut self, attempt: &str, ending: Ending<'_>) -> bool {
        match ending {
            Ending::Reply(text) => self.complete(attempt, text),
            Ending::Fail {
                code,
                message,
                kind,
            } => self.abandon(attempt, Some((code, message, kind))),
            Ending::Abandon => self.abandon(attempt, None),
        }
    }

    /// The stored history, oldest first, unanswered messages included.
    pub fn history(&self) -> Vec<(Role, String)> {
        let mut out = Vec::with_capacity(self.turns.len() * 2);
        for t in &self.turns {
            out.push((Role::User, t.user.clone()));
            if let Some(r) = &t.reply {
                out.push((Role::Assistant, r.clone()));
            }
        }
        out
    }

    /// Forgets the messages; the prompt and the sequence counter stay.
    pub fn clear(&mut self) {
        self.turns.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: Limits = Limits {
        max_messages: 100,
        max_tokens: 100_000,
    };

    fn opening<'a>(
        message: &'a str,
        request_id: Option<&'a str>,
        system_prompt: Option<&'a str>,
        attempt: &'a str,
    ) -> Opening<'a> {
        Opening {
            message,
            request_id,
            attempt,
            ends_by: 1_000,
            now_ms: 0,
            system_prompt,
            limits: WIDE,
            first_seq: 0,
        }
    }

    /// Opens a turn for `message` owned by attempt `message` (each message
    /// is its own attempt in these tests) and returns its number.
    fn begin(d: &mut Dialog, message: &str, rid: Option<&str>, prompt: Option<&str>) -> u64 {
        match d.open(&opening(message, rid, prompt, message)) {
            Opened::Generate { seq, .. } => seq,
            other => panic!("expected Generate, got {other:?}"),
        }
    }

    fn texts(v: Vec<(Role, String)>) -> Vec<String> {
        v.into_iter().map(|(_, t)| t).collect()
    }

    #[test]
    fn replies_finishing_out_of_order_sit_after_their_messages() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", None, None);
        begin(&mut d, "u2", None, None);
        assert!(d.complete("u2", "a2"));
        assert!(d.complete("u1", "a1"));
        assert_eq!(texts(d.history()), ["u1", "a1", "u2", "a2"]);
    }

    #[test]
    fn a_retry_waits_for_the_attempt_in_flight_and_then_replays() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", Some("r1"), None);
        assert_eq!(
            d.open(&opening("u1", Some("r1"), None, "retry")),
            Opened::InFlight {
                attempt: "u1".into()
            },
            "a retry never generates a second time"
        );
        assert_eq!(d.turns.len(), 1);
        assert!(!d.complete("retry", "stolen"), "only the owner stores");
        assert!(!d.abandon("retry", None), "only the owner takes back");
        assert!(d.complete("u1", "a1"));
        assert_eq!(
            d.open(&opening("u1", Some("r1"), None, "later")),
            Opened::Replay("a1".into())
        );
        assert!(!d.complete("u1", "again"), "a reply is stored once");
        assert_eq!(texts(d.history()), ["u1", "a1"]);
    }

    #[test]
    fn a_failed_attempt_is_remembered_for_its_waiters_only() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", Some("r1"), None);
        assert!(d.end(
            "u1",
            Ending::Fail {
                code: 8,
                message: "queue full",
                kind: Some("overloaded")
            }
        ));
        assert!(d.turns.is_empty(), "taken back");
        let f = d.failure_of("r1", "u1").expect("remembered");
        assert_eq!((f.code, f.message.as_str()), (8, "queue full"));
        assert!(d.failure_of("r1", "other").is_none());
        // A later retry of the same request starts a new turn.
        assert!(matches!(
            d.open(&opening("u1", Some("r1"), None, "again")),
            Opened::Generate { .. }
        ));
        for i in 0..2 * MAX_FAILURES {
            let a = format!("a{i}");
            d.open(&opening("x", Some(&a), None, &a));
            d.end(
                &a,
                Ending::Fail {
                    code: 8,
                    message: "",
                    kind: None,
                },
            );
        }
        assert_eq!(d.failures.len(), MAX_FAILURES, "bounded");
    }

    #[test]
    fn a_dead_attempts_turn_can_be_taken_over_once() {
        let mut d = Dialog::starting_at(0);
        let s1 = begin(&mut d, "u1", Some("r1"), None);
        let taken = d.take_over("r1", "u1", "new", 1_000);
        assert!(matches!(taken, Some(Opened::Generate { seq, .. }) if seq == s1));
        assert_eq!(
            d.take_over("r1", "u1", "third", 1_000),
            None,
            "no longer u1's"
        );
        assert!(!d.complete("u1", "late"), "the dead attempt stores nothing");
        assert!(d.complete("new", "a1"));
        assert_eq!(texts(d.history()), ["u1", "a1"]);
    }

    #[test]
    fn an_unanswered_turn_long_past_its_deadline_is_an_orphan_and_goes() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", Some("r1"), None); // ends by 1 000
        d.complete("u1", "a1");
        begin(&mut d, "u2", Some("r2"), None);
        let later = |now_ms| Opening {
            now_ms,
            ends_by: now_ms + 1_000,
            ..opening("u3", None, None, "u3")
        };
        d.open(&later(1_000 + ORPHAN_AFTER_MS));
        assert_eq!(texts(d.history()), ["u1", "a1", "u2", "u3"], "not yet");
        d.open(&Opening {
            message: "u4",
            attempt: "u4",
            ..later(1_001 + ORPHAN_AFTER_MS)
        });
        assert_eq!(
            texts(d.history()),
            ["u1", "a1", "u3", "u4"],
            "u2's owner never ended it; answered turns stay"
        );
    }

    #[test]
    fn prompts_alternate_roles_and_end_with_the_message_answered() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", None, None);
        d.complete("u1", "a1");
        let s2 = begin(&mut d, "u2", None, None);
        let s3 = begin(&mut d, "u3", None, None);
        let s4 = begin(&mut d, "u4", None, None);
        // u2 and u3 still wait for their replies: left out of u4's prompt.
        assert_eq!(texts(d.prompt_for(s4)), ["u1", "a1", "u4"]);
        assert_eq!(texts(d.prompt_for(s2)), ["u1", "a1", "u2"]);
        d.complete("u3", "a3");
        assert_eq!(texts(d.prompt_for(s4)), ["u1", "a1", "u3", "a3", "u4"]);
        assert_eq!(texts(d.prompt_for(s3)), ["u1", "a1", "u3"]);
        for seq in [s2, s3, s4] {
            let roles: Vec<Role> = d.prompt_for(seq).into_iter().map(|(r, _)| r).collect();
            for (i, r) in roles.iter().enumerate() {
                let want = if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                };
                assert_eq!(*r, want, "turn {seq}: {roles:?}");
            }
            assert_eq!(roles.last(), Some(&Role::User));
        }
    }

    #[test]
    fn prompt_for_a_turn_has_earlier_turns_only() {
        let mut d = Dialog::starting_at(0);
        let s1 = begin(&mut d, "u1", None, None);
        let s2 = begin(&mut d, "u2", None, Some("be terse"));
        d.complete("u1", "a1");
        begin(&mut d, "u3", None, None);
        assert_eq!(texts(d.prompt_for(s2)), ["u1", "a1", "u2"]);
        assert_eq!(texts(d.prompt_for(s1)), ["u1"]);
        assert_eq!(d.system_prompt.as_deref(), Some("be terse"));
    }

    #[test]
    fn trim_drops_whole_oldest_turns_and_keeps_the_current_one() {
        let mut d = Dialog::starting_at(0);
        for i in 0..5 {
            let u = format!("u{i}");
            begin(&mut d, &u, None, None);
            d.complete(&u, &format!("a{i}"));
        }
        let cur = begin(&mut d, "u5", None, None);
        d.trim(
            Limits {
                max_messages: 4,
                max_tokens: 1000,
            },
            Some(cur),
        );
        assert_eq!(texts(d.history()), ["u4", "a4", "u5"]);

        // A token budget smaller than the current message still keeps it.
        d.trim(
            Limits {
                max_messages: 100,
                max_tokens: 1,
            },
            Some(cur),
        );
        assert_eq!(texts(d.history()), ["u5"]);
        d.trim(WIDE, None);
        assert_eq!(d.turns.len(), 1);
    }

    #[test]
    fn tokens_count_characters_not_bytes() {
        assert_eq!(approx_tokens("éééééééé"), 2, "8 two-byte characters");
        assert_eq!(approx_tokens("🎉"), 1);
        assert_eq!(approx_tokens(""), 1, "at least one per message");
        // So a budget of 6 keeps 8 + 8 such characters and a short message.
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "éééééééé", None, None);
        d.complete("éééééééé", "éééééééé");
        let cur = begin(&mut d, "ab", None, None);
        d.trim(
            Limits {
                max_messages: 10,
                max_tokens: 6,
            },
            Some(cur),
        );
        assert_eq!(d.turns.len(), 2, "nothing to trim by characters");
    }

    #[test]
    fn abandon_removes_only_an_unanswered_turn() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "u1", None, None);
        d.complete("u1", "a1");
        let s2 = begin(&mut d, "u2", None, None);
        assert!(!d.abandon("u1", None));
        assert!(d.abandon("u2", None));
        assert_eq!(texts(d.history()), ["u1", "a1"]);
        // Sequence numbers are not reused after a clear.
        d.clear();
        assert!(begin(&mut d, "u3", None, None) > s2);
    }

    #[test]
    fn round_trips_through_json() {
        let mut d = Dialog::starting_at(0);
        begin(&mut d, "ü \"quoted\"", Some("r"), Some("p"));
        d.complete("ü \"quoted\"", "a");
        begin(&mut d, "in flight", Some("r2"), None);
        d.end(
            "in flight",
            Ending::Fail {
                code: 14,
                message: "down",
                kind: None,
            },
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Dialog>(&json).unwrap(), d);
    }
}
