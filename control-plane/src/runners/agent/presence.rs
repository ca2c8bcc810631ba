//! Which replica holds which agent, and its version: `servers.connected_replica`,
//! `last_seen_at` and `agent_version`, written in batches. Ten thousand agents reconnecting
//! after a restart would otherwise be ten thousand statements; here one worker takes every
//! mark waiting and writes them with two.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use sensei_shared::backoff::Backoff;
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
    // Where each agent is must converge: a lost "disconnected" would show an agent as
    // connected for as long as this replica lives, a lost "connected" the opposite. So the
    // marks are written again, in order (later ones wait behind), until the database takes
    // them.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(8));
    loop {
        let written = match pool.get().await {
            Ok(client) => write_marks(&client, replica, &up, &versions, &addresses, &down)
                .await
                .map_err(|e| crate::store::db::describe(&e)),
            Err(e) => Err(e.to_string()),
        };
        let Err(error) = written else {
            return;
        };
        let wait = backoff.next_delay(rand::random());
        tracing::warn!(%error, connected = up.len(), disconnected = down.len(), retry_in = ?wait, "recording agent connections");
        tokio::time::sleep(wait).await;
    }
}

async fn write_marks(
    client: &tokio_postgres::Client,
    replica: Uuid,
    up: &[Uuid],
    versions: &[String],
    addresses: &[String],
    down: &[Uuid],
) -> Result<(), tokio_postgres::Error> {
    if !up.is_empty() {
        client
            .execute(
                "UPDATE servers s SET connected_replica = $2, last_seen_at = now(), \
                   agent_version = v.version, agent_address = v.address \
                 FROM unnest($1::uuid[], $3::text[], $4::text[]) AS v(id, version, address) \
                 WHERE s.id = v.id",
                &[&up, &replica, &versions, &addresses],
            )
            .await?;
    }
    if !down.is_empty() {
        client
            .execute(
                "UPDATE servers SET connected_replica = NULL, last_seen_at = now() \
                 WHERE id = ANY($1) AND connected_replica = $2",
                &[&down, &replica],
            )
            .await?;
    }
    // The dashboards watching these accounts' fleets show the change at once.
    let changed: Vec<Uuid> = up.iter().chain(down).copied().collect();
    client
        .execute(ANNOUNCE_SQL, &[&crate::store::db::LIVE_CHANNEL, &changed])
        .await?;
    Ok(())
}
