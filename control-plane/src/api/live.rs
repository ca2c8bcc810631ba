//! Live-follow streams (a deployment's log, a rollout's progress) as server-sent events.
//!
//! Each open stream holds a slot: at most [`PER_USER`] per user (API keys count against the
//! user who made them) and `--max-live-streams` per replica, so one tenant cannot hold every
//! connection of a replica. A stream sleeps until PostgreSQL says its deployment or rollout
//! changed (triggers `NOTIFY sensei_live`, whichever replica wrote the row), and sends a
//! keep-alive comment when it has been quiet for a while, which also re-reads the row in
//! case a notification was missed while the listening connection was being re-opened.
//! Every event carries an `id`; a client that reconnects with `Last-Event-ID` gets only what
//! it has not seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::error::{ApiError, ErrorCode};

/// Streams one user may hold open at once.
pub const PER_USER: usize = 8;
/// Streams one account's users may hold open together (so that an account with many
/// members cannot take a replica's every slot).
pub const PER_ACCOUNT: usize = 64;
/// Streams one replica holds open at most, when the operator does not say.
pub const DEFAULT_PER_REPLICA: usize = 512;
/// Quiet this long, a stream sends a keep-alive comment (proxies close idle connections).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The PostgreSQL channel the triggers of migration V12 notify: `d<deployment id>` or
/// `r<rollout id>`; and the control plane itself, `s<account id>`, when agents of that
/// account connect or disconnect ([`crate::runners::agent::presence::ANNOUNCE_SQL`]).
pub const CHANNEL: &str = crate::store::db::LIVE_CHANNEL;
/// How long a presence stream lasts before it ends (the browser's `EventSource` opens a new
/// one, authenticated again): no stream outlives its purpose by hours.
pub const DEFAULT_PRESENCE_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// What a stream follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Followed {
    Deployment(Uuid),
    Rollout(Uuid),
    /// The presence (connected, last seen) of an account's agents.
    Presence(Uuid),
}

impl Followed {
    /// The subject a `NOTIFY` payload names.
    pub fn parse(payload: &str) -> Option<Self> {
        let (kind, id) = payload.split_at_checked(1)?;
        let id = id.parse().ok()?;
        match kind {
            "d" => Some(Self::Deployment(id)),
            "r" => Some(Self::Rollout(id)),
            "s" => Some(Self::Presence(id)),
            _ => None,
        }
    }
}

/// This replica's open streams and who waits for which change.
pub struct LiveStreams {
    per_user: usize,
    per_replica: usize,
    keep_alive: Duration,
    presence_lifetime: Duration,
    open: Mutex<Open>,
    changes: Mutex<HashMap<Followed, watch::Sender<u64>>>,
    /// Some rollout (any, on any replica) changed: what wakes an idle rollout scheduler.
    rollout_activity: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_user: HashMap<Uuid, usize>,
    by_account: HashMap<Uuid, usize>,
}

fn give_back(counts: &mut HashMap<Uuid, usize>, key: Uuid) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// An open stream's place; given back when the stream ends (or its client goes away).
pub struct StreamSlot {
    streams: Arc<LiveStreams>,
    user: Uuid,
    account: Uuid,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        give_back(&mut open.by_user, self.user);
        give_back(&mut open.by_account, self.account);
    }
}

impl LiveStreams {
    pub fn new(per_replica: usize, keep_alive: Duration) -> Arc<Self> {
        Self::with_presence_lifetime(per_replica, keep_alive, DEFAULT_PRESENCE_LIFETIME)
    }

