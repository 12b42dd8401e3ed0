//! What generates text: an OpenAI-compatible server or the simulator, behind
//! one streaming interface that the admission layer wraps.
//!
//! Contract of a [`TokenStream`]: zero or more chunks with text, then exactly
//! one chunk with `finish_reason` set (it may carry text and usage too), then
//! the end; or an `Err` item, after which the stream ends. Dropping the stream
//! cancels the generation.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
pub use palaver_proto::inference::v1::Usage;

use crate::config::{BackendKind, Config};
use crate::error::InferenceError;

pub mod openai;
pub mod sim;
pub mod sse;
pub mod think;

pub use openai::OpenAiBackend;
pub use sim::SimBackend;

/// A generation in progress; see the module docs for its contract.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<Chunk, InferenceError>> + Send>>;

/// One piece of a reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// Text to append to the reply (may be empty on the last chunk).
    pub delta: String,
    /// Set on the last chunk only: "stop", "length", ...
    pub finish_reason: Option<String>,
    /// Token counts, on the last chunk when the backend reports them.
    pub usage: Option<Usage>,
}

/// Who said a message; the three roles chat models know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The human's turn.
    User,
    /// The model's earlier turns.
    Assistant,
}

impl Role {
    /// Parses the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }

    /// The wire name, as the OpenAI API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One message of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

/// A validated generation request, independent of gRPC.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// The whole conversation, system prompt first.
    pub messages: Vec<Message>,
    /// Sampling temperature, 0..=2 (0 means greedy, not "default").
    pub temperature: f32,
    /// Nucleus sampling, (0, 1].
    pub top_p: f32,
    /// Upper bound on the reply's length; always sent so a reply cannot run
    /// to the context limit.
    pub max_tokens: u32,
    /// Caller's id for tracing; sent to vLLM as `X-Request-Id` when usable.
    pub request_id: String,
    /// The conversation (session) this turn belongs to; sent to the model
    /// server as `x-session-id` and OpenAI `user`, so a router in front of
    /// several vLLMs can keep a session on the server that caches it.
    pub affinity_key: String,
    /// Who asked (`GenerateRequest.client`; empty: anonymous): admission
    /// shares the slots between clients by it.
    pub client: String,
}

impl GenerateParams {
    /// The last user message, which the simulator and logs quote.
    pub fn last_user_message(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
    }
}

/// The configured backend. An enum rather than a trait object: there are two,
/// both known here, and a `Clone` service is what tower wants.
#[derive(Clone)]
pub enum Backend {
    /// vLLM or another OpenAI-compatible server.
    OpenAi(OpenAiBackend),
    /// The built-in simulator.
    Sim(SimBackend),
}

impl Backend {
    /// Builds the backend `config` asks for.
    pub fn from_config(config: &Config) -> Result<Self, InferenceError> {
        Ok(match &config.backend {
            BackendKind::OpenAi { url } => Self::OpenAi(OpenAiBackend::new(config, url)?),
            BackendKind::Sim => Self::Sim(SimBackend::new(config)),
        })
    }

    /// Whether the model server answers its health check (`GET /health`
    /// 200 within `timeout`); the simulator always does.
    pub async fn healthy(&self, timeout: std::time::Duration) -> bool {
        match self {
            Self::OpenAi(b) => b.healthy(timeout).await,
            Self::Sim(_) => true,
        }
    }

    /// Starts a generation. Errors the server reports before streaming come
    /// back here; later ones arrive as an `Err` item of the stream.
    pub async fn generate(&self, req: GenerateParams) -> Result<TokenStream, InferenceError> {
        match self {
            Self::OpenAi(b) => b.generate(req).await,
            Self::Sim(b) => Ok(b.generate(req)),
        }
    }
}

impl tower::Service<GenerateParams> for Backend {
    type Response = TokenStream;
    type Error = InferenceError;
    type Future = Pin<Box<dyn Future<Output = Result<TokenStream, InferenceError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Backends never push back themselves: the admission layer above
        // decides how many generations run.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GenerateParams) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.generate(req).await })
    }
}
