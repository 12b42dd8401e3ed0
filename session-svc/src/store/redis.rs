//! The Redis store: each step is one Lua script, so a step is one round trip
//! and atomic. A turn's steps are a compare-and-set of the dialog (rules
//! applied here, in Rust), so no lock is held across a round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Lease, LockAttempt, Quota, RateLimit, SessionId, Step, Store, StoreError};
use crate::dialog::{Dialog, Ending, Opened, Opening};
use crate::keys::KeySpace;

/// A one-step change: unless a two-step change holds the lock,
/// compare-and-set of the whole dialog, with the rate check of a new turn.
///
/// The new dialog was computed from `ARGV[4]` (`''`: no dialog) by the rules
/// of `dialog.rs`, in session-svc; it is written only if that is still what
/// is stored. Interned Lua strings make the comparison cheap, so the session
/// is held for a few microseconds, whatever the round trip costs.
///
/// The rate window is kept as a sorted set of request times (the server's
/// clock, so replicas with skewed clocks enforce one limit). It is counted
/// only by a swap that goes through: a busy or lost attempt, retried,
/// counts once. A limited request changes nothing.
///
/// Replies: `{0}` limited, `{1}` busy, `{2, µs held}` written,
/// `{3, current dialog or ''}` someone else changed it first.
const SWAP: &str = r"
local t0 = redis.call('TIME')
if redis.call('EXISTS', KEYS[2]) == 1 then return {1} end
local current = redis.call('GET', KEYS[3]) or ''
if current ~= ARGV[4] then return {3, current} end
if tonumber(ARGV[1]) > 0 then
  local now = tonumber(t0[1]) * 1000 + math.floor(tonumber(t0[2]) / 1000)
  local window = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return {0}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
end
if ARGV[5] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
local t1 = redis.call('TIME')
return {2, (tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2])}
";

/// Counts a request in a client's window (`KEYS[1]`) unless it holds
/// `ARGV[1]` requests already: `ARGV[2]` the window in ms, `ARGV[3]` a
/// member unique to the request. Replies 1 counted, 0 limited.
///
/// A step of its own, before the swap: a client spans sessions, so its key
/// has its own hash tag, and on Redis Cluster a script may only touch keys
/// of one slot. A swap that then does not go through (limited per session,
/// busy, changed) takes the count back with `ZREM`, so what stays counted is
/// what the swap counted, as in the memory store.
const CLIENT_RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 1
";

/// Lock, then read — one round trip.
const TRY_LOCK: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1}
end
local d = redis.call('GET', KEYS[2])
if d then return {2, d} end
return {2}
";

/// Write (or delete) the dialog and release the lock, only for the holder.
const COMMIT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
redis.call('DEL', KEYS[1])
return 1
";

/// Compare-and-delete: release only our own lock.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Take, renew or release a lease: `KEYS[1]` its holder, `KEYS[2]` its
/// epoch; `ARGV[1]` the asking holder, `ARGV[2]` the TTL in ms (0: release).
/// Replies `{held (0/1), epoch, current holder or ''}`.
const LEASE: &str = r"
local current = redis.call('GET', KEYS[1])
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] == '0' then
  if current == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return {0, epoch, ''}
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, redis.call('INCR', KEYS[2]), ARGV[1]}
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, epoch, current}
end
return {0, epoch, current}
";