    /// [`LiveStreams::new`], with presence streams lasting `presence_lifetime`.
    pub fn with_presence_lifetime(
        per_replica: usize,
        keep_alive: Duration,
        presence_lifetime: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            per_user: PER_USER,
            per_replica: per_replica.max(1),
            keep_alive,
            presence_lifetime,
            open: Mutex::default(),
            changes: Mutex::default(),
            rollout_activity: Arc::default(),
        })
    }

    /// How long a presence stream lasts.
    pub fn presence_lifetime(&self) -> Duration {
        self.presence_lifetime
    }

    /// How long a stream stays quiet before its keep-alive.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Takes a slot for `user` of `account`, or refuses when they, their account or this
    /// replica hold the most allowed.
    pub fn open(self: &Arc<Self>, account: Uuid, user: Uuid) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.by_user.get(&user).copied().unwrap_or(0);
        if mine >= self.per_user {
            return Err(ApiError::too_many_of(
                ErrorCode::TooManyStreams,
                format!("you have {mine} live streams open, the most allowed; close one first"),
                5,
            ));
        }
        if open.by_account.get(&account).copied().unwrap_or(0) >= PER_ACCOUNT {
            return Err(ApiError::too_many_of(
                ErrorCode::TooManyStreams,
                format!("your account has {PER_ACCOUNT} live streams open, the most allowed"),
                5,
            ));
        }
        if open.total >= self.per_replica {
            return Err(ApiError::too_many_of(
                ErrorCode::TooManyStreams,
                "this replica is serving as many live streams as it may; try again shortly",
                5,
            ));
        }
        open.total += 1;
        *open.by_user.entry(user).or_default() += 1;
        *open.by_account.entry(account).or_default() += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            user,
            account,
        })
    }

    /// Streams open on this replica.
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// A receiver that sees every change of `subject` from now on.
    pub fn subscribe(&self, subject: Followed) -> watch::Receiver<u64> {
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        // Forget subjects nobody follows any more, now and then rather than on every drop.
        if changes.len() > 64 && changes.len() > 2 * self.open_count() {
            changes.retain(|_, tx| tx.receiver_count() > 0);
        }
        changes
            .entry(subject)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Notified at each change of any rollout (a permit is kept if nobody waits): a rollout
    /// was created, approved, resumed, aborted or rolled back. The rollout scheduler waits on
    /// it when idle.
    pub fn rollout_activity(&self) -> Arc<tokio::sync::Notify> {
        self.rollout_activity.clone()
    }

    /// `subject` changed: wake its streams.
    pub fn changed(&self, subject: Followed) {
        if let Followed::Rollout(_) = subject {
            // Kept for the next wait if the scheduler is busy right now.
            self.rollout_activity.notify_one();
        }
        let changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = changes.get(&subject) {
            tx.send_modify(|v| *v += 1);
        }
    }

    /// Everything may have changed (notifications were missed): wake every stream.
    pub fn changed_all(&self) {
        self.rollout_activity.notify_one();
        let changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        for tx in changes.values() {
            tx.send_modify(|v| *v += 1);
        }
    }
}

/// Waits until the subject changes or the keep-alive is due; `true` when it changed.
pub async fn wait_for_change(changes: &mut watch::Receiver<u64>, keep_alive: Duration) -> bool {
    matches!(
        tokio::time::timeout(keep_alive, changes.changed()).await,
        Ok(Ok(()))
    )
}

/// Who opened a stream, kept to ask again at each keep-alive: a member removed, a session
/// signed out or a key revoked stops following at once, not when the deployment ends.
pub struct Follower {
    headers: http::HeaderMap,
    ip: std::net::IpAddr,
    account: Uuid,
    scope: crate::identity::auth::Scope,
    /// The resources the follower reached when the stream opened: a narrower reach since
    /// ends the stream (what it follows may be outside it now).
    reach: crate::identity::reach::Reach,
}

impl Follower {
    pub fn new(
        request: &http::HeaderMap,
        ip: std::net::IpAddr,
        principal: &crate::identity::auth::Principal,
        scope: crate::identity::auth::Scope,
    ) -> Self {
        let mut headers = http::HeaderMap::new();
        for name in [http::header::COOKIE, http::header::AUTHORIZATION] {
            for value in request.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Self {
            headers,
            ip,
            account: principal.account_id,
            scope,
            reach: principal.reach.clone(),
        }
    }

    /// Whether the credentials that opened the stream would still open it.
    pub async fn still_allowed(&self, pool: &deadpool_postgres::Pool) -> bool {
        match crate::identity::auth::authenticate(pool, &self.headers, self.ip).await {
            Ok(p) => {
                p.account_id == self.account
                    && p.allows(self.scope)
                    && !p.mfa_setup_required
                    && p.reach == self.reach
            }
            Err(_) => false,
        }
    }
}

/// The response that carries a stream of events.
pub fn event_stream<S>(events: S) -> Result<axum::response::Response, ApiError>
where
    S: futures_util::Stream<Item = Result<String, std::io::Error>> + Send + 'static,
{
    axum::response::Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from_stream(events))
        .map_err(|_| ApiError::internal("building response"))
}

