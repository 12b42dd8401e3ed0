//! The gRPC `Sessions` service: one handle over the turn engine, the
//! inference balancer and the running turns; each call's work lives in
//! [`chat`] (a turn) or [`control`] (everything else).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use palaver_proto::session::v1 as pb;
use palaver_proto::session::v1::sessions_server::Sessions;
use tonic::{Request, Response, Status};

use palaver_core::projects::ProjectSettings;

use crate::balance::Balancer;
use crate::error::SessionError;
use crate::metrics::{KindLabel, OutcomeLabel};
use crate::running::Running;
use crate::store::{SessionId, Store};
use crate::turn::TurnEngine;
use crate::validate::validate_session_id;

mod chat;
mod control;

/// The `Sessions` gRPC service over a store.
pub struct SessionService<S: Store> {
    turns: Arc<TurnEngine<S>>,
    inference: Balancer,
    /// The turns `CancelTurn` can stop.
    running: Arc<Running>,
}

impl<S: Store> Clone for SessionService<S> {
    fn clone(&self) -> Self {
        Self {
            turns: self.turns.clone(),
            inference: self.inference.clone(),
            running: self.running.clone(),
        }
    }
}

impl<S: Store> SessionService<S> {
    pub fn new(turns: Arc<TurnEngine<S>>, inference: Balancer) -> Self {
        Self {
            turns,
            inference,
            running: Arc::default(),
        }
    }

    /// Errors by kind, for `palaver_session_errors_total`.
    fn count_error(&self, e: &SessionError) {
        self.turns
            .metrics()
            .errors
            .get_or_create(&KindLabel { kind: e.kind() })
            .inc();
    }

    /// Turns by outcome, for `palaver_session_turns_total`.
    fn count_turn(&self, outcome: &'static str) {
        self.turns
            .metrics()
            .turns
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// A configured project's settings and a valid session address, or the
    /// INVALID_ARGUMENT status saying which is wrong.
    fn address<'a>(
        &self,
        project: &'a str,
        session_id: &'a str,
    ) -> Result<(&ProjectSettings, SessionId<'a>), Status> {
        let settings = self.turns.project(project).map_err(|e| self.fail(e))?;
        validate_session_id(session_id).map_err(|e| self.fail(e))?;
        Ok((
            settings,
            SessionId {
                project,
                session_id,
            },
        ))
    }

    /// Counts a failed call and turns its cause into the caller's status.
    fn fail(&self, e: SessionError) -> Status {
        self.count_error(&e);
        self.count_turn("error");
        if matches!(e, SessionError::Store(_)) {
            tracing::error!(error = %e, "store failure");
        }
        e.into()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> Sessions for SessionService<S> {
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        self.chat_unary(request).await
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        self.chat_events(request).await
    }

    async fn get_history(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::History>, Status> {
        self.history(request).await
    }

    async fn reset_session(
        &self,
        request: Request<pb::ResetSessionRequest>,
    ) -> Result<Response<pb::ResetSessionReply>, Status> {
        self.reset(request).await
    }

    async fn delete_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::DeleteSessionReply>, Status> {
        self.delete(request).await
    }

    async fn update_project(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::UpdateProjectReply>, Status> {
        self.update(request).await
    }

    async fn cancel_turn(
        &self,
        request: Request<pb::CancelTurnRequest>,
    ) -> Result<Response<pb::CancelTurnReply>, Status> {
        self.cancel(request).await
    }

    async fn hold_lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        self.lease(request).await
    }
}
