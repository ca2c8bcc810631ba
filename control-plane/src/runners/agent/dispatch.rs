//! An agent's poll stream: each stream the agent opens gets the next job for its server, at
//! once if one may run, otherwise as soon as one is queued (woken through
//! [`crate::jobs::wake`], with a periodic re-check of the table as a safety net). The job was
//! signed for this server and this certificate. Then the agent's log lines and result go to
//! [`crate::jobs::record`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::VarInt;
use sensei_certs::AgentCertStatus;
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::protocol::{close, AgentMessage, ControlMessage, JobResult};
use sensei_shared::session::{ControlJob, ControlJobAction};
use uuid::Uuid;

use super::gateway::GatewayContext;
use super::session::SessionLink;
use crate::jobs::batch::{Dispatch, NotRecorded};
use crate::jobs::claim::Claimed;
use crate::jobs::{record, Step};

/// How often, at most, a waiting poll looks at the table without a wake-up. Every way a job
/// becomes claimable sends a wake-up (queueing and the orphan sweep notify in their
/// transaction; a finished job's agent polls again itself), and every poll is woken when the
/// LISTEN connection comes back, so this only bounds the damage of a wake-up lost to a bug.
/// Each re-check is a claim for an idle agent: at 5 s they were 2,000 queries a second with
/// 10,000 agents, at 60 s still the database's main idle cost (docs/benchmarks.md).
const RECHECK: Duration = Duration::from_secs(15 * 60);

/// A re-check delay between half and all of [`RECHECK`]: polls that began together (after a
/// reconnect storm) do not all re-check in the same second.
fn recheck_delay() -> Duration {
    RECHECK.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}

/// How soon a claim the database could not answer (its pool exhausted under load, a
/// connection lost) is tried again: between one and two of these, so that the polls of a
/// whole rollout that failed together do not come back together. The wake-up that led to the
/// claim is spent; waiting for the next re-check instead would leave a queued job for minutes,
/// long enough for a rollout to count its server unreachable.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

fn claim_retry_delay() -> Duration {
    CLAIM_RETRY.mul_f64(1.0 + rand::random::<f64>())
}

/// A job's end could not be written (the database failed for longer than the retries): the
/// agent is not told its result was recorded, and its connection is closed so that it comes
/// back in a second and reports the result it keeps on disk until acknowledged. A job it never
/// received is failed at its first poll on the new connection
/// ([`crate::jobs::sweep::fail_jobs_left_behind`]). Either way the server is not left with a
/// job that stays running while its agent is connected.
fn hand_back(connection: &quinn::Connection, server_id: Uuid, error: &NotRecorded) {
    tracing::warn!(%server_id, %error, "closing the agent's connection so that it reports again");
    connection.close(VarInt::from_u32(close::RETRY_LATER), b"1000");
}

