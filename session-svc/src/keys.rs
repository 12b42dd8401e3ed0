//! Redis key names.
//!
//! Every key of one session carries the same hash tag, `{s:<project>:<session>}`,
//! so the per-session scripts touch a single slot and the design works on
//! Redis Cluster. Project and session ids are client strings: they are
//! percent-encoded so that no id can close the tag early (`}`), fake a
//! separator (`:`) or collide with another id.

use std::fmt::Write;

/// The keys of one session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKeys {
    /// The dialog, JSON.
    pub dialog: String,
    /// The short lock taken while the dialog changes.
    pub lock: String,
    /// Timestamps of recent requests, for the sliding-window rate limit.
    pub rate: String,
}

/// The keys of one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectKeys {
    /// The project's default system prompt, set over MQTT or gRPC.
    pub prompt: String,
    /// Ids of the project's live sessions, for project-wide clear/delete: a
    /// sorted set scored by when each id's entry expires (Unix ms).
    pub sessions: String,
}

/// Builds key names under one prefix (default `palaver`).
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn session(&self, project: &str, session_id: &str) -> SessionKeys {
        let tag = format!(
            "{}:{{s:{}:{}}}",
            self.prefix,
            encode(project),
            encode(session_id)
        );
        SessionKeys {
            dialog: format!("{tag}:dialog"),
            lock: format!("{tag}:lock"),
            rate: format!("{tag}:rate"),
        }
    }

    /// The sliding rate-limit window of one client of a project. Its own
    /// hash tag: a client spans many sessions, so on Redis Cluster it lives
    /// in another slot than any one session's keys.
    pub fn client_rate(&self, project: &str, client: &str) -> String {
        format!(
            "{}:{{c:{}:{}}}:rate",
            self.prefix,
            encode(project),
            encode(client)
        )
    }

    /// The heartbeat of one session-svc process: while it exists, the turns
    /// that process owns are being worked on.
    pub fn replica(&self, replica: &str) -> String {
        format!("{}:replica:{}", self.prefix, encode(replica))
    }

    /// A lease's holder and its epoch counter, under one hash tag.
    pub fn lease(&self, name: &str) -> (String, String) {
        let tag = format!("{}:{{lease:{}}}", self.prefix, encode(name));
        (format!("{tag}:holder"), format!("{tag}:epoch"))
    }

    pub fn project(&self, project: &str) -> ProjectKeys {
        let tag = format!("{}:{{p:{}}}", self.prefix, encode(project));
        ProjectKeys {
            prompt: format!("{tag}:prompt"),
            // Not `:sessions`: that name held a plain set, whose entries
            // never expired one by one.
            sessions: format!("{tag}:active"),
        }
    }
}

impl Default for KeySpace {
    fn default() -> Self {
        Self::new("palaver")
    }
}

/// Percent-encodes every byte outside `[A-Za-z0-9._~-]`: injective, and the
/// result never contains `{`, `}` or `:`.
pub fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster would use: the text between the first `{`
    /// and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + key[open..].find('}').unwrap();
        &key[open + 1..close]
    }

    #[test]
    fn all_keys_of_a_session_share_one_tag() {
        let ks = KeySpace::default();
        for sid in ["s1", "a}b{c", "x:y", "", "ünï", "%41"] {
            let k = ks.session("general", sid);
            let tag = hash_tag(&k.dialog);
            assert_eq!(hash_tag(&k.lock), tag);
            assert_eq!(hash_tag(&k.rate), tag);
            assert!(!tag.contains('}'));
        }
    }

    #[test]
    fn a_clients_window_is_apart_from_sessions_and_other_projects() {
        let ks = KeySpace::default();
        let c = ks.client_rate("general", "game-2");
        assert_eq!(hash_tag(&c), "c:general:game-2");
        assert_ne!(c, ks.client_rate("general:game", "2"));
        assert_ne!(c, ks.client_rate("other", "game-2"));
        assert_ne!(hash_tag(&ks.client_rate("a}", "b")), "c:a");
    }

    #[test]
    fn ids_cannot_collide() {
        let ks = KeySpace::default();
        let pairs = [
            (("a", "b:c"), ("a:b", "c")),
            (("p", "%41"), ("p", "A")),
            (("p", "a}"), ("p", "a%7D")),
        ];
        for ((p1, s1), (p2, s2)) in pairs {
            assert_ne!(ks.session(p1, s1), ks.session(p2, s2));
        }
        assert_eq!(encode("a}b"), "a%7Db");
    }
}
