//! The projects file: which MQTT projects exist and how each one behaves.
//!
//! One TOML file is read by the gateway (which topics to subscribe) and by
//! session-svc (prompts, limits, sampling). palaver embeds a default one
//! ([`DEFAULT_PROJECTS_TOML`]) so the local stack needs no file at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The projects file palaver ships with: `general` and a few examples.
pub const DEFAULT_PROJECTS_TOML: &str = include_str!("../projects.default.toml");

/// Why a projects file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProjectsError {
    #[error("cannot read projects file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid projects file: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid projects file: {0}")]
    Invalid(String),
}

/// Everything one project decides, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectSettings {
    /// System prompt of sessions that have not set their own.
    pub system_prompt: String,
    /// Most history messages sent to the model (system prompt not counted).
    pub max_history_messages: usize,
    /// Rough token budget for history (chars / 4).
    pub max_history_tokens: usize,
    /// Longest accepted user message, in characters.
    pub max_message_chars: usize,
    /// Requests allowed per session within `rate_window`; 0 disables the limit.
    pub rate_limit: u32,
    /// Requests allowed per client (the MQTT clientId) of the project within
    /// `rate_window`, over all its sessions, so that fresh session ids do
    /// not multiply a client's quota; `None`: three times `rate_limit`
    /// (see [`client_rate_limit`](Self::client_rate_limit)); 0 disables it.
    pub client_rate_limit: Option<u32>,
    /// Length of the sliding rate-limit windows.
    pub rate_window: Duration,
    /// Idle time after which a session is forgotten.
    pub session_ttl: Duration,
    /// Default sampling temperature.
    pub temperature: f32,
    /// Default nucleus sampling.
    pub top_p: f32,
    /// Default (and, for clients, maximum) completion length.
    pub max_tokens: u32,
}

impl Default for ProjectSettings {
    /// The old server's defaults, which palaver keeps.
    fn default() -> Self {
        Self {
            system_prompt: "You are a helpful assistant.".into(),
            max_history_messages: 20,
            max_history_tokens: 3000,
            max_message_chars: 8000,
            rate_limit: 20,
            client_rate_limit: None,
            rate_window: Duration::from_secs(60),
            session_ttl: Duration::from_secs(3600),
            temperature: 0.6,
            top_p: 0.9,
            max_tokens: 512,
        }
    }
}

impl ProjectSettings {
    /// Requests one client may send within `rate_window` over all its
    /// sessions (0: no limit). By default three sessions' worth: a client
    /// may keep a few conversations going, but not mint session ids to
    /// multiply its quota; and a project without a session limit has none.
    pub fn client_rate_limit(&self) -> u32 {
        self.client_rate_limit
            .unwrap_or(self.rate_limit.saturating_mul(3))
    }
}

/// Per-project values as written in the file; `None` inherits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    system_prompt: Option<String>,
    max_history_messages: Option<usize>,
    max_history_tokens: Option<usize>,
    max_message_chars: Option<usize>,
    rate_limit: Option<u32>,
    client_rate_limit: Option<u32>,
    rate_window_secs: Option<u64>,
    session_ttl_secs: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Overrides,
    #[serde(default)]
    projects: BTreeMap<String, Overrides>,
}

impl Overrides {
    fn apply(&self, base: &ProjectSettings) -> ProjectSettings {
        ProjectSettings {
            system_prompt: self
                .system_prompt
                .clone()
                .unwrap_or_else(|| base.system_prompt.clone()),
            max_history_messages: self
                .max_history_messages
                .unwrap_or(base.max_history_messages),
            max_history_tokens: self.max_history_tokens.unwrap_or(base.max_history_tokens),
            max_message_chars: self.max_message_chars.unwrap_or(base.max_message_chars),
            rate_limit: self.rate_limit.unwrap_or(base.rate_limit),
            client_rate_limit: self.client_rate_limit.or(base.client_rate_limit),
            rate_window: self
                .rate_window_secs
                .map(Duration::from_secs)
                .unwrap_or(base.rate_window),
            session_ttl: self
                .session_ttl_secs
                .map(Duration::from_secs)
                .unwrap_or(base.session_ttl),
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            max_tokens: self.max_tokens.unwrap_or(base.max_tokens),
        }
    }
}

/// The parsed projects file.
#[derive(Debug, Clone)]
pub struct Projects {
    projects: BTreeMap<String, ProjectSettings>,
}

impl Projects {
    /// Parses a projects file's text.
    pub fn from_toml(text: &str) -> Result<Self, ProjectsError> {
        let file: File = toml::from_str(text)?;
        let defaults = file.defaults.apply(&ProjectSettings::default());
        let mut projects = BTreeMap::new();
        for (name, o) in &file.projects {
            validate_name(name)?;
            let s = o.apply(&defaults);
            validate(name, &s)?;
            projects.insert(name.clone(), s);
        }
        if projects.is_empty() {
            return Err(ProjectsError::Invalid(
                "no [projects.<name>] table: at least one project is needed".into(),
            ));
        }
        Ok(Self { projects })
    }