/// Serves one job stream: a poll waits for a job, sends it and records what comes back; a
/// report is recorded; a renewal is answered ([`super::renew`]). The order of messages is
/// `sensei_shared::session::ControlJob`'s; a message out of place resets the stream with the
/// protocol-error code.
pub async fn serve_poll(
    ctx: &GatewayContext,
    server_id: Uuid,
    link: &SessionLink,
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let fingerprint = link.fingerprint;
    let mut recv = FrameReader::new(recv);
    let mut exchange = ControlJob::new();
    // The job sent on this stream, for the log.
    let mut sent: Option<Claimed> = None;
    // Held while this stream claims or carries a job: a draining session is not closed
    // under it.
    let mut _busy = None;
    // The agent ended its side of the stream.
    let mut ended = false;
    // The agent refused a job signed by a key it never acknowledged.
    let mut stranded = false;
    loop {
        while let Some(action) = exchange.poll() {
            match action {
                ControlJobAction::Claim { .. } => {
                    let signal = ctx.hub.wakes.signal(server_id);
                    // A job is only ever claimed for, and handed to, a connection whose
                    // certificate is valid at that moment (the in-memory set: no database
                    // round trip).
                    let still_valid = || {
                        ctx.hub.certificates.status(&fingerprint)
                            == AgentCertStatus::Valid(server_id)
                    };
                    let (job, signed, busy) = loop {
                        if !still_valid() {
                            return;
                        }
                        // A draining session claims nothing more: the poll ends, and the
                        // job waits in the queue for the agent's next connection.
                        let Some(busy) = link.drain.busy() else {
                            let _ = send.finish();
                            return;
                        };
                        let first_poll = !link.polled.swap(true, Ordering::Relaxed);
                        match ctx
                            .jobs
                            .claim(server_id, *fingerprint.as_bytes(), first_poll)
                            .await
                        {
                            Ok(Dispatch::Ready(job, _)) if !still_valid() => {
                                // Revoked while the claim was in flight: the job never leaves.
                                let ended =
                                    ctx.jobs.finish(job.id, record::certificate_revoked()).await;
                                if let Err(e) = ended {
                                    hand_back(connection, server_id, &e);
                                }
                                return;
                            }
                            Ok(Dispatch::Ready(job, signed)) => break (job, signed, busy),
                            Ok(Dispatch::Unsignable(job, reason)) => {
                                let failed =
                                    JobResult::failed(Step::Dispatch.as_str(), reason.to_string());
                                if let Err(e) = ctx.jobs.finish(job.id, failed).await {
                                    hand_back(connection, server_id, &e);
                                    return;
                                }
                                continue;
                            }
                            Ok(Dispatch::Idle) => {}
                            Err(e) => {
                                tracing::warn!(%server_id, error = %e, "looking for queued jobs; trying again shortly");
                                // The first-poll rule may not have run: the next claim runs it.
                                if first_poll {
                                    link.polled.store(false, Ordering::Relaxed);
                                }
                                drop(busy);
                                tokio::select! {
                                    _ = tokio::time::sleep(claim_retry_delay()) => {}
                                    () = link.drain.started() => {}
                                }
                                continue;
                            }
                        }
                        drop(busy);
                        tokio::select! {
                            _ = signal.notified() => {}
                            _ = tokio::time::sleep(recheck_delay()) => {}
                            () = link.drain.started() => {}
                        }
                    };
                    _busy = Some(busy);
                    // Cannot be out of order: the machine asked for this claim.
                    let _ = exchange.claimed(job.id, signed);
                    sent = Some(job);
                }
                ControlJobAction::Send(message) => {
                    if write_frame(&mut send, &message).await.is_err() {
                        return;
                    }
                    if let (ControlMessage::Job(_), Some(job)) = (&message, &sent) {
                        tracing::info!(%server_id, deployment = %job.id, sequence = job.sequence, "job sent to the agent");
                    }
                }
                ControlJobAction::StoreLines { job_id, lines } => {
                    Box::pin(record::store_lines(&ctx.pool, job_id, &lines)).await;
                }
                ControlJobAction::Refused { job_id, reason } => {
                    // Debug-formatted: the reason is the agent's text, and escaped it cannot start a log line.
                    tracing::warn!(%server_id, deployment = %job_id, ?reason, "the agent refused a job");
                    stranded = sent
                        .as_ref()
                        .is_some_and(|job| signed_by_unacknowledged_key(&ctx.job_keys.ring(), job));
                }
                ControlJobAction::Record { job_id, mut result } => {
                    if stranded {
                        if let Some((_, message)) = result.error.as_mut() {
                            message.push_str(STRANDED);
                        }
                    }
                    if let Err(e) = ctx.jobs.finish(job_id, result).await {
                        hand_back(connection, server_id, &e);
                        return;
                    }
                    // Cannot be out of order: the machine asked for this record.
                    let _ = exchange.recorded();
                }
                ControlJobAction::RecordReport { job_id, result } => {
                    // A result from before a lost connection; whichever replica handed the
                    // job out, it is recorded if the job belongs to this server and is still
                    // open. Boxed, like the other database futures here: a waiting poll task
                    // stays small.
                    match Box::pin(record::report(&ctx.pool, server_id, job_id, &result)).await {
                        Ok(true) => {
                            tracing::info!(%server_id, deployment = %job_id, "recorded a result reported after reconnecting");
                        }
                        // Not open any more, or not this server's: nothing to keep.
                        Ok(false) => {}
                        Err(e) => {
                            hand_back(connection, server_id, &e);
                            return;
                        }
                    }
                    let _ = exchange.recorded();
                }
                ControlJobAction::Renew { csr_der } => {
                    // Cannot be out of order: the machine asked for this renewal.
                    let _ = match Box::pin(super::renew::process(ctx, server_id, link, &csr_der))
                        .await
                    {
                        Ok(certificate_pem) => exchange.renewed(certificate_pem),
                        Err(reason) => exchange.renewal_refused(reason),
                    };
                }
                ControlJobAction::WatchTrust { pinned_cas } => {
                    let news = super::authority::watch_trust(
                        &ctx.authority,
                        &pinned_cas,
                        &link.certificate_der,
                    )
                    .await;
                    // Cannot be out of order: the machine asked for this watch.
                    let _ = exchange.announce(news);
                }
                ControlJobAction::WatchTrustAndJobKeys {
                    pinned_cas,
                    job_keys,
                } => {
                    // Naming the new key during a rotation is the agent's acknowledgement:
                    // its jobs are signed by that key from now on.
                    let ring = ctx.job_keys.ring();
                    let current = ring.current_public();
                    if ring.previous.is_some() && job_keys.contains(&current) {
                        match Box::pin(super::job_key_rotation::record_acknowledged(
                            &ctx.pool, server_id, &current,
                        ))
                        .await
                        {
                            Ok(true) => {
                                tracing::info!(%server_id, "the agent acknowledged the new job-signing key; its jobs are signed by it from now on")
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(%server_id, error = %e, "recording a job-key acknowledgement failed; its next session records it");
                            }
                        }
                    }
                    drop(ring);
                    // A CA change first: a session renewing under a new CA ends soon anyway.
                    let news = tokio::select! {
                        biased;
                        news = super::authority::watch_trust(
                            &ctx.authority,
                            &pinned_cas,
                            &link.certificate_der,
                        ) => news,
                        news = ctx.job_keys.watch(&job_keys) => news,
                    };
                    // Cannot be out of order: the machine asked for this watch.
                    let _ = exchange.announce(news);
                }
                ControlJobAction::StoreHostFacts { os, arch } => {
                    if link
                        .host_facts_seen
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(%server_id, "the agent described its host twice on one session; stream reset");
                        let _ = send.reset(VarInt::from_u32(close::PROTOCOL_ERROR));
                        return;
                    }
                    // Checked by the machine (length, charset); written only when changed, so
                    // a fleet reconnecting costs reads, not writes.
                    let stored = match ctx.pool.get().await {
                        Ok(client) => client
                            .execute(
                                "UPDATE servers SET agent_os = $2, agent_arch = $3 WHERE id = $1 \
                                 AND (agent_os IS DISTINCT FROM $2 OR agent_arch IS DISTINCT FROM $3)",
                                &[&server_id, &os, &arch],
                            )
                            .await
                            .map(|_| ())
                            .map_err(|e| crate::store::db::describe(&e)),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(error) = stored {
                        tracing::warn!(%server_id, %error, "cannot store the agent's host facts");
                    }
                }
                ControlJobAction::TrustStored => {
                    tracing::info!(%server_id, "the agent follows the CA or job-key change");
                }
                ControlJobAction::Drain => {
                    tracing::info!(%server_id, "the agent stored its renewed certificate; draining its session");
                    link.drain.start();
                }
                ControlJobAction::Finish => {
                    let _ = send.finish();
                    return;
                }
            }
        }
        if ended {
            return;
        }
        match recv.next::<AgentMessage>().await {
            Ok(Some(message)) => {
                if let Err(e) = exchange.handle(message) {
                    tracing::info!(%server_id, reason = %e, "agent protocol error on a job stream");
                    let code = VarInt::from_u32(e.close_code());
                    let _ = send.reset(code);
                    let _ = recv.get_mut().stop(code);
                    return;
                }
            }
            // The stream ending: after a renewed certificate, the agent stored it. Otherwise
            // (or failing) the session's end marks a running job failed.
            Ok(None) => {
                exchange.handle_end();
                ended = true;
            }
            Err(_) => return,
        }
    }
}

