//! The gateway's database work, in batches. A fleet does the same few things at once: ten
//! thousand agents reconnecting after a restart each look for a queued job and are marked
//! connected; a rollout to ten thousand agents claims, signs and records ten thousand jobs.
//! One statement per agent made PostgreSQL the bottleneck (docs/benchmarks.md). Here each
//! kind of work has one worker that takes whatever requests are waiting (up to a limit) and
//! serves them with one statement. An idle control plane sees batches of one, so nothing
//! waits for a batch to fill.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::Pool;
use ed25519_dalek::SigningKey;
use sensei_shared::job::SignedJob;
use sensei_shared::protocol::JobResult;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::dispatch::{deploy_configs, record_ends, sign_with, Claimed};
use crate::field_crypto::FieldKeys;

/// Requests served by one statement at most.
const MAX_BATCH: usize = 1000;

/// A claimed job and its signed envelope (or why it could not be signed).
pub type ClaimAnswer = Result<Option<(Claimed, Result<SignedJob, String>)>, String>;

struct ClaimRequest {
    server_id: Uuid,
    binding: [u8; 32],
    reply: oneshot::Sender<ClaimAnswer>,
}

struct FinishRequest {
    id: Uuid,
    result: JobResult,
    reply: oneshot::Sender<()>,
}

enum Mark {
    Connected { server_id: Uuid, version: String },
    Disconnected { server_id: Uuid },
}

/// What the workers need.
struct Context {
    pool: Pool,
    keys: Arc<FieldKeys>,
    job_key: SigningKey,
    replica: Uuid,
}

/// Handles to the three workers.
pub struct Batches {
    claims: mpsc::UnboundedSender<ClaimRequest>,
    finishes: mpsc::UnboundedSender<FinishRequest>,
    marks: mpsc::UnboundedSender<Mark>,
}

/// One worker: waits for a request, takes every other one already waiting, serves them all.
fn worker<T, F, Fut>(work: F) -> mpsc::UnboundedSender<T>
where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<T>();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            work(std::mem::take(&mut batch)).await;
        }
    });
    tx
}

impl Batches {
    /// Starts the workers; they stop when the last handle is dropped.
    pub fn spawn(pool: Pool, keys: Arc<FieldKeys>, job_key: SigningKey, replica: Uuid) -> Self {
        let ctx = Arc::new(Context {
            pool,
            keys,
            job_key,
            replica,
        });
        let (c1, c2, c3) = (ctx.clone(), ctx.clone(), ctx);
        Self {
            claims: worker(move |batch| {
                let ctx = c1.clone();
                async move { claim_batch(&ctx, batch).await }
            }),
            finishes: worker(move |batch| {
                let ctx = c2.clone();
                async move { finish_batch(&ctx, batch).await }
            }),
            marks: worker(move |batch| {
                let ctx = c3.clone();
                async move { mark_batch(&ctx, batch).await }
            }),
        }
    }

    /// Claims the next queued job of `server_id` (if any) and signs it for `binding`.
    pub async fn claim(&self, server_id: Uuid, binding: [u8; 32]) -> ClaimAnswer {
        let (reply, answer) = oneshot::channel();
        self.claims
            .send(ClaimRequest {
                server_id,
                binding,
                reply,
            })
            .map_err(|_| "the control plane is shutting down".to_owned())?;
        answer
            .await
            .map_err(|_| "the control plane is shutting down".to_owned())?
    }

    /// Records how a job ended (only if it is still running: an end is final); returns once
    /// it is committed.
    pub async fn finish(&self, id: Uuid, result: JobResult) {
        let (reply, done) = oneshot::channel();
        if self
            .finishes
            .send(FinishRequest { id, result, reply })
            .is_ok()
        {
            let _ = done.await;
        }
    }

    /// Records, soon, that an agent connected to this replica.
    pub fn connected(&self, server_id: Uuid, version: &str) {
        let _ = self.marks.send(Mark::Connected {
            server_id,
            version: version.to_owned(),
        });
    }

    /// Records, soon, that an agent left this replica (unless another replica has it).
    pub fn disconnected(&self, server_id: Uuid) {
        let _ = self.marks.send(Mark::Disconnected { server_id });
    }
}