    /// Reads `path`, or the embedded default file when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ProjectsError> {
        match path {
            None => Self::from_toml(DEFAULT_PROJECTS_TOML),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ProjectsError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::from_toml(&text)
            }
        }
    }

    /// The embedded default projects.
    pub fn builtin() -> Self {
        Self::from_toml(DEFAULT_PROJECTS_TOML).expect("embedded projects file is valid")
    }

    /// Settings of `project`, if it is configured.
    pub fn get(&self, project: &str) -> Option<&ProjectSettings> {
        self.projects.get(project)
    }

    /// Project names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.projects.keys().map(String::as_str)
    }

    /// Sets the per-client limit of every project whose file does not set
    /// `client_rate_limit` (a service-wide default, e.g. from a flag).
    pub fn default_client_rate_limit(&mut self, limit: u32) {
        for s in self.projects.values_mut() {
            s.client_rate_limit.get_or_insert(limit);
        }
    }

    /// Replaces or adds one project (used by tests and tools).
    pub fn insert(&mut self, name: impl Into<String>, settings: ProjectSettings) {
        self.projects.insert(name.into(), settings);
    }
}

/// A project name is one MQTT topic level: no wildcards, no separators.
fn validate_name(name: &str) -> Result<(), ProjectsError> {
    let bad = name.is_empty()
        || name.starts_with('$')
        || name.chars().any(|c| matches!(c, '/' | '+' | '#' | '\0'))
        || name.trim() != name;
    if bad {
        return Err(ProjectsError::Invalid(format!(
            "project name {name:?} cannot be an MQTT topic level"
        )));
    }
    Ok(())
}

/// Longest session TTL and rate window: a month is far past any chat's
/// idle time, and keeps every deadline computed from them representable.
const MAX_PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);

fn validate(name: &str, s: &ProjectSettings) -> Result<(), ProjectsError> {
    let fail = |what: &str| Err(ProjectsError::Invalid(format!("project {name}: {what}")));
    if !(0.0..=2.0).contains(&s.temperature) {
        return fail("temperature must be within 0..=2");
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return fail("top_p must be within (0, 1]");
    }
    if s.max_tokens == 0 {
        return fail("max_tokens must be at least 1");
    }
    if s.max_message_chars == 0 {
        return fail("max_message_chars must be at least 1");
    }
    if s.session_ttl.is_zero() || s.rate_window.is_zero() {
        return fail("session_ttl_secs and rate_window_secs must be at least 1");
    }
    if s.session_ttl > MAX_PERIOD || s.rate_window > MAX_PERIOD {
        return fail("session_ttl_secs and rate_window_secs must be at most 2592000 (30 days)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_file_parses_and_inherits_defaults() {
        let p = Projects::builtin();
        let general = p.get("general").unwrap();
        assert_eq!(general.rate_limit, 20);
        assert_eq!(general.max_history_messages, 20);
        assert_eq!(general.session_ttl, Duration::from_secs(3600));
        let npc = p.get("npc").unwrap();
        assert_eq!(npc.max_tokens, 160);
        assert_ne!(npc.system_prompt, general.system_prompt);
        assert!(p.get("nope").is_none());
    }

    #[test]
    fn the_client_limit_follows_the_session_limit_unless_set() {
        let p = Projects::from_toml(
            "[defaults]\nrate_limit = 10\n[projects.a]\n[projects.off]\nrate_limit = 0\n\
             [projects.own]\nclient_rate_limit = 7\n[projects.none]\nclient_rate_limit = 0\n",
        )
        .unwrap();
        let limit = |name: &str| p.get(name).unwrap().client_rate_limit();
        assert_eq!(limit("a"), 30);
        assert_eq!(limit("off"), 0, "no session limit, no client limit");
        assert_eq!(limit("own"), 7);
        assert_eq!(limit("none"), 0);
        assert_eq!(
            Projects::builtin()
                .get("general")
                .unwrap()
                .client_rate_limit(),
            60
        );
    }

    #[test]
    fn refuses_bad_files() {
        for bad in [
            "",
            "[projects.\"a/b\"]",
            "[projects.x]\ntemperature = 3.0",
            "[projects.x]\ntop_p = 0.0",
            "[projects.x]\nunknown_key = 1",
            "[projects.x]\nsession_ttl_secs = 18446744073709551615",
            "[projects.x]\nrate_window_secs = 2592001",
        ] {
            assert!(Projects::from_toml(bad).is_err(), "accepted {bad:?}");
        }
    }
}