/// What a refused job's error adds when the key that signed it is one the server's agent never
/// acknowledged: after `job-key retire`, an agent that missed the rotation.
const STRANDED: &str = "; this server's agent never acknowledged the current job-signing key \
     (it was offline or too old during the job-key rotation, which is retired): enroll it again \
     (POST /v1/servers/{id}/enrollment-token, then `sensei-agent enroll`)";

/// Whether `job` was signed by a key its server's agent never acknowledged.
fn signed_by_unacknowledged_key(
    ring: &crate::secrets::job_signing::JobKeyRing,
    job: &Claimed,
) -> bool {
    let acknowledged = job.job_key_acknowledged.as_deref();
    let signer = ring.for_server(acknowledged).verifying_key().to_bytes();
    acknowledged != Some(signer.as_slice())
}

/// Fails the jobs this replica handed to `server_id` that are still running (its agent went
/// away mid-deploy), and lets its next poll, wherever it comes, look at the queue again: a
/// server runs one job at a time, and the one just failed may have held the next back.
pub async fn fail_interrupted(ctx: &GatewayContext, server_id: Uuid) {
    if record::fail_interrupted(&ctx.pool, ctx.hub.replica_id, server_id).await > 0 {
        ctx.hub.wakes.wake(server_id);
    }
}
