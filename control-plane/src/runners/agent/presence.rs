//! Which replica holds which agent, and its version: `servers.connected_replica`,
//! `last_seen_at` and `agent_version`, written in batches. Ten thousand agents reconnecting
//! after a restart would otherwise be ten thousand statements; here one worker takes every
//! mark waiting and writes them with two.

use std::collections::HashMap;
use std::net::IpAddr;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::jobs::batch::worker;

/// Tells the presence streams of the accounts of servers `$2` (a `uuid[]`) that their
/// agents' presence changed, on channel `$1` ([`crate::store::db::LIVE_CHANNEL`]). Inside a
/// transaction, the notification leaves at commit.
pub const ANNOUNCE_SQL: &str = "SELECT pg_notify($1, 's' || account_id::text) \
     FROM (SELECT DISTINCT account_id FROM servers WHERE id = ANY($2)) a";

enum Mark {
    Connected {
        server_id: Uuid,
        version: String,
        /// Where the agent connects from: what a DNS record of the server points at.
        address: IpAddr,
    },
    Disconnected {
        server_id: Uuid,
    },
}

/// The handle of the presence worker.
pub struct Presence {
    marks: mpsc::UnboundedSender<Mark>,
}

impl Presence {
    /// Starts the worker; it stops when the handle is dropped.
    pub fn spawn(pool: Pool, replica: Uuid) -> Self {
        Self {
            marks: worker(move |batch| {
                let pool = pool.clone();
                async move { mark_batch(&pool, replica, batch).await }
            }),
        }
    }

    /// Records, soon, that an agent connected to this replica from `address`.
    pub fn connected(&self, server_id: Uuid, version: &str, address: IpAddr) {
        let _ = self.marks.send(Mark::Connected {
            server_id,
            version: version.to_owned(),
            address: address.to_canonical(),
        });
    }

    /// Records, soon, that an agent left this replica (unless another replica has it).
    pub fn disconnected(&self, server_id: Uuid) {
        let _ = self.marks.send(Mark::Disconnected { server_id });
    }
}

async fn mark_batch(pool: &Pool, replica: Uuid, batch: Vec<Mark>) {
    // The last word per server wins: a quick disconnect and reconnect ends connected.
    let mut last: HashMap<Uuid, Option<(String, IpAddr)>> = HashMap::new();
    for mark in batch {
        match mark {
            Mark::Connected {
                server_id,
                version,
                address,
            } => last.insert(server_id, Some((version, address))),
            Mark::Disconnected { server_id } => last.insert(server_id, None),
        };
    }
    let (mut up, mut versions, mut addresses, mut down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, seen) in last {
        match seen {
            Some((version, address)) => {
                up.push(id);
                versions.push(version);
                addresses.push(address.to_string());
            }
            None => down.push(id),
        }
    }
    let Ok(client) = pool.get().await else {
        tracing::warn!("cannot record agent connections: no database connection");
        return;
    };
    if !up.is_empty() {
        if let Err(e) = client
            .execute(
                "UPDATE servers s SET connected_replica = $2, last_seen_at = now(), \
                   agent_version = v.version, agent_address = v.address \
                 FROM unnest($1::uuid[], $3::text[], $4::text[]) AS v(id, version, address) \
                 WHERE s.id = v.id",
                &[&up, &replica, &versions, &addresses],
            )
            .await
        {
            tracing::warn!(error = %crate::store::db::describe(&e), "recording agent connections");
        }
    }
    if !down.is_empty() {
        if let Err(e) = client
            .execute(
                "UPDATE servers SET connected_replica = NULL, last_seen_at = now() \
                 WHERE id = ANY($1) AND connected_replica = $2",
                &[&down, &replica],
            )
            .await
        {
            tracing::warn!(error = %crate::store::db::describe(&e), "recording agent disconnections");
        }
    }
    // The dashboards watching these accounts' fleets show the change at once.
    let changed: Vec<Uuid> = up.into_iter().chain(down).collect();
    if let Err(e) = client
        .execute(ANNOUNCE_SQL, &[&crate::store::db::LIVE_CHANNEL, &changed])
        .await
    {
        tracing::warn!(error = %crate::store::db::describe(&e), "announcing agent presence");
    }
}
