//! The live agent state of one replica: which certificates are valid (consulted during the
//! handshake) and which agents are connected here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use quinn::VarInt;
use sensei_certs::{AgentCertStatus, AgentCertificateSet, Fingerprint};
use sensei_shared::protocol::close;
use uuid::Uuid;

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
    job_signals: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Any job was queued (the SSH runner waits on this).
    pub any_job: Notify,
}

impl AgentHub {
    pub fn new() -> Self {
        Self {
            replica_id: Uuid::new_v4(),
            certificates: Arc::new(AgentCertificateSet::new()),
            live: Mutex::new(HashMap::new()),
            job_signals: Mutex::new(HashMap::new()),
            any_job: Notify::new(),
        }
    }

    /// The signal a server's job poll waits on.
    pub fn job_signal(&self, server_id: Uuid) -> Arc<Notify> {
        self.job_signals
            .lock()
            .map(|mut m| m.entry(server_id).or_default().clone())
            .unwrap_or_default()
    }

    /// A job was queued for `server_id`: wake its poll if this replica holds it. A wake-up
    /// with nobody waiting is kept for the next wait, so none is lost between check and wait.
    pub fn wake(&self, server_id: Uuid) {
        self.any_job.notify_one();
        if let Ok(m) = self.job_signals.lock() {
            if let Some(signal) = m.get(&server_id) {
                signal.notify_one();
            }
        }
    }

    /// Wakes every waiting poll: after job notifications may have been missed (the LISTEN
    /// connection was lost and came back), each poll looks at the queue once.
    pub fn wake_all(&self) {
        self.any_job.notify_one();
        if let Ok(m) = self.job_signals.lock() {
            for signal in m.values() {
                signal.notify_one();
            }
        }
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
            let mut live = self.live.lock().expect("agent hub lock poisoned");
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
        let Ok(mut live) = self.live.lock() else {
            return false;
        };
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
        self.live
            .lock()
            .map(|live| live.contains_key(&server_id))
            .unwrap_or(false)
    }

    /// Revokes certificates: they leave the valid set (the next handshake is refused) and any
    /// session using one is closed at once with the "revoked" code. The set changes under the
    /// sessions' lock, so no registration can slip between the two.
    pub fn revoke(&self, fingerprints: &[Fingerprint]) {
        let mut live = self.live.lock().expect("agent hub lock poisoned");
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

    /// Closes every session, suggesting each agent a reconnect delay drawn over a window
    /// sized to the fleet (`backoff::restart_delay`), so that they do not all return in the
    /// same instant.
    pub fn close_all_for_restart(&self) {
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        let connected = live.len();
        for (_, l) in live.drain() {
            let delay_ms =
                sensei_shared::backoff::restart_delay(connected, rand::random()).as_millis();
            l.connection.close(
                VarInt::from_u32(close::RETRY_LATER),
                delay_ms.to_string().as_bytes(),
            );
        }
    }

    pub fn connected_count(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }
}

impl Default for AgentHub {
    fn default() -> Self {
        Self::new()
    }
}