async fn claim_batch(ctx: &Context, batch: Vec<ClaimRequest>) {
    // One (server, certificate) pair per server: a job is only claimed for a connection
    // whose certificate the database still holds valid, so a revocation committed on any
    // replica stops claims at once, before its notification arrives.
    let mut pairs: Vec<(Uuid, Vec<u8>)> = batch
        .iter()
        .map(|r| (r.server_id, r.binding.to_vec()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup_by(|a, b| a.0 == b.0);
    let (servers, bindings): (Vec<Uuid>, Vec<Vec<u8>>) = pairs.into_iter().unzip();
    let looked_up = async {
        let client = ctx.pool.get().await.map_err(|e| e.to_string())?;
        // Per server, its oldest queued job that no one else holds; all claimed at once.
        let rows = client
            .query(
                "WITH picked AS ( \
                   SELECT q.id FROM unnest($1::uuid[], $3::bytea[]) AS s(server_id, fingerprint) \
                   CROSS JOIN LATERAL (SELECT id FROM deployments \
                       WHERE server_id = s.server_id AND status = 'queued' AND expires_at > now() \
                         AND EXISTS (SELECT 1 FROM agent_certificates c \
                           WHERE c.server_id = s.server_id AND c.fingerprint = s.fingerprint \
                             AND c.revoked_at IS NULL AND c.not_after > now()) \
                       ORDER BY sequence LIMIT 1 FOR UPDATE SKIP LOCKED) q) \
                 UPDATE deployments d SET status = 'running', started_at = now(), dispatched_replica = $2 \
                 FROM picked WHERE d.id = picked.id \
                 RETURNING d.id, d.sequence, d.kind, d.git_ref, d.release_id, d.project_id, \
                   d.rollout_id, d.expected_commit, d.server_id",
                &[&servers, &ctx.replica, &bindings],
            )
            .await
            .map_err(|e| crate::db::describe(&e))?;
        let claimed: HashMap<Uuid, Claimed> = rows
            .iter()
            .map(|r| (r.get::<_, Uuid>("server_id"), Claimed::from_row(r)))
            .collect();
        let jobs: Vec<&Claimed> = claimed.values().collect();
        let projects = if jobs.is_empty() {
            HashMap::new()
        } else {
            let owned: Vec<Claimed> = jobs.iter().map(|j| (*j).clone()).collect();
            deploy_configs(&client, &owned)
                .await
                .map_err(|e| crate::db::describe(&e))?
        };
        Ok::<_, String>((claimed, projects))
    };
    match looked_up.await {
        Err(e) => {
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
        Ok((mut claimed, projects)) => {
            for r in batch {
                let answer = claimed.remove(&r.server_id).map(|job| {
                    let signed = match projects.get(&job.id) {
                        Some(p) => {
                            sign_with(p, &ctx.keys, &job, r.server_id, r.binding, &ctx.job_key)
                        }
                        None => Err("the project no longer exists".to_owned()),
                    };
                    (job, signed)
                });
                let _ = r.reply.send(Ok(answer));
            }
        }
    }
}

async fn finish_batch(ctx: &Context, batch: Vec<FinishRequest>) {
    let ends: Vec<(Uuid, &JobResult)> = batch.iter().map(|r| (r.id, &r.result)).collect();
    let written = match ctx.pool.get().await {
        Ok(client) => record_ends(&client, &ends).await,
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = written {
        tracing::error!(%error, jobs = ends.len(), "recording the end of deployments");
    }
    drop(ends);
    for r in batch {
        let _ = r.reply.send(());
    }
}

async fn mark_batch(ctx: &Context, batch: Vec<Mark>) {
    // The last word per server wins: a quick disconnect and reconnect ends connected.
    let mut last: HashMap<Uuid, Option<String>> = HashMap::new();
    for mark in batch {
        match mark {
            Mark::Connected { server_id, version } => last.insert(server_id, Some(version)),
            Mark::Disconnected { server_id } => last.insert(server_id, None),
        };
    }
    let (mut up, mut versions, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for (id, version) in last {
        match version {
            Some(v) => {
                up.push(id);
                versions.push(v);
            }
            None => down.push(id),
        }
    }
    let Ok(client) = ctx.pool.get().await else {
        tracing::warn!("cannot record agent connections: no database connection");
        return;
    };
    if !up.is_empty() {
        if let Err(e) = client
            .execute(
                "UPDATE servers s SET connected_replica = $2, last_seen_at = now(), agent_version = v.version \
                 FROM unnest($1::uuid[], $3::text[]) AS v(id, version) WHERE s.id = v.id",
                &[&up, &ctx.replica, &versions],
            )
            .await
        {
            tracing::warn!(error = %crate::db::describe(&e), "recording agent connections");
        }
    }
    if !down.is_empty() {
        if let Err(e) = client
            .execute(
                "UPDATE servers SET connected_replica = NULL, last_seen_at = now() \
                 WHERE id = ANY($1) AND connected_replica = $2",
                &[&down, &ctx.replica],
            )
            .await
        {
            tracing::warn!(error = %crate::db::describe(&e), "recording agent disconnections");
        }
    }
}
