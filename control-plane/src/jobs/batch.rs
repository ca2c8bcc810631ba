//! Claims and results of agents' jobs, in batches. A fleet does the same thing at once: ten
//! thousand agents reconnecting after a restart each look for a queued job; a rollout to ten
//! thousand agents claims, signs and records ten thousand jobs. One statement per agent made
//! PostgreSQL the bottleneck (docs/benchmarks.md). Here each kind of work has one worker that
//! takes whatever requests are waiting (up to a limit) and serves them with one statement. An
//! idle control plane sees batches of one, so nothing waits for a batch to fill.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::Pool;
use sensei_shared::job::SignedJob;
use sensei_shared::protocol::JobResult;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::claim::{self, Claimed};
use super::record::record_ends_retrying;
use super::sign::{deploy_configs, sign_with, DeployConfig, SignError};
use super::sweep;
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::job_signing::JobKeys;

/// Requests served by one statement at most.
const MAX_BATCH: usize = 1000;

/// What a poll's claim found.
#[derive(Debug)]
pub enum Dispatch {
    /// Nothing to run now: no job queued, or the server's previous job is still running.
    Idle,
    /// A job claimed and signed for the asking connection.
    Ready(Claimed, SignedJob),
    /// A job claimed that could not be signed: it must be failed with this reason.
    Unsignable(Claimed, SignError),
}

/// Why a claim could not be looked at.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    #[error("the control plane is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Database(String),
}

struct ClaimRequest {
    server_id: Uuid,
    binding: [u8; 32],
    /// The session's first poll (see [`super::sweep::fail_jobs_left_behind`]).
    first_poll: bool,
    reply: oneshot::Sender<Result<Dispatch, ClaimError>>,
}

struct FinishRequest {
    id: Uuid,
    result: JobResult,
    reply: oneshot::Sender<Result<(), NotRecorded>>,
}

/// A job's end could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the job's end could not be recorded: {0}")]
pub struct NotRecorded(pub String);

/// What the workers need.
struct Context {
    pool: Pool,
    keys: Arc<FieldKeys>,
    job_keys: Arc<JobKeys>,
    replica: Uuid,
}

/// Handles to the claim and finish workers.
pub struct JobBatches {
    claims: mpsc::UnboundedSender<ClaimRequest>,
    finishes: mpsc::UnboundedSender<FinishRequest>,
}

/// One worker: waits for a request, takes every other one already waiting, serves them all.
/// It stops when the last sender is dropped.
pub fn worker<T, F, Fut>(work: F) -> mpsc::UnboundedSender<T>
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

impl JobBatches {
    /// Starts the workers; they stop when the last handle is dropped.
    pub fn spawn(pool: Pool, keys: Arc<FieldKeys>, job_keys: Arc<JobKeys>, replica: Uuid) -> Self {
        let ctx = Arc::new(Context {
            pool,
            keys,
            job_keys,
            replica,
        });
        let (c1, c2) = (ctx.clone(), ctx);
        Self {
            claims: worker(move |batch| {
                let ctx = c1.clone();
                async move { claim_batch(&ctx, batch).await }
            }),
            finishes: worker(move |batch| {
                let ctx = c2.clone();
                async move { finish_batch(&ctx, batch).await }
            }),
        }
    }

    /// Claims the next job of `server_id` (if it may run one now) and signs it for
    /// `binding`, the fingerprint of the certificate its connection presented. On a session's
    /// `first_poll`, a job a dead replica handed to this server's agent earlier is failed
    /// first: the agent came back without it.
    pub async fn claim(
        &self,
        server_id: Uuid,
        binding: [u8; 32],
        first_poll: bool,
    ) -> Result<Dispatch, ClaimError> {
        let (reply, answer) = oneshot::channel();
        self.claims
            .send(ClaimRequest {
                server_id,
                binding,
                first_poll,
                reply,
            })
            .map_err(|_| ClaimError::ShuttingDown)?;
        answer.await.map_err(|_| ClaimError::ShuttingDown)?
    }

    /// Records how a job ended (only if it is still running: an end is final); returns once
    /// it is committed, or with why it could not be after [`RECORD_RETRIES`](super::record::RECORD_RETRIES): the caller
    /// must then not tell the agent its result was recorded.
    pub async fn finish(&self, id: Uuid, result: JobResult) -> Result<(), NotRecorded> {
        let (reply, done) = oneshot::channel();
        self.finishes
            .send(FinishRequest { id, result, reply })
            .map_err(|_| NotRecorded("the control plane is shutting down".into()))?;
        done.await
            .unwrap_or_else(|_| Err(NotRecorded("the control plane is shutting down".into())))
    }
}

