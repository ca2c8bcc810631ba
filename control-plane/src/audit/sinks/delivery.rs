//! The delivery loop every replica runs.
//!
//! Each round it leases as many due sinks as it has free slots (`FOR UPDATE SKIP LOCKED`, so
//! replicas never take the same sink; a lease runs out, so a dead replica's sinks are picked up)
//! and gives each its own task. A task reads a batch after the sink's cursor in `seq` order,
//! sends it within a timeout, and advances the cursor only once the receiver accepted; when it
//! did not, the sink waits an exponential backoff (capped) and the same events go again. No
//! event is ever skipped or given up on, so the receiver sees every event at least once, and
//! a duplicate only for a batch whose acceptance did not reach us. A slow or dead receiver
//! holds only its own task and slot: the API and the other sinks never wait for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{bounded_error, https, syslog, SinkConfig, SinkKind, Target};
use crate::audit::{AuditRecord, COLUMNS};
use crate::egress::{EgressError, TargetPolicy};
use crate::secrets::field_crypto::FieldKeys;

/// How delivery paces itself.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// How often a replica looks for due sinks.
    pub poll: Duration,
    /// Events per batch.
    pub batch: i64,
    /// The longest one batch may take, connection and handshake included.
    pub timeout: Duration,
    /// The wait after the first failure, doubled after each further one up to `backoff_cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Sinks this replica delivers at once.
    pub concurrency: usize,
    /// Batches one lease may send back to back while a sink catches up.
    pub batches_per_lease: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            batch: 200,
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            concurrency: 16,
            batches_per_lease: 20,
        }
    }
}

impl DeliverySettings {
    /// The wait before the next attempt after `failures` failures in a row.
    pub fn backoff(&self, failures: i32) -> Duration {
        let doublings = u32::try_from(failures.saturating_sub(1))
            .unwrap_or(0)
            .min(30);
        self.backoff_base
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_cap)
    }

    /// How long a lease lasts: one batch's timeout with room to record the outcome.
    fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(5)
    }
}

/// What this replica delivered since it started: by kind and result, for `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    /// [kind][0 = accepted, 1 = failed]
    batches: [[AtomicU64; 2]; 2],
    events: [AtomicU64; 2],
}

fn kind_index(kind: SinkKind) -> usize {
    match kind {
        SinkKind::SyslogTls => 0,
        SinkKind::Https => 1,
    }
}

/// One line of [`DeliveryCounters::snapshot`].
#[derive(Debug, Clone, Copy)]
pub struct CounterLine {
    pub kind: SinkKind,
    pub accepted_batches: u64,
    pub failed_batches: u64,
    pub events: u64,
}

