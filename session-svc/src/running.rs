//! The turns running in this replica, by (project, session, request id), so
//! that `Sessions/CancelTurn` can stop one.
//!
//! Stopping a turn is dropping it, as when its caller goes away: its call to
//! inference-svc is dropped (the model server aborts the generation) and its
//! owner takes the turn back. The registry is in-process: a cancel reaches
//! only the turns of the replica that serves it.

use std::sync::Arc;

use palaver_core::cancel::{Registration, Registry};
use palaver_core::{ERROR_KIND_CANCELLED, ERROR_KIND_HEADER};
use tonic::Status;

type Key = (String, String, String);

/// Running turns that carry a request id, by (project, session, request id).
#[derive(Default)]
pub struct Running(Arc<Registry<Key>>);

/// One turn's entry; removed when dropped.
pub type Entry = Registration<Key>;

impl Running {
    /// Registers a turn; `None` without a request id (nothing can name it).
    pub fn register(&self, project: &str, session_id: &str, request_id: &str) -> Option<Entry> {
        (!request_id.is_empty()).then(|| self.0.register(key(project, session_id, request_id)))
    }

    /// Cancels the turns under this name; whether there was one.
    pub fn cancel(&self, project: &str, session_id: &str, request_id: &str) -> bool {
        self.0.cancel(&key(project, session_id, request_id)) > 0
    }
}

fn key(project: &str, session_id: &str, request_id: &str) -> Key {
    (
        project.to_owned(),
        session_id.to_owned(),
        request_id.to_owned(),
    )
}

/// What the caller of a cancelled turn receives.
pub fn cancelled() -> Status {
    let mut s = Status::cancelled("the turn was cancelled");
    s.metadata_mut().insert(
        ERROR_KIND_HEADER,
        tonic::metadata::MetadataValue::from_static(ERROR_KIND_CANCELLED),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_cancelled_by_its_full_name_only_while_it_runs() {
        let running = Running::default();
        assert!(running.register("p", "s", "").is_none());
        let entry = running.register("p", "s", "r1").unwrap();
        assert!(!running.cancel("p", "s", "r2"));
        assert!(!running.cancel("p", "t", "r1"));
        assert!(!running.cancel("q", "s", "r1"));
        assert!(!entry.token().is_cancelled());
        assert!(running.cancel("p", "s", "r1"));
        assert!(entry.token().is_cancelled());
        drop(entry);
        assert!(!running.cancel("p", "s", "r1"), "finished: a no-op");
    }

    #[test]
    fn the_status_says_cancelled() {
        let s = cancelled();
        assert_eq!(s.code(), tonic::Code::Cancelled);
        assert_eq!(
            s.metadata().get(ERROR_KIND_HEADER).unwrap(),
            ERROR_KIND_CANCELLED
        );
    }
}
