//! Waking whoever waits for a job: an agent's poll on the replica that holds its connection,
//! and the SSH runner. A queued job is announced on [`JOB_CHANNEL`] in the transaction that
//! queues it; every replica LISTENs (`runners`' certificate-event listener also carries this
//! channel) and wakes its own waiters here. The table stays the truth: a wake-up only says
//! "look now", and a missed one only delays a job until the next re-check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

/// The PostgreSQL channel of queued jobs; the payload is the ids of the servers that got a
/// job, comma-separated (a single id is what versions before 2026-12-05 sent and read).
pub const JOB_CHANNEL: &str = "sensei_jobs";
/// Server ids in one notification at most: 200 ids of 36 characters and their commas fit the
/// 8,000 bytes PostgreSQL allows a payload.
pub const WAKE_LIST_MAX: usize = 200;
/// The payload that wakes every poll. Versions before 2026-12-05 sent it for batches of more
/// than 64 jobs; it is still obeyed, for a rolling upgrade in which they queue jobs.
pub const WAKE_ALL: &str = "*";

/// One replica's job waiters.
#[derive(Default)]
pub struct JobWakes {
    /// Per server, the signal its poll waits on.
    servers: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Any job was queued (the SSH runner waits on this).
    pub any: Notify,
}

impl JobWakes {
    /// The signal a server's job poll waits on.
    pub fn signal(&self, server_id: Uuid) -> Arc<Notify> {
        self.lock().entry(server_id).or_default().clone()
    }

    /// The session of `server_id` on this replica ended: its signal goes, unless a poll
    /// still holds it. Without this the map would keep an entry for every server that ever
    /// connected here, which grows without end for fleets whose servers come and go.
    pub fn forget(&self, server_id: Uuid) {
        let mut servers = self.lock();
        if servers
            .get(&server_id)
            .is_some_and(|signal| Arc::strong_count(signal) == 1)
        {
            servers.remove(&server_id);
        }
    }

    /// How many servers have a signal (for tests and figures).
    pub fn signal_count(&self) -> usize {
        self.lock().len()
    }

    /// A job was queued for `server_id`: wake its poll if this replica holds it. A wake-up
    /// with nobody waiting is kept for the next wait, so none is lost between check and wait.
    pub fn wake(&self, server_id: Uuid) {
        self.any.notify_one();
        if let Some(signal) = self.lock().get(&server_id) {
            signal.notify_one();
        }
    }

    /// Wakes every waiting poll: after job notifications may have been missed (the LISTEN
    /// connection was lost and came back), each poll looks at the queue once.
    pub fn wake_all(&self) {
        self.any.notify_one();
        for signal in self.lock().values() {
            signal.notify_one();
        }
    }

    /// Applies one notification from [`JOB_CHANNEL`]; anything unreadable is ignored, since
    /// the periodic re-check finds the job anyway.
    pub fn apply(&self, payload: &str) {
        if payload == WAKE_ALL {
            self.wake_all();
            return;
        }
        for server_id in payload
            .split(',')
            .take(WAKE_LIST_MAX)
            .filter_map(|id| id.parse::<Uuid>().ok())
        {
            self.wake(server_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Notify>>> {
        // Nothing runs under this lock that can panic (map lookups and `notify_one`), so a
        // poisoned lock is a bug worth stopping on rather than a wake-up to skip quietly.
        self.servers.lock().expect("job wake-up lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_before_the_wait_is_kept_and_others_are_not_woken() {
        let wakes = JobWakes::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (sa, sb) = (wakes.signal(a), wakes.signal(b));
        wakes.apply(&a.to_string());
        // Kept for the next wait: `notified()` completes at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), sa.notified())
            .await
            .expect("a was woken");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), sb.notified())
                .await
                .is_err(),
            "b was not woken"
        );
        wakes.apply("not a server id");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), sb.notified())
                .await
                .is_err(),
            "garbage wakes nobody"
        );
        // A list wakes exactly the servers it names.
        let c = Uuid::new_v4();
        let sc = wakes.signal(c);
        wakes.apply(&format!("{a},{c},not a server id"));
        for s in [&sa, &sc] {
            tokio::time::timeout(std::time::Duration::from_secs(1), s.notified())
                .await
                .expect("named and woken");
        }
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), sb.notified())
                .await
                .is_err(),
            "b was not named"
        );
        wakes.apply(WAKE_ALL);
        for s in [&sa, &sb] {
            tokio::time::timeout(std::time::Duration::from_secs(1), s.notified())
                .await
                .expect("everyone woken");
        }
    }

    /// A session's end removes its server's signal unless a poll still holds it; a wake for
    /// a forgotten server is harmless, and its next poll gets a fresh signal.
    #[tokio::test]
    async fn an_ended_session_leaves_no_signal_behind() {
        let wakes = JobWakes::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        drop(wakes.signal(a));
        let held = wakes.signal(b);
        assert_eq!(wakes.signal_count(), 2);
        wakes.forget(a);
        wakes.forget(b);
        assert_eq!(
            wakes.signal_count(),
            1,
            "b's signal is still held by its poll"
        );
        wakes.wake(a);
        assert_eq!(
            wakes.signal_count(),
            1,
            "a wake does not bring a signal back"
        );
        drop(held);
        wakes.forget(b);
        assert_eq!(wakes.signal_count(), 0);
        let again = wakes.signal(a);
        wakes.wake(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), again.notified())
            .await
            .expect("a new poll is woken");
    }
}
