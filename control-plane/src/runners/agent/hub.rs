//! The live agent state of one replica: which certificates are valid (consulted during the
//! handshake) and which agents are connected here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::VarInt;
use sensei_certs::{AgentCertStatus, AgentCertificateSet, Fingerprint};
use sensei_shared::protocol::close;
use uuid::Uuid;

use crate::jobs::wake::JobWakes;

/// One open agent connection.
struct Live {
    connection: quinn::Connection,
    fingerprint: Fingerprint,
}

/// Shared by the gateway and the API.
pub struct AgentHub {
    /// This replica's identity in `servers.connected_replica`.
    pub replica_id: Uuid,
    pub certificates: Arc<AgentCertificateSet>,
    live: Mutex<HashMap<Uuid, Live>>,
    /// Who waits for jobs on this replica: agents' polls and the SSH runner.
    pub wakes: JobWakes,
    /// Renewed certificates no agent has connected with yet (as far as this replica heard):
    /// the first session with one retires its predecessor. Kept here so that an ordinary
    /// registration costs no database round trip.
    pending: Mutex<HashSet<Fingerprint>>,
    /// Renewal attempts per server in the current window, for [`AgentHub::admit_renewal`].
    renewals: Mutex<HashMap<Uuid, (Instant, u32)>>,
    /// A CA rotation started or was retired somewhere: reload the CAs
    /// ([`super::authority::follow`]).
    pub ca_changed: tokio::sync::Notify,
    /// A job-key rotation started or was retired somewhere: reload the job-signing keys
    /// ([`super::job_key_rotation::follow`]).
    pub job_key_changed: tokio::sync::Notify,
    /// Reconnects per second a restart spreads the fleet's return over (`f64` bits): set from
    /// the handshake cost measured at start ([`AgentHub::set_handshake_cost`]).
    reconnect_rate: AtomicU64,
    /// Handshakes the gateway did not answer because they came faster than its admission rate.
    handshakes_deferred: AtomicU64,
    /// Handshakes asked to prove their address with a stateless retry (since start).
    handshakes_retried: AtomicU64,
}

/// What a handshake is assumed to cost the server until it has been measured (a slow core;
/// today's x86 cores measure about 0.23 ms).
const UNMEASURED_HANDSHAKE_COST: Duration = Duration::from_micros(500);

/// The reconnect rate for a handshake cost, on the cores this process may run on.
fn rate_for(cost: Duration) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    sensei_shared::backoff::reconnect_rate(cost, cores)
}

/// Renewal attempts a server may make per window before it is refused unread: an agent
/// retries on its own schedule, so more is a broken or hostile client (each attempt costs a
/// signature check, a transaction and an audit row).
pub const RENEWAL_BURST: u32 = 4;

impl AgentHub {
    pub fn new() -> Self {
        Self {
            replica_id: Uuid::new_v4(),
            certificates: Arc::new(AgentCertificateSet::new()),
            live: Mutex::new(HashMap::new()),
            wakes: JobWakes::default(),
            pending: Mutex::new(HashSet::new()),
            renewals: Mutex::new(HashMap::new()),
            ca_changed: tokio::sync::Notify::new(),
            job_key_changed: tokio::sync::Notify::new(),
            reconnect_rate: AtomicU64::new(rate_for(UNMEASURED_HANDSHAKE_COST).to_bits()),
            handshakes_deferred: AtomicU64::new(0),
            handshakes_retried: AtomicU64::new(0),
        }
    }

    /// The rate a restart spreads reconnects at (see [`Self::close_all_for_restart`]).
    pub fn reconnect_rate(&self) -> f64 {
        f64::from_bits(self.reconnect_rate.load(Ordering::Relaxed))
    }

    /// A full handshake was measured to cost the server `cost` of CPU: answers the reconnect
    /// rate that follows for this machine, now in force.
    pub fn set_handshake_cost(&self, cost: Duration) -> f64 {
        let rate = rate_for(cost);
        self.reconnect_rate.store(rate.to_bits(), Ordering::Relaxed);
        rate
    }