impl DeliveryCounters {
    fn record(&self, kind: SinkKind, accepted: bool, events: usize) {
        let k = kind_index(kind);
        self.batches[k][usize::from(!accepted)].fetch_add(1, Ordering::Relaxed);
        if accepted {
            self.events[k].fetch_add(events as u64, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<CounterLine> {
        SinkKind::ALL
            .into_iter()
            .map(|kind| {
                let k = kind_index(kind);
                CounterLine {
                    kind,
                    accepted_batches: self.batches[k][0].load(Ordering::Relaxed),
                    failed_batches: self.batches[k][1].load(Ordering::Relaxed),
                    events: self.events[k].load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// Everything the loop needs.
pub struct Delivery {
    pub pool: Pool,
    pub keys: Arc<FieldKeys>,
    pub policy: TargetPolicy,
    pub settings: DeliverySettings,
    /// Who holds a lease: this replica.
    pub replica: Uuid,
    /// This control plane's public host name: the syslog HOSTNAME and the HEC `host`.
    pub origin: String,
    pub counters: Arc<DeliveryCounters>,
}

/// A sink this replica leased.
struct Leased {
    id: Uuid,
    account_id: Uuid,
    kind: SinkKind,
    config: Result<SinkConfig, String>,
    secret_ciphertext: Option<String>,
    cursor: i64,
    failures: i32,
}

/// Why leasing failed this round (the next round tries again).
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Why one batch was not delivered: the sink's `last_error`, after [`bounded_error`].
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("the stored configuration does not parse: {0}")]
    Stored(String),
    #[error("the sink's secret cannot be opened with the configured field keys")]
    Secret,
    #[error(transparent)]
    Egress(#[from] EgressError),
    #[error(transparent)]
    Syslog(#[from] syslog::SyslogError),
    #[error(transparent)]
    Https(#[from] https::HttpsError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Delivery {
    /// Runs until `shutdown`. Tasks in flight are stopped with it; their sinks' leases run out
    /// and the batches go again (at least once).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            if free > 0 {
                match self.lease(free).await {
                    Ok(sinks) => {
                        for sink in sinks {
                            let Ok(slot) = slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let me = self.clone();
                            tasks.spawn(async move {
                                me.deliver(sink).await;
                                drop(slot);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "audit sinks: leasing failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll) => {}
                _ = shutdown.changed() => break,
            }
        }
        tasks.shutdown().await;
    }

    /// Leases up to `n` sinks that are due and have events after their cursor.
    async fn lease(&self, n: usize) -> Result<Vec<Leased>, LeaseError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE audit_sinks s SET lease_owner = $1, \
                        lease_until = now() + make_interval(secs => $2) \
                 WHERE s.id IN ( \
                     SELECT c.id FROM audit_sinks c \
                     WHERE c.next_attempt_at <= now() \
                       AND (c.lease_until IS NULL OR c.lease_until < now()) \
                       AND EXISTS (SELECT 1 FROM audit_log a \
                                   WHERE a.chain_id = c.account_id AND a.seq > c.cursor_seq) \
                     ORDER BY c.next_attempt_at LIMIT $3 \
                     FOR UPDATE SKIP LOCKED) \
                 RETURNING s.id, s.account_id, s.kind, s.config, s.secret_ciphertext, s.cursor_seq, \
                           s.failures",
                &[
                    &self.replica,
                    &self.settings.lease().as_secs_f64(),
                    &(n as i64),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let kind = SinkKind::parse(r.get::<_, &str>(2))?;
                Some(Leased {
                    id: r.get(0),
                    account_id: r.get(1),
                    kind,
                    config: serde_json::from_value(r.get(3)).map_err(|e| e.to_string()),
                    secret_ciphertext: r.get(4),
                    cursor: r.get(5),
                    failures: r.get(6),
                })
            })
            .collect())
    }

    /// Delivers batches of one leased sink until it has caught up, a batch fails, or the lease
    /// has carried its share; then records the outcome and gives the lease back.
    async fn deliver(&self, mut sink: Leased) {
        for round in 1..=self.settings.batches_per_lease.max(1) {
            let records = match self.batch(&sink).await {
                Ok(records) => records,
                Err(e) => {
                    // Nothing was sent: let the lease run out and try again later.
                    tracing::warn!(sink = %sink.id, error = %e, "audit sinks: reading the batch failed");
                    return;
                }
            };
            let Some(last) = records.last().map(|r| r.seq) else {
                self.release(&sink).await;
                return;
            };
            let attempt =
                match tokio::time::timeout(self.settings.timeout, self.send(&sink, &records)).await
                {
                    Ok(result) => result,
                    Err(_) => Err(DeliveryError::Timeout(self.settings.timeout)),
                };
            self.counters
                .record(sink.kind, attempt.is_ok(), records.len());
            match attempt {
                Ok(()) => {
                    let more = records.len() as i64 >= self.settings.batch
                        && round < self.settings.batches_per_lease;
                    if !self.accepted(&sink, last, more).await || !more {
                        return;
                    }
                    sink.cursor = last;
                    sink.failures = 0;
                }
                Err(e) => {
                    self.failed(&sink, &e).await;
                    return;
                }
            }
        }
    }

    async fn batch(&self, sink: &Leased) -> Result<Vec<AuditRecord>, LeaseError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE chain_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3"
                ),
                &[&sink.account_id, &sink.cursor, &self.settings.batch],
            )
            .await?;
        Ok(rows.iter().map(AuditRecord::from_row).collect())
    }

    async fn send(&self, sink: &Leased, records: &[AuditRecord]) -> Result<(), DeliveryError> {
        let config = sink
            .config
            .as_ref()
            .map_err(|e| DeliveryError::Stored(e.clone()))?;
        let (host, port) = config
            .target
            .endpoint()
            .map_err(|e| DeliveryError::Stored(e.to_string()))?;
        let addrs = self
            .policy
            .resolve(&host, port, self.settings.timeout)
            .await
            .inspect_err(|e| {
                if matches!(e, EgressError::Denied(_)) {
                    tracing::info!(sink = %sink.id, %host, port, "audit sink target denied by the network policy");
                }
            })?;
        match &config.target {
            Target::SyslogTls { server_name, .. } => {
                Ok(
                    syslog::deliver(&addrs, server_name, &config.ca_pem, &self.origin, records)
                        .await?,
                )
            }
            Target::Https { url, auth } => {
                let secret = self.secret(sink)?;
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                Ok(https::deliver(
                    &https::Batch {
                        url,
                        host: bare,
                        addrs: &addrs,
                        ca_pem: &config.ca_pem,
                        auth: *auth,
                        secret: &secret,
                        origin: &self.origin,
                        timeout: self.settings.timeout,
                    },
                    records,
                )
                .await?)
            }
        }
    }

    fn secret(&self, sink: &Leased) -> Result<Vec<u8>, DeliveryError> {
        let sealed = sink
            .secret_ciphertext
            .as_deref()
            .ok_or(DeliveryError::Secret)?;
        self.keys.decrypt(sealed).map_err(|_| DeliveryError::Secret)
    }

    /// Records an accepted batch: the cursor moves to `last` (never back). With `keep`, the
    /// lease is renewed for the next batch.
    async fn accepted(&self, sink: &Leased, last: i64, keep: bool) -> bool {
        let renewed = keep.then(|| self.settings.lease().as_secs_f64());
        let result = async {
            self.pool
                .get()
                .await
                .map_err(|e| e.to_string())?
                .execute(
                    "UPDATE audit_sinks SET cursor_seq = GREATEST(cursor_seq, $3), failures = 0, \
                            next_attempt_at = now(), last_delivered_at = now(), \
                            lease_owner = CASE WHEN $4::float8 IS NULL THEN NULL ELSE lease_owner END, \
                            lease_until = now() + make_interval(secs => $4::float8) \
                     WHERE id = $1 AND lease_owner = $2",
                    &[&sink.id, &self.replica, &last, &renewed],
                )
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(1) => true,
            // Deleted meanwhile, or our lease ran out and another replica took the sink: it
            // sends from the cursor it read, so nothing is lost (at worst a duplicate).
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(sink = %sink.id, error = %e, "audit sinks: recording a delivery failed");
                false
            }
        }
    }

    async fn failed(&self, sink: &Leased, error: &DeliveryError) {
        let secret = match error {
            // The only errors that could hold a receiver's echo of the secret.
            DeliveryError::Https(_) => self
                .secret(sink)
                .ok()
                .map(|s| String::from_utf8_lossy(&s).into_owned()),
            _ => None,
        };
        let text = bounded_error(&error.to_string(), secret.as_deref());
        let failures = sink.failures.saturating_add(1);
        let wait = self.settings.backoff(failures);
        tracing::warn!(sink = %sink.id, account = %sink.account_id, failures, retry_in = ?wait,
            error = %text, "audit sink delivery failed");
        let result = async {
            self.pool
                .get()
                .await
                .map_err(|e| e.to_string())?
                .execute(
                    "UPDATE audit_sinks SET failures = failures + 1, \
                            next_attempt_at = now() + make_interval(secs => $3), \
                            last_error = $4, last_error_at = now(), \
                            lease_owner = NULL, lease_until = NULL \
                     WHERE id = $1 AND lease_owner = $2",
                    &[&sink.id, &self.replica, &wait.as_secs_f64(), &text],
                )
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(sink = %sink.id, error = %e, "audit sinks: recording a failure failed");
        }
    }

    /// Gives a lease back without a delivery (nothing was waiting after all).
    async fn release(&self, sink: &Leased) {
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    "UPDATE audit_sinks SET lease_owner = NULL, lease_until = NULL \
                     WHERE id = $1 AND lease_owner = $2",
                    &[&sink.id, &self.replica],
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let s = DeliverySettings {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            ..DeliverySettings::default()
        };
        assert_eq!(s.backoff(1), Duration::from_secs(1));
        assert_eq!(s.backoff(2), Duration::from_secs(2));
        assert_eq!(s.backoff(5), Duration::from_secs(16));
        assert_eq!(s.backoff(9), Duration::from_secs(256));
        assert_eq!(s.backoff(10), Duration::from_secs(300));
        assert_eq!(s.backoff(i32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn counters_are_per_kind_and_result() {
        let c = DeliveryCounters::default();
        c.record(SinkKind::Https, true, 5);
        c.record(SinkKind::Https, false, 5);
        c.record(SinkKind::SyslogTls, true, 2);
        let lines = c.snapshot();
        assert_eq!(lines[0].events, 2);
        assert_eq!(
            (
                lines[1].accepted_batches,
                lines[1].failed_batches,
                lines[1].events
            ),
            (1, 1, 5)
        );
    }
}