async fn claim_batch(ctx: &Context, batch: Vec<ClaimRequest>) {
    // One (server, certificate) pair per server.
    let mut sessions: Vec<(Uuid, Vec<u8>)> = batch
        .iter()
        .map(|r| (r.server_id, r.binding.to_vec()))
        .collect();
    sessions.sort_unstable();
    sessions.dedup_by(|a, b| a.0 == b.0);
    let looked_up = async {
        let mut client = ctx
            .pool
            .get()
            .await
            .map_err(|e| ClaimError::Database(e.to_string()))?;
        let db = |e: tokio_postgres::Error| ClaimError::Database(crate::store::db::describe(&e));
        // Checked against the database's certificate row like the claim below: only a
        // connection whose certificate is valid proves anything about its server.
        let returned: Vec<(Uuid, Vec<u8>)> = batch
            .iter()
            .filter(|r| r.first_poll)
            .map(|r| (r.server_id, r.binding.to_vec()))
            .collect();
        if !returned.is_empty() {
            sweep::fail_jobs_left_behind(&client, &returned)
                .await
                .map_err(db)?;
        }
        // Another replica claiming for one of these servers in the same instant trips the
        // one-running-job index; once more, the statement's new snapshot sees that claim.
        match claim_with_configs(&mut client, ctx.replica, &sessions).await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                claim_with_configs(&mut client, ctx.replica, &sessions).await
            }
            other => other,
        }
        .map_err(db)
    };
    match looked_up.await {
        Err(e) => {
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
        Ok((mut claimed, configs)) => {
            let ring = ctx.job_keys.ring();
            for r in batch {
                // Only the connection whose certificate the claim checked gets the job (a
                // server with two connections in one batch had one of them checked).
                let checked = sessions
                    .binary_search_by(|(id, _)| id.cmp(&r.server_id))
                    .ok()
                    .is_some_and(|i| sessions[i].1 == r.binding);
                let job = if checked {
                    claimed.remove(&r.server_id)
                } else {
                    None
                };
                let answer = match job {
                    None => Dispatch::Idle,
                    Some(job) => {
                        let signed = sign_with(
                            configs.get(&job.id),
                            &ctx.keys,
                            &job,
                            r.binding,
                            // The key this server's agent acknowledged: during a job-key
                            // rotation, the new one only once its agent named it.
                            ring.for_server(job.job_key_acknowledged.as_deref()),
                        );
                        match signed {
                            Ok(signed) => Dispatch::Ready(job, signed),
                            Err(e) => Dispatch::Unsignable(job, e),
                        }
                    }
                };
                let _ = r.reply.send(Ok(answer));
            }
        }
    }
}

/// Claims the next job of each session's server and reads what signing them needs, in one
/// transaction: a claim whose configurations could not be read is rolled back, so its jobs
/// stay queued for the poll's retry instead of running, unsent, on a live connection (where
/// nothing would end them before the agent reconnects).
async fn claim_with_configs(
    client: &mut deadpool_postgres::Client,
    replica: Uuid,
    sessions: &[(Uuid, Vec<u8>)],
) -> Result<(HashMap<Uuid, Claimed>, HashMap<Uuid, DeployConfig>), tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    let claimed = claim::for_agents(&*transaction, replica, sessions).await?;
    let jobs: Vec<&Claimed> = claimed.values().collect();
    let configs = deploy_configs(&*transaction, &jobs).await?;
    transaction.commit().await?;
    Ok((claimed, configs))
}

async fn finish_batch(ctx: &Context, batch: Vec<FinishRequest>) {
    let ends: Vec<(Uuid, &JobResult)> = batch.iter().map(|r| (r.id, &r.result)).collect();
    let written = record_ends_retrying(&ctx.pool, &ends).await;
    if let Err(error) = &written {
        tracing::error!(%error, jobs = ends.len(), "recording the end of deployments failed; the agents keep their results and report them again");
    }
    drop(ends);
    for r in batch {
        let _ = r.reply.send(written.clone().map(drop).map_err(NotRecorded));
    }
}