    /// The gateway left a handshake unanswered (past its admission rate).
    pub fn handshake_deferred(&self) {
        self.handshakes_deferred.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshakes_deferred(&self) -> u64 {
        self.handshakes_deferred.load(Ordering::Relaxed)
    }

    /// The gateway asked a client to prove its address before admitting it.
    pub fn handshake_retried(&self) {
        self.handshakes_retried.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshakes_retried(&self) -> u64 {
        self.handshakes_retried.load(Ordering::Relaxed)
    }

    /// The sessions' lock. Nothing under it can panic but a bug, and a revocation must never
    /// be skipped because of one: a poisoned lock stops the caller loudly.
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Live>> {
        self.live.lock().expect("agent hub lock poisoned")
    }

    /// Records a new session; an older connection of the same server is closed. Refused when
    /// the certificate is no longer valid for `server_id`: the check and the insert happen
    /// under the lock [`AgentHub::revoke`] holds while it revokes, so a connection that passed
    /// its handshake before a revocation and registers after it is never served.
    pub fn register(
        &self,
        server_id: Uuid,
        connection: quinn::Connection,
        fingerprint: Fingerprint,
    ) -> Result<(), AgentCertStatus> {
        let old = {
            let mut live = self.live();
            match self.certificates.status(&fingerprint) {
                AgentCertStatus::Valid(id) if id == server_id => {}
                AgentCertStatus::Valid(_) => return Err(AgentCertStatus::Unknown),
                other => return Err(other),
            }
            live.insert(
                server_id,
                Live {
                    connection,
                    fingerprint,
                },
            )
        };
        if let Some(old) = old {
            old.connection.close(
                VarInt::from_u32(close::REPLACED),
                b"replaced by a newer connection",
            );
        }
        Ok(())
    }

    /// Forgets a session that ended. Returns whether it was still the registered one (a newer
    /// connection may have replaced it).
    pub fn unregister(&self, server_id: Uuid, connection: &quinn::Connection) -> bool {
        let mut live = self.live();
        match live.get(&server_id) {
            Some(l) if l.connection.stable_id() == connection.stable_id() => {
                live.remove(&server_id);
                true
            }
            _ => false,
        }
    }

    /// Whether `server_id` has a session on this replica.
    pub fn is_connected_here(&self, server_id: Uuid) -> bool {
        self.live().contains_key(&server_id)
    }

    /// Revokes certificates: they leave the valid set (the next handshake is refused) and any
    /// session using one is closed at once with the "revoked" code. The set changes under the
    /// sessions' lock, so no registration can slip between the two.
    pub fn revoke(&self, fingerprints: &[Fingerprint]) {
        let mut live = self.live();
        for fp in fingerprints {
            self.certificates.revoke(*fp);
        }
        let doomed: Vec<Uuid> = live
            .iter()
            .filter(|(_, l)| fingerprints.contains(&l.fingerprint))
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            if let Some(l) = live.remove(&id) {
                l.connection
                    .close(VarInt::from_u32(close::REVOKED), b"certificate revoked");
            }
        }
    }

    /// A renewed certificate is valid (from now to `not_after`) and pending: its agent has not
    /// connected with it yet.
    pub fn renewed(&self, fingerprint: Fingerprint, server_id: Uuid, not_after: i64) {
        self.certificates.allow(fingerprint, server_id, not_after);
        self.pending_set().insert(fingerprint);
    }

    /// Whether `fingerprint` was a pending renewal; it is not any more.
    pub fn take_pending(&self, fingerprint: &Fingerprint) -> bool {
        self.pending_set().remove(fingerprint)
    }

    fn pending_set(&self) -> std::sync::MutexGuard<'_, HashSet<Fingerprint>> {
        // A set of hints: a poisoned lock still holds a usable one.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Retires certificates replaced by a renewal: they leave the valid set (a handshake with
    /// one is refused as expired, not revoked), and a session still using one is told to
    /// reconnect with the new certificate.
    pub fn retire(&self, fingerprints: &[Fingerprint]) {
        let mut live = self.live();
        for fp in fingerprints {
            self.certificates.retire(*fp);
            self.pending_set().remove(fp);
        }
        let doomed: Vec<Uuid> = live
            .iter()
            .filter(|(_, l)| fingerprints.contains(&l.fingerprint))
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            if let Some(l) = live.remove(&id) {
                l.connection
                    .close(VarInt::from_u32(close::RENEWED), b"certificate renewed");
            }
        }
    }

    /// Counts a renewal attempt of `server_id`: false past [`RENEWAL_BURST`] attempts in one
    /// `window`.
    pub fn admit_renewal(&self, server_id: Uuid, window: Duration) -> bool {
        let now = Instant::now();
        let mut renewals = self.renewals.lock().unwrap_or_else(|p| p.into_inner());
        if renewals.len() > 4096 {
            renewals.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let (since, count) = renewals.entry(server_id).or_insert((now, 0));
        if now.duration_since(*since) >= window {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count <= RENEWAL_BURST
    }

    /// Closes every session, suggesting each agent a reconnect delay drawn over a window
    /// sized to the fleet and to this machine's measured handshake rate
    /// (`backoff::restart_delay`), so that they do not all return in the same instant and a
    /// slower machine gets a longer window instead of a collapse.
    pub fn close_all_for_restart(&self) {
        let rate = self.reconnect_rate();
        let mut live = self.live();
        let connected = live.len();
        for (_, l) in live.drain() {
            let delay_ms =
                sensei_shared::backoff::restart_delay(connected, rate, rand::random()).as_millis();
            l.connection.close(
                VarInt::from_u32(close::RETRY_LATER),
                delay_ms.to_string().as_bytes(),
            );
        }
    }

    pub fn connected_count(&self) -> usize {
        self.live().len()
    }
}

impl Default for AgentHub {
    fn default() -> Self {
        Self::new()
    }
}