/// The comment a quiet stream sends.
pub const KEEP_ALIVE_COMMENT: &str = ": keep-alive\n\n";

/// The `Last-Event-ID` a reconnecting client sent.
pub fn last_event_id(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// Listens on [`CHANNEL`] until `shutdown`, reconnecting when the connection drops (and
/// waking every stream then, since changes may have gone unannounced).
pub async fn listen(
    database_url: String,
    streams: Arc<LiveStreams>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    crate::store::db::listen_until_shutdown(
        &database_url,
        &[CHANNEL],
        "live follow",
        shutdown,
        || {
            streams.changed_all();
            std::future::ready(())
        },
        |_, payload| match Followed::parse(payload) {
            Some(subject) => streams.changed(subject),
            None => tracing::warn!(payload, "unknown live notification"),
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_user_and_per_replica_and_given_back() {
        let streams = LiveStreams::new(10, DEFAULT_KEEP_ALIVE);
        let (acme, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let held: Vec<_> = (0..PER_USER)
            .map(|_| streams.open(acme, ada).expect("slot"))
            .collect();
        assert_eq!(
            streams.open(acme, ada).err().map(|e| e.code()),
            Some("too_many_streams")
        );
        let bobs: Vec<_> = (0..2)
            .map(|_| streams.open(other, bob).expect("slot"))
            .collect();
        assert_eq!(
            streams.open(other, Uuid::new_v4()).err().map(|e| e.code()),
            Some("too_many_streams"),
            "the replica is full"
        );
        drop(held);
        assert_eq!(streams.open_count(), 2);
        streams
            .open(acme, ada)
            .expect("a slot given back is free again");
        drop(bobs);
    }

    #[test]
    fn one_account_cannot_take_more_than_its_share() {
        let streams = LiveStreams::new(1000, DEFAULT_KEEP_ALIVE);
        let acme = Uuid::new_v4();
        let held: Vec<_> = (0..PER_ACCOUNT)
            .map(|i| {
                streams
                    .open(acme, Uuid::from_u128(i as u128 / PER_USER as u128))
                    .expect("slot")
            })
            .collect();
        assert_eq!(
            streams.open(acme, Uuid::new_v4()).err().map(|e| e.code()),
            Some("too_many_streams"),
            "a fresh member of the same account"
        );
        streams
            .open(Uuid::new_v4(), Uuid::new_v4())
            .expect("another account still gets a slot");
        drop(held);
    }

    #[tokio::test]
    async fn a_change_wakes_its_followers_and_no_other() {
        let streams = LiveStreams::new(10, Duration::from_millis(20));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut on_a = streams.subscribe(Followed::Deployment(a));
        let mut on_b = streams.subscribe(Followed::Rollout(b));
        // A change before the wait is not lost.
        streams.changed(Followed::Deployment(a));
        assert!(wait_for_change(&mut on_a, Duration::from_secs(5)).await);
        assert!(!wait_for_change(&mut on_b, Duration::from_millis(20)).await);
        streams.changed_all();
        assert!(wait_for_change(&mut on_b, Duration::from_secs(5)).await);
    }

    #[test]
    fn notification_payloads_parse() {
        let id = Uuid::new_v4();
        assert_eq!(
            Followed::parse(&format!("d{id}")),
            Some(Followed::Deployment(id))
        );
        assert_eq!(
            Followed::parse(&format!("r{id}")),
            Some(Followed::Rollout(id))
        );
        assert_eq!(
            Followed::parse(&format!("s{id}")),
            Some(Followed::Presence(id))
        );
        for garbage in ["", "d", "x", &format!("x{id}"), "dnot-a-uuid", "é"] {
            assert_eq!(Followed::parse(garbage), None, "{garbage}");
        }
    }
}
