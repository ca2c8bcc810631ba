//! Draining a session after its agent renewed its certificate: no new job is claimed for the
//! connection, the job under way (if any) finishes on it, and then the session is closed with
//! the "renewed" code so that the agent reconnects with its new certificate. Closing at once
//! could fail a job claimed in that instant ("the agent disconnected during the deploy"); this
//! way a job queued meanwhile waits in the queue for the next connection.

use std::sync::Mutex;

use tokio::sync::Notify;

/// One connection's drain state, shared by its control stream and its job streams.
#[derive(Debug, Default)]
pub struct Drain {
    state: Mutex<DrainState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct DrainState {
    draining: bool,
    /// Job streams claiming a job or holding one.
    busy: usize,
}

/// A job stream claiming or holding a job; the session is not closed while one exists.
#[derive(Debug)]
pub struct Busy<'a>(&'a Drain);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.lock().busy -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Drain {
    fn lock(&self) -> std::sync::MutexGuard<'_, DrainState> {
        // Two counters with no invariant a panic could break half-way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a job stream busy before it claims; `None` once draining: claim nothing.
    pub fn busy(&self) -> Option<Busy<'_>> {
        let mut state = self.lock();
        if state.draining {
            return None;
        }
        state.busy += 1;
        Some(Busy(self))
    }

    /// Starts draining.
    pub fn start(&self) {
        self.lock().draining = true;
        self.changed.notify_waiters();
    }

    /// Waits until draining has started.
    pub async fn started(&self) {
        self.wait(|s| s.draining).await;
    }

    /// Waits until draining has started and no job stream is busy.
    pub async fn idle(&self) {
        self.wait(|s| s.draining && s.busy == 0).await;
    }

    async fn wait(&self, done: impl Fn(&DrainState) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a change between the look and the wait wakes it.
            notified.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_job_under_way_and_no_claim_starts_after_the_drain() {
        let drain = Drain::default();
        let busy = drain.busy().expect("not draining yet");
        drain.start();
        assert!(drain.busy().is_none(), "no claim once draining");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), drain.idle())
                .await
                .is_err(),
            "a job is under way"
        );
        drop(busy);
        tokio::time::timeout(Duration::from_secs(1), drain.idle())
            .await
            .expect("idle once the job is done");
        drain.started().await;
    }
}
