//! The calls outside a turn: reading a history, resetting and deleting
//! sessions, a project's prompt and bulk actions, cancelling a running
//! turn, and the gateways' consumer lease.

use std::time::Duration;

use futures::StreamExt as _;
use palaver_proto::session::v1 as pb;
use tonic::{Request, Response, Status};

use super::SessionService;
use crate::dialog::{random_first_seq, Dialog, Role};
use crate::error::SessionError;
use crate::store::{SessionId, Store};
use crate::turn::LogSafe;
use crate::validate::{invalid, MAX_ID_BYTES, MAX_SYSTEM_PROMPT_CHARS};

/// Longest lease: a holder that dies keeps others out for at most this.
const MAX_LEASE_TTL: Duration = Duration::from_secs(600);
/// Sessions a project-wide clear or delete works on at once.
const PROJECT_ACTION_CONCURRENCY: usize = 16;

impl<S: Store> SessionService<S> {
    /// `GetHistory`: a session's prompt and messages as stored.
    pub(super) async fn history(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::History>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        let store = self.turns.store();
        let (dialog, project_prompt) =
            tokio::join!(store.load(id), store.project_prompt(&r.project));
        // No dialog reads as an empty one; its numbering is never used.
        let dialog = dialog
            .map_err(|e| self.fail(e.into()))?
            .unwrap_or_else(|| Dialog::starting_at(0));
        let project_prompt = project_prompt.map_err(|e| self.fail(e.into()))?;
        let system_prompt = dialog
            .system_prompt
            .clone()
            .or(project_prompt)
            .unwrap_or_else(|| settings.system_prompt.clone());
        Ok(Response::new(pb::History {
            system_prompt,
            messages: dialog.history().into_iter().map(history_message).collect(),
        }))
    }

    /// `ResetSession`: a new system prompt and/or an emptied history.
    pub(super) async fn reset(
        &self,
        request: Request<pb::ResetSessionRequest>,
    ) -> Result<Response<pb::ResetSessionReply>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        // The limit a chat's system prompt has: a reset is no way around it.
        if let Some(p) = &r.system_prompt {
            if p.chars().count() > MAX_SYSTEM_PROMPT_CHARS {
                return Err(self.fail(invalid(format!(
                    "system prompt is too long (at most {MAX_SYSTEM_PROMPT_CHARS} characters)"
                ))));
            }
        }
        let (prompt, keep_history) = (r.system_prompt, r.keep_history);
        self.turns
            .locked(id, settings.session_ttl, move |d| {
                if let Some(p) = prompt {
                    d.get_or_insert_with(|| Dialog::starting_at(random_first_seq()))
                        .system_prompt = Some(p);
                }
                if let (Some(d), false) = (d, keep_history) {
                    d.clear();
                }
            })
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::ResetSessionReply {}))
    }

    /// `DeleteSession`: the session gone, with its index entry.
    pub(super) async fn delete(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::DeleteSessionReply>, Status> {
        let r = request.into_inner();
        let (settings, id) = self.address(&r.project, &r.session_id)?;
        let existed = self
            .turns
            .locked(id, settings.session_ttl, |d| d.take().is_some())
            .await
            .map_err(|e| self.fail(e))?;
        self.turns
            .store()
            .forget(id)
            .await
            .map_err(|e| self.fail(e.into()))?;
        Ok(Response::new(pb::DeleteSessionReply { existed }))
    }

    /// `UpdateProject`: the project's prompt, and a clear or delete of all its sessions.
    pub(super) async fn update(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::UpdateProjectReply>, Status> {
        let r = request.into_inner();
        let settings = self.turns.project(&r.project).map_err(|e| self.fail(e))?;
        let store = self.turns.store();
        if let Some(p) = &r.system_prompt {
            if p.chars().count() > MAX_SYSTEM_PROMPT_CHARS {
                return Err(self.fail(invalid(format!(
                    "system prompt is too long (at most {MAX_SYSTEM_PROMPT_CHARS} characters)"
                ))));
            }
            store
                .set_project_prompt(&r.project, p)
                .await
                .map_err(|e| self.fail(e.into()))?;
        }
        let action = pb::SessionAction::try_from(r.sessions).unwrap_or(pb::SessionAction::None);
        if action == pb::SessionAction::None {
            return Ok(Response::new(pb::UpdateProjectReply { sessions: 0 }));
        }
        let ids = store
            .sessions(&r.project)
            .await
            .map_err(|e| self.fail(e.into()))?;
        // A new project prompt with a reset also drops the sessions' own
        // prompts, so every session speaks with the new one from now on.
        let new_prompt = r.system_prompt.is_some();
        let project = r.project.as_str();
        let changes = ids.into_iter().map(|sid| async move {
            let id = SessionId {
                project,
                session_id: &sid,
            };
            let changed = self
                .turns
                .locked(id, settings.session_ttl, |d| match action {
                    pb::SessionAction::Delete => d.take().is_some(),
                    _ => match d {
                        Some(d) => {
                            d.clear();
                            if new_prompt {
                                d.system_prompt = None;
                            }
                            true
                        }
                        None => false,
                    },
                })
                .await?;
            if action == pb::SessionAction::Delete || !changed {
                store.forget(id).await?;
            }
            Ok::<_, SessionError>(u32::from(changed))
        });
        // A few sessions at a time: one by one, each its lock's round trips,
        // a project of thousands of sessions outlasts the caller's deadline.
        let mut done = futures::stream::iter(changes).buffer_unordered(PROJECT_ACTION_CONCURRENCY);
        let mut touched = 0u32;
        while let Some(changed) = done.next().await {
            touched += changed.map_err(|e| self.fail(e))?;
        }
        Ok(Response::new(pb::UpdateProjectReply { sessions: touched }))
    }

    /// `CancelTurn`: stops a running turn of this replica, if any.
    pub(super) async fn cancel(
        &self,
        request: Request<pb::CancelTurnRequest>,
    ) -> Result<Response<pb::CancelTurnReply>, Status> {
        let r = request.into_inner();
        let cancelled = self
            .running
            .cancel(&r.project, &r.session_id, &r.request_id);
        tracing::info!(session = %LogSafe(&r.project, &r.session_id), cancelled, "cancel turn");
        Ok(Response::new(pb::CancelTurnReply { cancelled }))
    }

    /// `HoldLease`: takes or renews a named lease (the gateways' consumer lease).
    pub(super) async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let r = request.into_inner();
        for (what, v) in [("lease name", &r.name), ("lease holder", &r.holder)] {
            if v.trim().is_empty() || v.len() > MAX_ID_BYTES {
                return Err(self.fail(invalid(format!("{what} must be 1 to {MAX_ID_BYTES} bytes"))));
            }
        }
        let ttl = Duration::from_millis(u64::from(r.ttl_ms));
        if ttl > MAX_LEASE_TTL {
            return Err(self.fail(invalid(format!(
                "lease ttl_ms must be at most {}",
                MAX_LEASE_TTL.as_millis()
            ))));
        }
        let lease = self
            .turns
            .store()
            .hold_lease(&r.name, &r.holder, ttl)
            .await
            .map_err(|e| self.fail(e.into()))?;
        Ok(Response::new(pb::LeaseReply {
            held: lease.held,
            epoch: lease.epoch,
            holder: lease.holder.unwrap_or_default(),
        }))
    }
}

fn history_message((role, content): (Role, String)) -> pb::HistoryMessage {
    let role = match role {
        Role::System => pb::Role::System,
        Role::User => pb::Role::User,
        Role::Assistant => pb::Role::Assistant,
    };
    pb::HistoryMessage {
        role: role as i32,
        content,
    }
}
