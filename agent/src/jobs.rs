//! The agent's job loop, on an established session: long-poll for the next job, verify it,
//! run it with the release engine, stream its log, report how it ended, poll again. The order
//! of messages is `sensei_shared::session::AgentJob`'s; this drives it.

use std::time::Duration;

use sensei_shared::codec::decode;
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::job::{verify, Expectations, JobPayload, JobTask, SignedJob};
use sensei_shared::protocol::{close, ControlMessage, JobResult, LogLine};
use sensei_shared::release::{run_nonce, script_for};
use sensei_shared::session::{AgentJob, AgentJobAction, HelloSent};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::execute::run_script;
use crate::identity::StateDir;
use crate::session::StreamEnd;

/// Log lines are sent in batches of at most this many, or every [`BATCH_INTERVAL`].
const BATCH_LINES: usize = 200;
const BATCH_INTERVAL: Duration = Duration::from_millis(200);

pub use crate::policy::JobPolicy;

/// What the agent checks jobs against (with the job-signing keys pinned in `state`, read
/// for each job: a key pinned during the session counts at once).
pub struct JobContext {
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

/// Polls and runs jobs until the connection ends, or the control plane breaks the protocol on
/// a job stream. Each stream is one exchange of [`AgentJob`]: a result kept from a lost
/// connection is reported first, then each stream polls for the next job.
pub async fn job_loop(
    connection: &quinn::Connection,
    ctx: &JobContext,
    hello: HelloSent,
) -> StreamEnd {
    // A result reported once on this connection is not reported again if its copy on disk
    // could not be removed: the control plane recorded it already.
    let mut reported = None;
    // An upgrade job accepted (on this connection or an earlier one, whose result is still to
    // report): triggered once the control plane recorded its result.
    let mut upgrade: Option<(Uuid, String)> = ctx.state.pending_upgrade();
    loop {
        let unreported = ctx
            .state
            .pending_result()
            .filter(|(job_id, _)| reported != Some(*job_id));
        // Without a trustworthy replay floor no job can be checked: stop taking jobs (the
        // session stays up, so the server shows as connected) until someone repairs it. A
        // report needs no floor.
        let highest_sequence = match ctx.state.highest_sequence() {
            Ok(n) => n,
            Err(_) if unreported.is_some() => 0,
            Err(e) => {
                tracing::error!(error = %e, "the job sequence file is unusable; refusing every job until it is repaired (remove it only if no old job could be replayed)");
                connection.closed().await;
                return StreamEnd::Connection;
            }
        };
        let reporting = unreported.as_ref().map(|(job_id, _)| *job_id);
        let mut job = AgentJob::next(hello, unreported, highest_sequence);
        let Ok((mut send, recv)) = connection.open_bi().await else {
            return StreamEnd::Connection;
        };
        let mut recv = FrameReader::new(recv);
        // An upgrade whose outcome the control plane recorded on this stream.
        let mut recorded_upgrade = None;
        loop {
            while let Some(action) = job.poll() {
                match action {
                    AgentJobAction::Send(message) => {
                        if write_frame(&mut send, &message).await.is_err() {
                            return StreamEnd::Connection;
                        }
                    }
                    AgentJobAction::Run(signed) => {
                        let answered = match run(connection, ctx, &signed, &mut job, &mut send)
                            .await
                        {
                            Answer::Finished { job_id, result } => job.finish(job_id, result),
                            Answer::Upgrade { job_id, version } => {
                                let result = JobResult {
                                    succeeded: true,
                                    release_id: None,
                                    commit: None,
                                    error: None,
                                };
                                if let Err(e) = ctx.state.store_pending_upgrade(job_id, &version) {
                                    tracing::warn!(error = %e, "cannot keep the upgrade on disk until its result is recorded");
                                }
                                upgrade = Some((job_id, version));
                                job.finish(job_id, result)
                            }
                            Answer::Refused { job_id, reason } => job.refuse(job_id, reason),
                        };
                        // Cannot fail: the machine asked to run the job, so one is running.
                        if let Err(e) = answered {
                            return StreamEnd::GiveUp {
                                code: close::LEAVING,
                                reason: e.to_string(),
                            };
                        }
                    }
                    // Kept on disk until acknowledged: if the connection (or the control plane
                    // replica) dies now, the result is reported again after reconnecting.
                    AgentJobAction::Keep { job_id, result } => {
                        if let Err(e) = ctx.state.store_pending_result(job_id, &result) {
                            tracing::warn!(error = %e, "cannot keep the job's result on disk");
                        }
                        crate::status::record(&ctx.state, |s| {
                            s.last_job = Some(crate::status::LastJob {
                                id: job_id,
                                succeeded: result.succeeded,
                                summary: match (&result.error, &result.release_id) {
                                    (Some((step, why)), _) => format!("{step}: {why}"),
                                    (None, Some(release)) => format!("release {release}"),
                                    (None, None) => "done".into(),
                                },
                                finished_at: crate::status::now(),
                            });
                        });
                    }
                    AgentJobAction::Forget { job_id } => {
                        if reporting == Some(job_id) {
                            tracing::info!(%job_id, "reported the result of a job finished while disconnected");
                            reported = Some(job_id);
                        }
                        ctx.state.clear_pending_result();
                        // The outcome is recorded: the upgrade may start once this stream is
                        // over (below).
                        if let Some((_, version)) = upgrade.take_if(|(id, _)| *id == job_id) {
                            ctx.state.clear_pending_upgrade();
                            recorded_upgrade = Some(version);
                        }
                    }
                    AgentJobAction::Finish => {
                        let _ = send.finish();
                    }
                }
            }
            if job.is_done() {
                break;
            }
            match recv.next::<ControlMessage>().await {
                Ok(Some(message)) => {
                    if let Err(e) = job.handle(message) {
                        return StreamEnd::GiveUp {
                            code: e.close_code(),
                            reason: e.to_string(),
                        };
                    }
                }
                Ok(None) | Err(_) => return StreamEnd::Connection,
            }
        }
        // The outcome is recorded and no job runs: only now may the upgrade (which restarts
        // this agent) start.
        if let Some(version) = recorded_upgrade {
            upgrade_now(connection, ctx, &version).await;
        }
    }
}

/// Triggers the upgrade to `version`, then takes no job until this agent is restarted on the
/// new version (or [`crate::upgrade::UPGRADE_HOLD`] passed: the upgrade did not happen).
async fn upgrade_now(connection: &quinn::Connection, ctx: &JobContext, version: &str) {
    match crate::upgrade::trigger(ctx.policy.upgrade_command.as_deref(), version).await {
        Ok(()) => {
            tracing::info!(%version, "agent upgrade started; taking no job until restarted");
            tokio::select! {
                () = tokio::time::sleep(crate::upgrade::UPGRADE_HOLD) => {
                    tracing::error!(%version, "the agent upgrade did not restart the agent; taking jobs again (see journalctl -u 'sensei-agent-upgrade@*')");
                }
                _ = connection.closed() => {}
            }
        }
        Err(reason) => {
            tracing::error!(%version, %reason, "cannot start the agent upgrade");
        }
    }
}

/// How a job ended on this server.
enum Answer {
    Finished {
        job_id: Uuid,
        result: JobResult,
    },
    /// An upgrade job passed every check: report success, then trigger the upgrade.
    Upgrade {
        job_id: Uuid,
        version: String,
    },
    /// Failed verification, not run.
    Refused {
        job_id: Option<Uuid>,
        reason: String,
    },
}

/// Verifies and runs one job, sending its log on `stream`; returns how it ended.
async fn run(
    connection: &quinn::Connection,
    ctx: &JobContext,
    job: &SignedJob,
    exchange: &mut AgentJob,
    send: &mut quinn::SendStream,
) -> Answer {
    let highest_sequence = match ctx.state.highest_sequence() {
        Ok(n) => n,
        Err(e) => {
            return Answer::Refused {
                job_id: None,
                reason: format!("the agent's replay floor is unusable: {e}"),
            }
        }
    };
    // Fails closed: keys that do not read refuse the job, never a smaller set.
    let keys = match ctx.state.job_keys() {
        Ok(keys) => keys,
        Err(e) => {
            return Answer::Refused {
                job_id: None,
                reason: format!("the agent's pinned job-signing keys are unusable: {e}"),
            }
        }
    };
    let expectations = Expectations {
        keys: keys.keys(),
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
            return Answer::Refused {
                job_id,
                reason: rejection.to_string(),
            };
        }
    };
    let job_id = payload.job_id;
    if let Err(e) = ctx.state.store_sequence(payload.sequence) {
        return Answer::Finished {
            job_id,
            result: JobResult::failed(
                "verify",
                format!("cannot record the job's sequence number: {e}"),
            ),
        };
    }
    // Verified like any job; its version is checked again before anything else.
    if let JobTask::UpgradeAgent(spec) = &payload.task {
        return match crate::upgrade::accept(spec) {
            Ok(version) => {
                tracing::info!(%job_id, %version, "upgrade job accepted");
                Answer::Upgrade {
                    job_id,
                    version: version.to_owned(),
                }
            }
            Err(reason) => {
                tracing::warn!(%job_id, %reason, "refused an upgrade job");
                Answer::Finished {
                    job_id,
                    result: JobResult::failed("verify", reason),
                }
            }
        };
    }
    let deploy_path = payload.task.deploy_path().unwrap_or_default().to_owned();
    let repo_url = match &payload.task {
        JobTask::Deploy(spec) => Some(spec.repo_url.as_str()),
        JobTask::Rollback(_) | JobTask::ForgetEnv(_) | JobTask::UpgradeAgent(_) => None,
    };
    // This server's own policy, whatever the signature says.
    let allowed = ctx
        .policy
        .permits_path(&deploy_path)
        .and_then(|()| repo_url.map_or(Ok(()), |url| ctx.policy.permits_repository(url)));
    if let Err(reason) = allowed {
        tracing::warn!(%job_id, %reason, "refused a job this server's policy does not allow");
        return Answer::Finished {
            job_id,
            result: JobResult::failed("verify", reason),
        };
    }
    let nonce = run_nonce(rand::random());
    let script = match script_for(&payload.task, job_id, &nonce) {
        Ok(s) => s,
        Err(e) => {
            return Answer::Finished {
                job_id,
                result: JobResult::failed("verify", e.to_string()),
            }
        }
    };
    tracing::info!(%job_id, sequence = payload.sequence, %deploy_path, "running a job");
    let (log_tx, mut log) = mpsc::unbounded_channel();
    let (cancel, cancelled) = watch::channel(false);
    // If this job is abandoned (the session ends, the agent stops), the script must not run
    // on: aborting the task drops it, and dropping it kills every process it started.
    let deploy_user = ctx.policy.deploy_user.clone();
    let mut run = AbortOnDrop(tokio::spawn(async move {
        run_script(&script, &nonce, deploy_user.as_ref(), log_tx, cancelled).await
    }));
    let mut batch: Vec<LogLine> = Vec::new();
    let mut tick = tokio::time::interval(BATCH_INTERVAL);
    loop {
        tokio::select! {
            line = log.recv() => match line {
                Some(line) => {
                    batch.push(line);
                    if batch.len() >= BATCH_LINES {
                        flush(send, exchange, job_id, &mut batch).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => flush(send, exchange, job_id, &mut batch).await,
            // Once: a closed connection stays ready, and the kill it asked for is under way.
            _ = connection.closed(), if !*cancel.borrow() => {
                let _ = cancel.send(true);
            }
        }
    }
    flush(send, exchange, job_id, &mut batch).await;
    let result = match (&mut run.0).await {
        Ok(Ok(report)) => JobResult::from_run(&report.outcome, report.exit()),
        Ok(Err(e)) => JobResult::failed("preflight", format!("cannot start sh: {e}")),
        Err(e) => JobResult::failed("preflight", format!("the job's task failed: {e}")),
    };
    tracing::info!(%job_id, succeeded = result.succeeded, "job finished");
    Answer::Finished { job_id, result }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn flush(
    send: &mut quinn::SendStream,
    exchange: &mut AgentJob,
    job_id: Uuid,
    batch: &mut Vec<LogLine>,
) {
    if batch.is_empty() {
        return;
    }
    // While the job runs the machine queues nothing but its log.
    if exchange.log(job_id, std::mem::take(batch)).is_err() {
        return;
    }
    while let Some(action) = exchange.poll() {
        if let AgentJobAction::Send(message) = action {
            // A lost log line is not worth ending the job for; a lost connection shows
            // itself to the loop above.
            let _ = write_frame(send, &message).await;
        }
    }
}