/// Dialogs in Redis.
#[derive(Clone)]
pub struct RedisStore {
    /// Reconnects by itself; cloning shares one multiplexed connection.
    conn: ConnectionManager,
    keys: KeySpace,
    /// The dialog this process last read or wrote, per session: the
    /// expected value of the next compare-and-set, so a one-step change is
    /// one round trip. A stale entry costs one more (the swap answers with
    /// what is stored); it is never trusted without the swap.
    seen: Arc<Mutex<Seen>>,
    swap: Script,
    client_rate: Script,
    try_lock: Script,
    commit: Script,
    release: Script,
    lease: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) and checks the server answers.
    pub async fn connect(url: &str, keys: KeySpace) -> Result<Self, StoreError> {
        Self::connect_tls(url, keys, None).await
    }

    /// As [`connect`](Self::connect); a `rediss://` url trusts the CA
    /// certificates (PEM) in `ca_file`, else the system's roots.
    pub async fn connect_tls(
        url: &str,
        keys: KeySpace,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, StoreError> {
        palaver_core::tls::install_provider();
        let client = match ca_file {
            Some(path) if url.starts_with("rediss://") => {
                let root_cert = palaver_core::tls::read_certs_pem(path)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(url, certs).map_err(unavailable)?
            }
            Some(_) => {
                return Err(StoreError::Unavailable(
                    "--redis-ca-file is given but the url is not rediss://".into(),
                ))
            }
            None => redis::Client::open(url).map_err(unavailable)?,
        };
        let conn = ConnectionManager::new(client).await.map_err(unavailable)?;
        Ok(Self {
            conn,
            keys,
            seen: Arc::default(),
            swap: Script::new(SWAP),
            client_rate: Script::new(CLIENT_RATE),
            try_lock: Script::new(TRY_LOCK),
            commit: Script::new(COMMIT),
            release: Script::new(RELEASE),
            lease: Script::new(LEASE),
        })
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// This process's clock in Unix milliseconds, for the index's expiry scores.
/// Replicas' clocks differ by milliseconds; the scores are an hour apart.
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_dialog(bytes: &[u8]) -> Result<Dialog, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected reply to the {what} script"))
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

fn micros(v: Option<&Value>) -> Option<Duration> {
    int(v).map(|us| Duration::from_micros(us.max(0) as u64))
}

fn parse_lock_attempt(v: Value) -> Result<LockAttempt, StoreError> {
    let bad = || corrupt("lock");
    let Value::Array(items) = v else {
        return Err(bad());
    };
    match (int(items.first()), items.get(1)) {
        (Some(1), _) => Ok(LockAttempt::Busy),
        (Some(2), None) => Ok(LockAttempt::Locked(None)),
        (Some(2), Some(Value::BulkString(b))) => Ok(LockAttempt::Locked(Some(parse_dialog(b)?))),
        _ => Err(bad()),
    }
}

/// What the swap script answered.
enum Swapped {
    RateLimited,
    Busy,
    Written {
        held: Duration,
    },
    /// The stored dialog (empty: none) was not the expected one.
    Changed(Vec<u8>),
}

fn parse_swap(v: Value) -> Result<Swapped, StoreError> {
    let bad = || corrupt("swap");
    let Value::Array(mut items) = v else {
        return Err(bad());
    };
    match int(items.first()) {
        Some(0) => Ok(Swapped::RateLimited),
        Some(1) => Ok(Swapped::Busy),
        Some(2) => Ok(Swapped::Written {
            held: micros(items.get(1)).ok_or_else(bad)?,
        }),
        Some(3) => match items.swap_remove(1) {
            Value::BulkString(b) => Ok(Swapped::Changed(b)),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// A dialog as this process last saw it in Redis.
#[derive(Debug, PartialEq)]
struct Known {
    /// The stored JSON (empty: no dialog): what the next swap expects.
    raw: Vec<u8>,
    /// The same, parsed. A phase starts from a copy of it rather than
    /// parsing `raw` again: a copy is a few allocations, the parse was a
    /// large share of session-svc's work per turn.
    dialog: Option<Dialog>,
}

impl Known {
    fn parse(raw: Vec<u8>) -> Result<Self, StoreError> {
        let dialog = parse_stored(&raw)?;
        Ok(Self { raw, dialog })
    }

    /// Bytes held, roughly: the JSON, and about as much again parsed (the
    /// same text, less the syntax, plus the strings' headers).
    fn size(&self) -> usize {
        2 * self.raw.len()
    }
}

/// Dialogs as last seen by this process, by dialog key. Bounded in bytes:
/// past [`SEEN_BYTES`] arbitrary entries go, which costs each of their
/// sessions one extra round trip at most.
///
/// Entries are shared, not copied: a change takes its expected value from
/// here without copying the JSON.
#[derive(Default)]
struct Seen {
    dialogs: HashMap<String, Arc<Known>>,
    /// Keys and dialogs held, in bytes ([`Known::size`]).
    bytes: usize,
}

/// Memory for [`Seen`]: a thousand or more typical dialogs (a few KiB
/// each), and still a hundred of the largest (a full history of long
/// messages, tens of KiB), within the services' memory budget.
const SEEN_BYTES: usize = 8 << 20;

impl Seen {
    fn get(&self, key: &str) -> Option<Arc<Known>> {
        self.dialogs.get(key).cloned()
    }

    /// Keeps `known` as the dialog last seen at `key`. The key is taken by
    /// value: the caller built it for the script it just ran, so keeping it
    /// costs no copy.
    fn put(&mut self, key: String, known: Arc<Known>) {
        if let Some(old) = self.dialogs.remove(&key) {
            self.bytes -= key.len() + old.size();
        }
        let size = key.len() + known.size();
        if size > SEEN_BYTES {
            return;
        }
        while self.bytes + size > SEEN_BYTES {
            let Some(victim) = self.dialogs.keys().next().cloned() else {
                break;
            };
            if let Some(v) = self.dialogs.remove(&victim) {
                self.bytes -= victim.len() + v.size();
            }
        }
        self.bytes += size;
        self.dialogs.insert(key, known);
    }
}

fn parse_stored(raw: &[u8]) -> Result<Option<Dialog>, StoreError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        parse_dialog(raw).map(Some)
    }
}

fn to_json(dialog: Option<&Dialog>) -> Result<Vec<u8>, StoreError> {
    dialog.map_or(Ok(Vec::new()), |d| {
        serde_json::to_vec(d).map_err(|e| StoreError::Corrupt(e.to_string()))
    })
}

impl RedisStore {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A cache: a panic elsewhere cannot leave it wrong, only stale.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt at a one-step change: applies `f` to the dialog as last
    /// seen (read first if unknown) and swaps the result in. `quota` gets the
    /// dialog `f` starts from and says which limits, if any, to count. When
    /// the stored dialog turns out to be another one, it is kept as the
    /// next attempt's starting point and the answer is [`Step::Changed`]:
    /// the turn engine retries with backoff up to its deadline.
    async fn change<'q, R>(
        &self,
        id: SessionId<'_>,
        quota: impl FnOnce(Option<&Dialog>) -> Quota<'q>,
        ttl: Duration,
        f: impl FnOnce(&mut Option<Dialog>) -> R,
    ) -> Result<Step<R>, StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let known = self.seen().get(&k.dialog);
        let expected = match known {
            Some(raw) => raw,
            None => {
                let raw: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&k.dialog)
                    .query_async(&mut self.conn.clone())
                    .await
                    .map_err(unavailable)?;
                Arc::new(Known::parse(raw.unwrap_or_default())?)
            }
        };
        let quota = quota(expected.dialog.as_ref());
        let (limit, window) = quota
            .session
            .map_or((0, 1), |r| (r.limit, millis(r.window)));
        let client = match quota.client.filter(|(_, rate)| rate.limit > 0) {
            Some((client, rate)) => match self.count_client(id.project, client, rate).await? {
                Some(counted) => Some(counted),
                None => return Ok(Step::RateLimited),
            },
            None => None,
        };
        let mut dialog = expected.dialog.clone();
        let value = f(&mut dialog);
        let new = to_json(dialog.as_ref())?;
        let member: u64 = rand::random();
        let swapped = self
            .swap
            .key(&k.rate)
            .key(&k.lock)
            .key(&k.dialog)
            .arg(limit)
            .arg(window)
            .arg(format!("{member:016x}"))
            .arg(expected.raw.as_slice())
            .arg(&new)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
            .and_then(parse_swap);
        if !matches!(swapped, Ok(Swapped::Written { .. })) {
            if let Some((key, member)) = client {
                self.uncount_client(key, member).await;
            }
        }
        match swapped? {
            Swapped::RateLimited => Ok(Step::RateLimited),
            Swapped::Busy => Ok(Step::Busy),
            Swapped::Written { held } => {
                let known = Known { raw: new, dialog };
                self.seen().put(k.dialog, Arc::new(known));
                Ok(Step::Done { value, held })
            }
            Swapped::Changed(current) => {
                let known = Known::parse(current)?;
                self.seen().put(k.dialog, Arc::new(known));
                Ok(Step::Changed)
            }
        }
    }

    /// Counts a request in `client`'s window of `project`: its key and
    /// member, to take it back by, or `None` when the client is over `rate`.
    async fn count_client(
        &self,
        project: &str,
        client: &str,
        rate: RateLimit,
    ) -> Result<Option<(String, String)>, StoreError> {
        let key = self.keys.client_rate(project, client);
        let member = format!("{:016x}", rand::random::<u64>());
        let counted: i64 = self
            .client_rate
            .key(&key)
            .arg(rate.limit)
            .arg(millis(rate.window))
            .arg(&member)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok((counted == 1).then_some((key, member)))
    }

    /// Takes back a count whose turn did not open. Best effort: left
    /// counted, it only errs towards the limit, for one window.
    async fn uncount_client(&self, key: String, member: String) {
        let removed = redis::cmd("ZREM")
            .arg(&key)
            .arg(&member)
            .query_async::<i64>(&mut self.conn.clone())
            .await;
        if let Err(e) = removed {
            tracing::debug!(error = %e, "a client's rate count was not taken back");
        }
    }
}

