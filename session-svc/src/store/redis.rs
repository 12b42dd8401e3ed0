//! The Redis store: each step is one Lua script, so a step is one round trip
//! and atomic.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::{Admit, RateLimit, SessionId, Store, StoreError};
use crate::dialog::Dialog;
use crate::keys::KeySpace;

/// Rate check, then lock, then read — one round trip.
///
/// The window is kept as a sorted set of request times (the server's clock, so
/// replicas with skewed clocks enforce one limit). A limited request takes no
/// lock and adds no entry.
const ADMIT: &str = r"
if tonumber(ARGV[1]) > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local window = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return {0}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
end
if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then
  return {1}
end
local d = redis.call('GET', KEYS[3])
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

/// Dialogs in Redis.
#[derive(Clone)]
pub struct RedisStore {
    /// Reconnects by itself; cloning shares one multiplexed connection.
    conn: ConnectionManager,
    keys: KeySpace,
    admit: Script,
    commit: Script,
    release: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) and checks the server answers.
    pub async fn connect(url: &str, keys: KeySpace) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let conn = ConnectionManager::new(client).await.map_err(unavailable)?;
        Ok(Self {
            conn,
            keys,
            admit: Script::new(ADMIT),
            commit: Script::new(COMMIT),
            release: Script::new(RELEASE),
        })
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse_dialog(bytes: &[u8]) -> Result<Dialog, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse_admit(v: Value) -> Result<Admit, StoreError> {
    let bad = || StoreError::Corrupt("unexpected reply to the admit script".into());
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let code = match items.first() {
        Some(Value::Int(c)) => *c,
        _ => return Err(bad()),
    };
    match (code, items.get(1)) {
        (0, _) => Ok(Admit::RateLimited),
        (1, _) => Ok(Admit::Busy),
        (2, None) => Ok(Admit::Locked(None)),
        (2, Some(Value::BulkString(b))) => Ok(Admit::Locked(Some(parse_dialog(b)?))),
        _ => Err(bad()),
    }
}

impl Store for RedisStore {
    async fn admit(
        &self,
        id: SessionId<'_>,
        rate: Option<RateLimit>,
        token: &str,
        lock_ttl: Duration,
    ) -> Result<Admit, StoreError> {
        let k = self.keys.session(id.project, id.session_id);
        let (limit, window) = rate.map_or((0, 1), |r| (r.limit, millis(r.window)));
        let member: u64 = rand::random();
        let v: Value = self
            .admit
            .key(&k.rate)
            .key(&k.lock)
            .key(&k.dialog)
            .arg(limit)
            .arg(window)
            .arg(format!("{member:016x}"))
            .arg(token)
            .arg(millis(lock_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        parse_admit(v)
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
        let json = match dialog {
            Some(d) => serde_json::to_string(d).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => String::new(),
        };
        let ok: i64 = self
            .commit
            .key(&k.lock)
            .key(&k.dialog)
            .arg(token)
            .arg(json)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
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
        let k = self.keys.project(id.project);
        let _: () = redis::pipe()
            .sadd(&k.sessions, id.session_id)
            .ignore()
            .pexpire(&k.sessions, millis(ttl) as i64)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn sessions(&self, project: &str) -> Result<Vec<String>, StoreError> {
        let k = self.keys.project(project);
        redis::cmd("SMEMBERS")
            .arg(&k.sessions)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn forget(&self, id: SessionId<'_>) -> Result<(), StoreError> {
        let p = self.keys.project(id.project);
        let s = self.keys.session(id.project, id.session_id);
        // Different hash slots: two commands, not one script.
        let mut c1 = self.conn.clone();
        let mut c2 = self.conn.clone();
        let mut srem = redis::cmd("SREM");
        srem.arg(&p.sessions).arg(id.session_id);
        let mut del = redis::cmd("DEL");
        del.arg(&s.rate);
        let (a, b) = tokio::join!(
            srem.query_async::<i64>(&mut c1),
            del.query_async::<i64>(&mut c2)
        );
        a.map_err(unavailable)?;
        b.map_err(unavailable)?;
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
