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

/// What beginning a turn decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// A new turn was appended (or a retried one is still waiting for its
    /// reply): generate for turn `seq`.
    Generate { seq: u64 },
    /// The same request id already has its reply: send that again.
    Replay { reply: String },
}

/// A user message that opens a turn, with everything the store needs to
/// take it in one atomic step.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    pub message: &'a str,
    pub request_id: Option<&'a str>,
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
}

/// How a turn ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<'a> {
    /// The reply was generated: store it after its message.
    Reply(&'a str),
    /// Generation failed or its caller left: take the message back.
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
        }
    }

    /// Starts a turn for `message`. With a request id seen before, nothing is
    /// appended: a finished turn is replayed, an unfinished one is generated
    /// again under its original number.
    pub fn begin(
        &mut self,
        message: &str,
        request_id: Option<&str>,
        system_prompt: Option<&str>,
    ) -> Begin {
        if let Some(rid) = request_id {
            if let Some(t) = self
                .turns
                .iter()
                .find(|t| t.request_id.as_deref() == Some(rid))
            {
                return match &t.reply {
                    Some(reply) => Begin::Replay {
                        reply: reply.clone(),
                    },
                    None => Begin::Generate { seq: t.seq },
                };
            }
        }
        if let Some(p) = system_prompt {
            self.system_prompt = Some(p.to_owned());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.turns.push(Turn {
            seq,
            request_id: request_id.map(str::to_owned),
            user: message.to_owned(),
            reply: None,
        });
        Begin::Generate { seq }
    }

    /// Stores the reply of turn `seq`. Returns false when that turn is gone
    /// (trimmed or cleared meanwhile); the reply is then only delivered.
    pub fn complete(&mut self, seq: u64, reply: &str) -> bool {
        match self.turns.iter_mut().find(|t| t.seq == seq) {
            Some(t) if t.reply.is_none() => {
                t.reply = Some(reply.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Removes turn `seq` if it has no reply: a failed generation must not
    /// leave its message behind (a too-long message would poison every
    /// later turn of the session).
    pub fn abandon(&mut self, seq: u64) -> bool {
        let before = self.turns.len();
        self.turns.retain(|t| t.seq != seq || t.reply.is_some());
        self.turns.len() != before
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
    /// is the caller's): every earlier turn, with its reply when it has one,
    /// then the turn's own message. Later turns are left out, so a retried
    /// old turn sees what it saw the first time.
    pub fn prompt_for(&self, seq: u64) -> Vec<(Role, String)> {
        let mut out = Vec::with_capacity(self.turns.len() * 2);
        for t in self.turns.iter().take_while(|t| t.seq <= seq) {
            out.push((Role::User, t.user.clone()));
            if t.seq == seq {
                break;
            }
            if let Some(r) = &t.reply {
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
        match self.begin(o.message, o.request_id, o.system_prompt) {
            Begin::Replay { reply } => Opened::Replay(reply),
            Begin::Generate { seq } => {
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

    /// Phase 3 as one step; false if it changed nothing.
    pub fn end(&mut self, seq: u64, ending: Ending<'_>) -> bool {
        match ending {
            Ending::Reply(text) => self.complete(seq, text),
            Ending::Abandon => self.abandon(seq),
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

    fn gen(b: Begin) -> u64 {
        match b {
            Begin::Generate { seq } => seq,
            other => panic!("expected Generate, got {other:?}"),
        }
    }

    fn texts(v: Vec<(Role, String)>) -> Vec<String> {
        v.into_iter().map(|(_, t)| t).collect()
    }

    #[test]
    fn replies_finishing_out_of_order_sit_after_their_messages() {
        let mut d = Dialog::starting_at(0);
        let s1 = gen(d.begin("u1", None, None));
        let s2 = gen(d.begin("u2", None, None));
        assert!(d.complete(s2, "a2"));
        assert!(d.complete(s1, "a1"));
        assert_eq!(texts(d.history()), ["u1", "a1", "u2", "a2"]);
    }

    #[test]
    fn retried_request_id_is_not_appended_twice() {
        let mut d = Dialog::starting_at(0);
        let s = gen(d.begin("u1", Some("r1"), None));
        assert_eq!(gen(d.begin("u1", Some("r1"), None)), s);
        assert_eq!(d.turns.len(), 1);
        d.complete(s, "a1");
        assert_eq!(
            d.begin("u1", Some("r1"), None),
            Begin::Replay { reply: "a1".into() }
        );
        assert!(!d.complete(s, "again"), "a reply is stored once");
        assert_eq!(texts(d.history()), ["u1", "a1"]);
    }

    #[test]
    fn prompt_for_a_turn_has_earlier_turns_only() {
        let mut d = Dialog::starting_at(0);
        let s1 = gen(d.begin("u1", None, None));
        let s2 = gen(d.begin("u2", None, Some("be terse")));
        d.complete(s1, "a1");
        let _s3 = gen(d.begin("u3", None, None));
        assert_eq!(texts(d.prompt_for(s2)), ["u1", "a1", "u2"]);
        assert_eq!(texts(d.prompt_for(s1)), ["u1"]);
        assert_eq!(d.system_prompt.as_deref(), Some("be terse"));
    }

    #[test]
    fn trim_drops_whole_oldest_turns_and_keeps_the_current_one() {
        let mut d = Dialog::starting_at(0);
        for i in 0..5 {
            let s = gen(d.begin(&format!("u{i}"), None, None));
            d.complete(s, &format!("a{i}"));
        }
        let cur = gen(d.begin("u5", None, None));
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
        let s = gen(d.begin("éééééééé", None, None));
        d.complete(s, "éééééééé");
        let cur = gen(d.begin("ab", None, None));
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
        let s1 = gen(d.begin("u1", None, None));
        d.complete(s1, "a1");
        let s2 = gen(d.begin("u2", None, None));
        assert!(!d.abandon(s1));
        assert!(d.abandon(s2));
        assert_eq!(texts(d.history()), ["u1", "a1"]);
        // Sequence numbers are not reused after a clear.
        d.clear();
        assert!(gen(d.begin("u3", None, None)) > s2);
    }

    #[test]
    fn round_trips_through_json() {
        let mut d = Dialog::starting_at(0);
        let s = gen(d.begin("ü \"quoted\"", Some("r"), Some("p")));
        d.complete(s, "a");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Dialog>(&json).unwrap(), d);
    }
}
