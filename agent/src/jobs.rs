//! The agent's job loop, on an established session: long-poll for the next job, verify it,
//! run it with the release engine, stream its log, report how it ended, poll again.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use sensei_shared::codec::decode;
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::job::{verify, Expectations, JobPayload, JobTask, SignedJob};
use sensei_shared::protocol::{AgentMessage, ControlMessage, JobResult, LogLine};
use sensei_shared::release::{deploy_script, forget_env_script, rollback_script};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::execute::run_script;
use crate::identity::StateDir;

/// Log lines are sent in batches of at most this many, or every [`BATCH_INTERVAL`].
const BATCH_LINES: usize = 200;
const BATCH_INTERVAL: Duration = Duration::from_millis(200);

pub use crate::policy::JobPolicy;

/// What the agent checks jobs against.
pub struct JobContext {
    pub key: VerifyingKey,
    pub server_id: Uuid,
    pub fingerprint: [u8; 32],
    pub state: StateDir,
    pub policy: JobPolicy,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reports a result left over from a connection that was lost before the control plane
/// acknowledged it. Returns false if the connection failed meanwhile.
async fn report_pending(connection: &quinn::Connection, ctx: &JobContext) -> bool {
    let Some((job_id, result)) = ctx.state.pending_result() else {
        return true;
    };
    let Ok((mut send, mut recv)) = connection.open_bi().await else {
        return false;
    };
    if write_frame(&mut send, &AgentMessage::JobReport { job_id, result })
        .await
        .is_err()
    {
        return false;
    }
    match read_frame::<ControlMessage, _>(&mut recv).await {
        Ok(Some(ControlMessage::JobRecorded)) => {
            tracing::info!(%job_id, "reported the result of a job finished while disconnected");
            ctx.state.clear_pending_result();
            let _ = send.finish();
            true
        }
        _ => false,
    }
}

/// Polls and runs jobs until the connection ends.
pub async fn job_loop(connection: &quinn::Connection, ctx: &JobContext) {
    if !report_pending(connection, ctx).await {
        return;
    }
    loop {
        // Without a trustworthy replay floor no job can be checked: stop taking jobs (the
        // session stays up, so the server shows as connected) until someone repairs it.
        let highest_sequence = match ctx.state.highest_sequence() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "the job sequence file is unusable; refusing every job until it is repaired (remove it only if no old job could be replayed)");
                connection.closed().await;
                return;
            }
        };
        let Ok((mut send, mut recv)) = connection.open_bi().await else {
            return;
        };
        let poll = AgentMessage::Poll { highest_sequence };
        if write_frame(&mut send, &poll).await.is_err() {
            return;
        }
        let job = match read_frame::<ControlMessage, _>(&mut recv).await {
            Ok(Some(ControlMessage::Job(job))) => job,
            _ => return,
        };
        let answer = handle(connection, ctx, &job, &mut send).await;
        // Kept on disk until acknowledged: if the connection (or the control plane replica)
        // dies now, the result is reported again after reconnecting.
        if let AgentMessage::JobFinished { job_id, result } = &answer {
            if let Err(e) = ctx.state.store_pending_result(*job_id, result) {
                tracing::warn!(error = %e, "cannot keep the job's result on disk");
            }
        }
        if write_frame(&mut send, &answer).await.is_err() {
            return;
        }
        match read_frame::<ControlMessage, _>(&mut recv).await {
            Ok(Some(ControlMessage::JobRecorded)) => ctx.state.clear_pending_result(),
            _ => return,
        }
        let _ = send.finish();
    }
}

