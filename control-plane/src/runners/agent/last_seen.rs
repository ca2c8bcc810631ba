//! `servers.last_seen_at`, written in batches: heartbeats only mark a server as seen in
//! memory, and one UPDATE per interval records every server seen since the last one. With a
//! large fleet this is one statement every few seconds instead of one per heartbeat.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use uuid::Uuid;

/// How often pending sightings are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct LastSeen {
    pending: Mutex<HashSet<Uuid>>,
}

impl LastSeen {
    pub fn touch(&self, server_id: Uuid) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(server_id);
        }
    }

    /// Writes every pending sighting.
    pub async fn flush(&self, pool: &Pool) {
        let ids: Vec<Uuid> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        if ids.is_empty() {
            return;
        }
        let result = match pool.get().await {
            Ok(client) => client
                .execute(
                    "UPDATE servers SET last_seen_at = now() WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map(|_| ())
                .map_err(|e| crate::store::db::describe(&e)),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, servers = ids.len(), "recording agent heartbeats failed");
            if let Ok(mut p) = self.pending.lock() {
                p.extend(ids);
            }
        }
    }

    /// Flushes every [`FLUSH_INTERVAL`] until `shutdown`, then once more.
    pub async fn run(&self, pool: Pool, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(&pool).await,
                _ = shutdown.changed() => break,
            }
        }
        self.flush(&pool).await;
    }
}