impl Store for RedisStore {
    async fn open_turn(
        &self,
        id: SessionId<'_>,
        quota: Quota<'_>,
        opening: &Opening<'_>,
        ttl: Duration,
    ) -> Result<Step<Opened>, StoreError> {
        let counted = |d: Option<&Dialog>| {
            if opening.is_retry_in(d) {
                Quota::default()
            } else {
                quota
            }
        };
        self.change(id, counted, ttl, |d| Dialog::open_in(d, opening))
            .await
    }

    async fn end_turn(
        &self,
        id: SessionId<'_>,
        attempt: &str,
        ending: Ending<'_>,
        ttl: Duration,
    ) -> Result<Step<()>, StoreError> {
        self.change(
            id,
            |_| Quota::default(),
            ttl,
            |d| {
                if let Some(d) = d {
                    d.end(attempt, ending);
                }
            },
        )
        .await
    }

    async fn take_over(
        &self,
        id: SessionId<'_>,
        request_id: &str,
        from: &str,
        to: &str,
        ends_by: u64,
        ttl: Duration,
    ) -> Result<Step<Option<Opened>>, StoreError> {
        self.change(
            id,
            |_| Quota::default(),
            ttl,
            |d| {
                d.as_mut()
                    .and_then(|d| d.take_over(request_id, from, to, ends_by))
            },
        )
        .await
    }