/// Verifies and runs one job; returns the message that ends it.
async fn handle(
    connection: &quinn::Connection,
    ctx: &JobContext,
    job: &SignedJob,
    send: &mut quinn::SendStream,
) -> AgentMessage {
    let highest_sequence = match ctx.state.highest_sequence() {
        Ok(n) => n,
        Err(e) => {
            return AgentMessage::JobRefused {
                job_id: None,
                reason: format!("the agent's replay floor is unusable: {e}"),
            }
        }
    };
    let expectations = Expectations {
        key: &ctx.key,
        server_id: ctx.server_id,
        certificate_fingerprint: ctx.fingerprint,
        highest_sequence,
        now: now(),
    };
    let payload = match verify(job, &expectations) {
        Ok(payload) => payload,
        Err(rejection) => {
            // The id of a job that failed verification is only a hint for the report.
            let job_id = decode::<JobPayload>(&job.payload).ok().map(|p| p.job_id);
            tracing::warn!(?job_id, reason = %rejection, "refused a job");
            return AgentMessage::JobRefused {
                job_id,
                reason: rejection.to_string(),
            };
        }
    };
    let job_id = payload.job_id;
    if let Err(e) = ctx.state.store_sequence(payload.sequence) {
        return AgentMessage::JobFinished {
            job_id,
            result: JobResult::failed(
                "verify",
                format!("cannot record the job's sequence number: {e}"),
            ),
        };
    }
    let deploy_path = payload.task.deploy_path().to_owned();
    let repo_url = match &payload.task {
        JobTask::Deploy(spec) => Some(spec.repo_url.as_str()),
        JobTask::Rollback(_) | JobTask::ForgetEnv(_) => None,
    };
    // This server's own policy, whatever the signature says.
    let allowed = ctx
        .policy
        .permits_path(&deploy_path)
        .and_then(|()| repo_url.map_or(Ok(()), |url| ctx.policy.permits_repository(url)));
    if let Err(reason) = allowed {
        tracing::warn!(%job_id, %reason, "refused a job this server's policy does not allow");
        return AgentMessage::JobFinished {
            job_id,
            result: JobResult::failed("verify", reason),
        };
    }
    let nonce = hex::encode(rand::random::<[u8; 12]>());
    let script = match &payload.task {
        JobTask::Deploy(spec) => deploy_script(spec, &job_id.to_string(), &nonce),
        JobTask::Rollback(spec) => rollback_script(spec, &job_id.to_string(), &nonce),
        JobTask::ForgetEnv(spec) => forget_env_script(spec, &job_id.to_string(), &nonce),
    };
    let script = match script {
        Ok(s) => s,
        Err(e) => {
            return AgentMessage::JobFinished {
                job_id,
                result: JobResult::failed("verify", e.to_string()),
            }
        }
    };
    tracing::info!(%job_id, sequence = payload.sequence, %deploy_path, "running a job");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (cancel, cancelled) = watch::channel(false);
    // If this job is abandoned (the session ends, the agent stops), the script must not run
    // on: aborting the task drops it, and dropping it kills every process it started.
    let deploy_user = ctx.policy.deploy_user.clone();
    let mut run = AbortOnDrop(tokio::spawn(async move {
        run_script(&script, &nonce, deploy_user.as_ref(), events_tx, cancelled).await
    }));
    let mut batch: Vec<LogLine> = Vec::new();
    let mut tick = tokio::time::interval(BATCH_INTERVAL);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some((line, event)) => {
                    let (stream, text) = event.log_entry(line.stream);
                    batch.push(LogLine { stream, text });
                    if batch.len() >= BATCH_LINES {
                        flush(send, job_id, &mut batch).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => flush(send, job_id, &mut batch).await,
            // Once: a closed connection stays ready, and the kill it asked for is under way.
            _ = connection.closed(), if !*cancel.borrow() => {
                let _ = cancel.send(true);
            }
        }
    }
    flush(send, job_id, &mut batch).await;
    let result = match (&mut run.0).await {
        Ok(Ok(report)) => {
            let verdict = report.verdict();
            JobResult {
                succeeded: verdict.is_ok(),
                release_id: report.outcome.release.clone(),
                commit: report.outcome.commit.clone(),
                error: verdict.err(),
            }
        }
        Ok(Err(e)) => JobResult::failed("preflight", format!("cannot start sh: {e}")),
        Err(e) => JobResult::failed("preflight", format!("the job's task failed: {e}")),
    };
    tracing::info!(%job_id, succeeded = result.succeeded, "job finished");
    AgentMessage::JobFinished { job_id, result }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn flush(send: &mut quinn::SendStream, job_id: Uuid, batch: &mut Vec<LogLine>) {
    if batch.is_empty() {
        return;
    }
    let lines = std::mem::take(batch);
    let _ = write_frame(send, &AgentMessage::JobLog { job_id, lines }).await;
}
