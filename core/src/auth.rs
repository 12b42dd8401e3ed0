//! gRPC bearer tokens: servers check `authorization: Bearer <token>` against
//! a tokens file, clients send theirs.
//!
//! The tokens file is TOML, a `[tokens]` table of `"<token>" = "<role>"`.
//! `chat` may call the methods a service lists as chat methods, `admin` may
//! call everything. Health and reflection stay open so probes and `grpcurl
//! list` work without a token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The chat methods of the service (one session's turns and history).
    Chat,
    /// Every method.
    Admin,
}

/// Why tokens cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("--auth-token: {0}")]
    Token(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: HashMap<String, Role>,
}

/// Paths every server leaves open: health checks and reflection.
const OPEN_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The tokens a server accepts and which methods `chat` may call.
pub struct Policy {
    tokens: Vec<(Vec<u8>, Role)>,
    chat_methods: &'static [&'static str],
}

impl std::fmt::Debug for Policy {
    // Never the tokens themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tokens", &self.tokens.len())
            .field("chat_methods", &self.chat_methods)
            .finish()
    }
}

impl Policy {
    /// A policy over `tokens`; `chat_methods` are full gRPC paths such as
    /// `/palaver.session.v1.Sessions/Chat`.
    pub fn new(
        tokens: impl IntoIterator<Item = (String, Role)>,
        chat_methods: &'static [&'static str],
    ) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|(t, r)| (t.into_bytes(), r))
                .collect(),
            chat_methods,
        }
    }

    /// Reads a tokens file.
    pub fn load(path: &Path, chat_methods: &'static [&'static str]) -> Result<Self, AuthError> {
        let invalid = |reason: String| AuthError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        // The parser's message may quote the line, that is a token: say only where.
        let file: TokensFile = toml::from_str(&text).map_err(|e| {
            invalid(match e.span() {
                Some(span) => format!("not a tokens file (error at byte {})", span.start),
                None => "not a tokens file".into(),
            })
        })?;
        if file.tokens.is_empty() {
            return Err(invalid("[tokens] is empty".into()));
        }
        if let Some(bad) = file.tokens.keys().find(|t| !valid_token(t)) {
            return Err(invalid(format!(
                "a token of {} characters is not printable ASCII without spaces",
                bad.len()
            )));
        }
        Ok(Self::new(file.tokens, chat_methods))
    }

    /// The role of `token`, compared in constant time against every known
    /// token so that timing does not tell how much of a guess was right.
    fn role_of(&self, token: &[u8]) -> Option<Role> {
        let mut found = None;
        for (known, role) in &self.tokens {
            if bool::from(known.as_slice().ct_eq(token)) {
                found = Some(*role);
            }
        }
        found
    }

    /// Whether a call to `path` with `authorization` may go on.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        let token = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        match self.role_of(token) {
            None => Err(Status::unauthenticated("unknown bearer token")),
            Some(Role::Admin) => Ok(()),
            Some(Role::Chat) if self.chat_methods.contains(&path) => Ok(()),
            Some(Role::Chat) => Err(Status::permission_denied(
                "this token's role (chat) may not call this method",
            )),
        }
    }
}

fn valid_token(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic())
}

/// A server's `--auth-tokens-file` flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerAuthArgs {
    /// Require a bearer token on gRPC calls: a TOML file with a [tokens] table
    /// of "<token>" = "chat" | "admin". Without it the service is
    /// unauthenticated. Health and reflection stay open.
    #[arg(long, env = "PALAVER_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
}

impl ServerAuthArgs {
    /// The layer checking tokens; logs at startup when there are none,
    /// loudly when `listen` is reachable from other hosts.
    pub fn layer(
        &self,
        chat_methods: &'static [&'static str],
        listen: Option<std::net::SocketAddr>,
        service: &str,
    ) -> Result<AuthLayer, AuthError> {
        match &self.auth_tokens_file {
            Some(path) => {
                let policy = Policy::load(path, chat_methods)?;
                tracing::info!(
                    tokens = policy.tokens.len(),
                    "{service}: gRPC calls need a bearer token"
                );
                Ok(AuthLayer::new(Some(policy)))
            }
            None => {
                match listen {
                    Some(addr) if !addr.ip().is_loopback() => tracing::warn!(
                        %addr,
                        "{service}: gRPC is UNAUTHENTICATED on a non-loopback address: anyone who \
                         reaches it can call every method; set --auth-tokens-file"
                    ),
                    _ => {
                        tracing::info!("{service}: gRPC is unauthenticated (no --auth-tokens-file)")
                    }
                }
                Ok(AuthLayer::new(None))
            }
        }
    }
}