    async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<(), StoreError> {
        redis::cmd("SET")
            .arg(self.keys.replica(replica))
            .arg(1)
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let (holder_key, epoch_key) = self.keys.lease(name);
        let ttl_ms = if ttl.is_zero() { 0 } else { millis(ttl) };
        let (held, epoch, current): (i64, u64, String) = self
            .lease
            .key(holder_key)
            .key(epoch_key)
            .arg(holder)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(Lease {
            held: held == 1,
            epoch,
            holder: (!current.is_empty()).then_some(current),
        })
    }

    async fn alive(&self, replica: &str) -> Result<bool, StoreError> {
        redis::cmd("EXISTS")
            .arg(self.keys.replica(replica))
            .query_async::<bool>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn try_lock(
        &self,
        id: SessionId<'_>,
        token: &str,
        lock_ttl: Duration,
    ) -> Result<LockAttempt, StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let v: Value = self
            .try_lock
            .key(&k.lock)
            .key(&k.dialog)
            .arg(token)
            .arg(millis(lock_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        parse_lock_attempt(v)
    }

    async fn load(&self, id: SessionId<'_>) -> Result<Option<Dialog>, StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&k.dialog)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        raw.map(|b| parse_dialog(&b)).transpose()
    }

    async fn commit(
        &self,
        id: SessionId<'_>,
        token: &str,
        dialog: Option<&Dialog>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let json = to_json(dialog)?;
        let ok: i64 = self
            .commit
            .key(&k.lock)
            .key(&k.dialog)
            .arg(token)
            .arg(&json)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            let known = Known {
                raw: json,
                dialog: dialog.cloned(),
            };
            self.seen().put(k.dialog, Arc::new(known));
        }
        Ok(ok == 1)
    }

    async fn release(&self, id: SessionId<'_>, token: &str) -> Result<(), StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let _: i64 = self
            .release
            .key(&k.lock)
            .arg(token)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn touch_index(&self, id: SessionId<'_>, ttl: Duration) -> Result<(), StoreError> {
        // Each id's entry expires with its session; the ones past their
        // time go on every touch, so the index holds the live sessions only,
        // however many one-message sessions came and went. No expiry on the
        // key itself: one TTL for all would cut short the entries of longer
        // ones, and what an idle project leaves is its last TTL's sessions.
        let k = self.keys.project(id.project);
        let now = unix_millis();
        let _: () = redis::pipe()
            .zadd(&k.sessions, id.session_id, now.saturating_add(millis(ttl)))
            .ignore()
            .zrembyscore(&k.sessions, "-inf", now)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn sessions(&self, project: &str) -> Result<Vec<String>, StoreError> {
        let k = self.keys.project(project);
        // ZRANGEBYSCORE rather than ZRANGE … BYSCORE: Redis before 6.2 too.
        redis::cmd("ZRANGEBYSCORE")
            .arg(&k.sessions)
            .arg(format!("({}", unix_millis()))
            .arg("+inf")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn forget(&self, id: SessionId<'_>) -> Result<(), StoreError> {
        let p = self.keys.project(id.project);
        redis::cmd("ZREM")
            .arg(&p.sessions)
            .arg(id.session_id)
            .query_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn project_prompt(&self, project: &str) -> Result<Option<String>, StoreError> {
        let k = self.keys.project(project);
        redis::cmd("GET")
            .arg(&k.prompt)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn set_project_prompt(&self, project: &str, prompt: &str) -> Result<(), StoreError> {
        let k = self.keys.project(project);
        redis::cmd("SET")
            .arg(&k.prompt)
            .arg(prompt)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::Turn;

    fn known(raw: Vec<u8>) -> Arc<Known> {
        Arc::new(Known { raw, dialog: None })
    }

    fn held(seen: &Seen) -> usize {
        seen.dialogs.iter().map(|(k, v)| k.len() + v.size()).sum()
    }

    #[test]
    fn seen_dialogs_stay_within_their_byte_budget() {
        let mut seen = Seen::default();
        let big = known(vec![b'x'; SEEN_BYTES / 8]);
        for i in 0..10 {
            seen.put(format!("k{i}"), big.clone());
            assert!(seen.bytes <= SEEN_BYTES, "{} bytes after {i}", seen.bytes);
            assert_eq!(seen.get(&format!("k{i}")), Some(big.clone()));
        }
        assert_eq!(held(&seen), seen.bytes);
        // Replacing an entry counts its new size only.
        seen.put("k9".into(), known(b"small".to_vec()));
        assert_eq!(held(&seen), seen.bytes);
        // Something larger than the whole budget is not kept at all.
        seen.put("huge".into(), known(vec![0; SEEN_BYTES]));
        assert_eq!(seen.get("huge"), None);
    }

    #[test]
    fn a_dialog_kept_parsed_is_what_its_json_parses_to() {
        // The cache keeps the dialog it wrote beside the JSON it wrote; the
        // next phase must start from the same dialog a fresh read would give.
        let turn = |seq, request_id: Option<&str>, user: &str, reply: Option<&str>| Turn {
            seq,
            request_id: request_id.map(str::to_owned),
            attempt: reply.is_none().then(|| "replica.1".to_owned()),
            ends_by: reply.is_none().then_some(1_000),
            user: user.to_owned(),
            reply: reply.map(str::to_owned),
        };
        let dialog = Dialog {
            system_prompt: Some("be brief".into()),
            next_seq: 9,
            turns: vec![
                turn(7, Some("r1"), "hello", Some("hi")),
                turn(8, None, "ça va? \"quoted\" ✓", None),
            ],
            failures: Vec::new(),
        };
        let raw = to_json(Some(&dialog)).unwrap();
        assert_eq!(Known::parse(raw).unwrap().dialog, Some(dialog));
        assert_eq!(Known::parse(Vec::new()).unwrap().dialog, None);
        assert!(Known::parse(b"{not json".to_vec()).is_err());
    }
}
