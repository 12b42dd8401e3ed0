//! How often control topics may be used: a token bucket per session and one
//! per project, so that a client can neither rewrite one session's prompt in
//! a loop nor flood the store with fresh session ids.
//!
//! A bucket holds up to one minute's allowance and refills continuously. The
//! project's bucket is checked first, so a flood of fresh session ids adds
//! at most the project's allowance of entries; entries that have refilled
//! completely are the same as no entry and are pruned.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-session entries kept before the full ones are pruned.
const PRUNE_ABOVE: usize = 4096;

/// Allowances of control messages, per minute; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Control messages one session may send per minute.
    pub per_session: u32,
    /// Control messages one project may receive per minute, all sessions
    /// and project-wide actions together.
    pub per_project: u32,
}

impl Default for ControlLimits {
    fn default() -> Self {
        Self {
            per_session: 10,
            per_project: 120,
        }
    }
}

/// Which allowance a refused control message exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// The session's.
    Session,
    /// The project's.
    Project,
}

impl Exceeded {
    /// The label of `palaver_gateway_dropped_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Exceeded::Session => "control_rate_session",
            Exceeded::Project => "control_rate_project",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_min: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(per_min),
            at: now,
        }
    }

    fn refill(&mut self, per_min: u32, now: Instant) {
        let per_sec = f64::from(per_min) / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(per_min));
        self.at = now;
    }

    fn is_full(&self, per_min: u32, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(per_min, now);
        copy.tokens >= f64::from(per_min)
    }
}

/// The buckets of every project a gateway serves.
#[derive(Debug)]
pub struct ControlRate {
    limits: ControlLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    projects: HashMap<String, Bucket>,
    sessions: HashMap<(String, String), Bucket>,
}

impl ControlRate {
    /// Buckets for `limits`, all full.
    pub fn new(limits: ControlLimits) -> Self {
        Self {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    /// Takes one control message of `project` (about `session`, if it names
    /// one) from the allowances, or says which one it would exceed.
    pub fn admit(&self, project: &str, session: Option<&str>) -> Result<(), Exceeded> {
        self.admit_at(project, session, Instant::now())
    }

    fn admit_at(&self, project: &str, session: Option<&str>, now: Instant) -> Result<(), Exceeded> {
        let ControlLimits {
            per_session,
            per_project,
        } = self.limits;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let project_bucket = (per_project > 0).then(|| {
            let bucket = state
                .projects
                .entry(project.to_owned())
                .or_insert_with(|| Bucket::full(per_project, now));
            bucket.refill(per_project, now);
            bucket
        });
        if project_bucket.as_ref().is_some_and(|b| b.tokens < 1.0) {
            return Err(Exceeded::Project);
        }
        if let (Some(session), true) = (session, per_session > 0) {
            if state.sessions.len() >= PRUNE_ABOVE {
                state.sessions.retain(|_, b| !b.is_full(per_session, now));
            }
            let bucket = state
                .sessions
                .entry((project.to_owned(), session.to_owned()))
                .or_insert_with(|| Bucket::full(per_session, now));
            bucket.refill(per_session, now);
            if bucket.tokens < 1.0 {
                return Err(Exceeded::Session);
            }
            bucket.tokens -= 1.0;
        }
        if let Some(bucket) = project_bucket {
            bucket.tokens -= 1.0;
        }
        Ok(())
    }

    /// Per-session entries held (for tests of the pruning).
    #[cfg(test)]
    fn sessions_held(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }
}

/// How long one token takes to come back at `per_min` (for tests and docs).
pub fn refill_time(per_min: u32) -> Duration {
    Duration::from_secs_f64(60.0 / f64::from(per_min.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_session: u32, per_project: u32) -> ControlRate {
        ControlRate::new(ControlLimits {
            per_session,
            per_project,
        })
    }

    #[test]
    fn a_session_gets_its_allowance_then_waits_for_the_refill() {
        let r = rate(3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.admit_at("p", Some("s"), t0), Ok(()));
        }
        assert_eq!(r.admit_at("p", Some("s"), t0), Err(Exceeded::Session));
        // Another session and another project are not affected.
        assert_eq!(r.admit_at("p", Some("t"), t0), Ok(()));
        assert_eq!(r.admit_at("q", Some("s"), t0), Ok(()));
        let later = t0 + refill_time(3);
        assert_eq!(r.admit_at("p", Some("s"), later), Ok(()));
        assert_eq!(r.admit_at("p", Some("s"), later), Err(Exceeded::Session));
    }

    #[test]
    fn fresh_session_ids_do_not_multiply_the_project_allowance() {
        let r = rate(3, 5);
        let t0 = Instant::now();
        let admitted = (0..50)
            .filter(|i| r.admit_at("p", Some(&format!("s{i}")), t0).is_ok())
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(r.admit_at("p", None, t0), Err(Exceeded::Project));
        // Refused messages leave no entry behind.
        assert_eq!(r.sessions_held(), 5);
    }

    #[test]
    fn a_session_refused_does_not_spend_the_project_allowance() {
        let r = rate(1, 3);
        let t0 = Instant::now();
        assert_eq!(r.admit_at("p", Some("s"), t0), Ok(()));
        for _ in 0..10 {
            assert_eq!(r.admit_at("p", Some("s"), t0), Err(Exceeded::Session));
        }
        assert_eq!(r.admit_at("p", Some("t"), t0), Ok(()));
        assert_eq!(r.admit_at("p", None, t0), Ok(()));
        assert_eq!(r.admit_at("p", None, t0), Err(Exceeded::Project));
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let r = rate(0, 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(r.admit_at("p", Some("s"), t0), Ok(()));
        }
        assert_eq!(r.sessions_held(), 0);
    }

    #[test]
    fn refilled_sessions_are_pruned() {
        let r = rate(1, 0);
        let t0 = Instant::now();
        for i in 0..PRUNE_ABOVE {
            assert!(r.admit_at("p", Some(&format!("s{i}")), t0).is_ok());
        }
        assert_eq!(r.sessions_held(), PRUNE_ABOVE);
        let later = t0 + refill_time(1);
        assert!(r.admit_at("p", Some("new"), later).is_ok());
        assert_eq!(r.sessions_held(), 1);
    }
}