/// How a gRPC server is protected: TLS (with client certificates when it
/// has a client CA) and bearer tokens. The default is neither.
#[derive(Debug, Clone)]
pub struct Security {
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub auth: AuthLayer,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            tls: None,
            auth: AuthLayer::new(None),
        }
    }
}

/// A tower layer checking bearer tokens before any gRPC method runs.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Option<Arc<Policy>>,
}

impl AuthLayer {
    /// `None` lets every call through.
    pub fn new(policy: Option<Policy>) -> Self {
        Self {
            policy: policy.map(Arc::new),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(policy) = &self.policy {
            let authorization = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if let Err(status) = policy.check(req.uri().path(), authorization) {
                return Either::Left(ready(Ok(status.into_http())));
            }
        }
        Either::Right(self.inner.call(req))
    }
}

/// A client's token flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientAuthArgs {
    /// Bearer token sent on gRPC calls. Prefer the environment variable or
    /// --auth-token-file: a flag is visible to anyone running `ps`.
    #[arg(long, env = "PALAVER_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    #[arg(long, env = "PALAVER_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<PathBuf>,
}

impl ClientAuthArgs {
    /// The interceptor adding the token, if one is configured.
    pub fn bearer(&self) -> Result<Bearer, AuthError> {
        let token = match (&self.auth_token, &self.auth_token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| AuthError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        token.map_or(Ok(Bearer::none()), |t| Bearer::new(&t))
    }
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a
/// token), and the caller's `traceparent` while tracing is on.
#[derive(Clone, Default)]
pub struct Bearer {
    value: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("set", &self.value.is_some())
            .finish()
    }
}

impl Bearer {
    /// Sends `token`.
    pub fn new(token: &str) -> Result<Self, AuthError> {
        if !valid_token(token) {
            return Err(AuthError::Token(
                "a token must be printable ASCII without spaces".into(),
            ));
        }
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| AuthError::Token("not a valid header value".into()))?;
        // Keeps it out of HPACK's dynamic table and out of debug output.
        value.set_sensitive(true);
        Ok(Self { value: Some(value) })
    }

    /// Sends no token.
    pub fn none() -> Self {
        Self::default()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        // Every palaver client goes through here: the one place the trace
        // context leaves with a gRPC call.
        crate::trace_context::inject(req.metadata_mut());
        Ok(req)
    }
}

/// tonic's channel with the caller's [`Bearer`] token: the client type of
/// every palaver gRPC client.
pub type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &[&str] = &["/p.S/Chat"];

    fn policy() -> Policy {
        Policy::new(
            [
                ("c-token".to_owned(), Role::Chat),
                ("a-token".to_owned(), Role::Admin),
            ],
            CHAT,
        )
    }

    #[test]
    fn roles_and_open_paths() {
        let p = policy();
        let code = |path: &str, auth: Option<&str>| {
            p.check(path, auth.map(str::as_bytes)).map_err(|s| s.code())
        };
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(code("/p.S/Chat", None), Err(Unauthenticated));
        assert_eq!(code("/p.S/Chat", Some("Bearer nope")), Err(Unauthenticated));
        assert_eq!(code("/p.S/Chat", Some("c-token")), Err(Unauthenticated));
        assert_eq!(code("/p.S/Chat", Some("Bearer c-token")), Ok(()));
        assert_eq!(
            code("/p.S/Delete", Some("Bearer c-token")),
            Err(PermissionDenied)
        );
        assert_eq!(code("/p.S/Delete", Some("Bearer a-token")), Ok(()));
        assert_eq!(code("/grpc.health.v1.Health/Check", None), Ok(()));
    }

    #[test]
    fn tokens_file_errors_do_not_quote_tokens() {
        let dir = std::env::temp_dir().join(format!("palaver-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, "[tokens]\n\"s3cret-token\" = \"root\"\n").unwrap();
        let err = Policy::load(&path, CHAT).unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::write(&path, "[tokens]\n\"s3cret-token\" = \"admin\"\n").unwrap();
        assert!(Policy::load(&path, CHAT).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
