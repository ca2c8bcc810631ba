//! The SSH fallback runner: deploys to servers without an agent, over SSH, with the platform's
//! key for that server (decrypted in memory only; it never touches disk).
//!
//! It is just another executor of the same signed job: every replica claims queued jobs of
//! SSH servers (one running job per server, claimed under a lock on the server row), checks
//! the signed job exactly as an agent does (signature, server, key binding, replay, time),
//! and pipes the release engine's script into `sh -s` over **one** SSH channel. The steps,
//! log lines and statuses are therefore those of an agent deploy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{client, ChannelMsg};
use sensei_shared::job::{verify, Expectations, JobTask};
use sensei_shared::protocol::{JobResult, LogLine};
use sensei_shared::release::{
    run_nonce, script_for, Outcome, OutputStream, ScriptExit, ScriptOutput,
};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

use crate::jobs::claim::{self, Claimed};
use crate::jobs::{record, sign};
use crate::runners::agent::AgentHub;
use crate::secrets::field_crypto::FieldKeys;

/// SSH deploys running at once on one replica.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// SSH deploys one account may run at once on one replica: no tenant can hold every slot.
pub const PER_ACCOUNT_CONCURRENCY: usize = 8;
/// The longest an SSH deploy may run when the operator does not say (`--ssh-job-timeout-secs`).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the runner needs.
pub struct SshRunner {
    pub pool: Pool,
    pub keys: Arc<FieldKeys>,
    /// Sign jobs: SSH servers pin no key (the runner checks its own jobs), so always the
    /// current one.
    pub job_keys: Arc<crate::secrets::job_signing::JobKeys>,
    pub hub: Arc<AgentHub>,
    pub permits: Arc<Semaphore>,
    /// The longest any SSH deploy may run, whatever its hook timeouts add up to.
    pub max_job: Duration,
    /// SSH deploys running here, per account.
    pub running: Mutex<std::collections::HashMap<Uuid, usize>>,
    /// Where SSH targets may not be: the networks denied and the control plane's own
    /// listening addresses.
    pub targets: TargetPolicy,
}

use crate::egress::TargetPolicy;

/// An account's SSH slot on this replica, held while its deploy runs.
struct AccountSlot {
    runner: Arc<SshRunner>,
    account: Uuid,
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        self.runner.finished(self.account);
    }
}

/// Why an SSH deploy could not run; the message is the deployment's error.
struct Failure {
    step: &'static str,
    message: String,
}

fn fail(step: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        step,
        message: message.into(),
    }
}

impl SshRunner {
    /// Claims and runs SSH jobs until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            loop {
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    break;
                };
                match self.claim().await {
                    Ok(Some((server_id, slot, job))) => {
                        let runner = self.clone();
                        tokio::spawn(async move {
                            runner.execute(server_id, job).await;
                            drop(slot);
                            drop(permit);
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming SSH jobs");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.hub.wakes.any.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Counts an account's SSH deploy in, if it has a slot left here; the slot is given back
    /// when the returned guard is dropped, however the deploy ends (errors and panics too).
    fn admit(self: &Arc<Self>, account: Uuid) -> Option<AccountSlot> {
        let mut running = self.running.lock().expect("SSH runner lock poisoned");
        let n = running.entry(account).or_default();
        if *n >= PER_ACCOUNT_CONCURRENCY {
            return None;
        }
        *n += 1;
        Some(AccountSlot {
            runner: self.clone(),
            account,
        })
    }

    fn finished(&self, account: Uuid) {
        let mut running = self.running.lock().expect("SSH runner lock poisoned");
        if let Some(n) = running.get_mut(&account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&account);
            }
        }
    }

    /// Claims the oldest queued job of an SSH server that has no job running, for an account
    /// with a slot left on this replica.
    async fn claim(self: &Arc<Self>) -> Result<Option<(Uuid, AccountSlot, Claimed)>, String> {
        let db = |e: tokio_postgres::Error| crate::store::db::describe(&e);
        let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
        let candidates = claim::ssh_candidates(&client, 200).await.map_err(db)?;
        for (server_id, account) in candidates {
            // Given back (dropped) unless this server's job is claimed below.
            let Some(slot) = self.admit(account) else {
                continue;
            };
            if let Some(job) = claim::for_ssh(&mut client, self.hub.replica_id, server_id)
                .await
                .map_err(db)?
            {
                return Ok(Some((server_id, slot, job)));
            }
        }
        Ok(None)
    }

    async fn execute(&self, server_id: Uuid, job: Claimed) {
        tracing::info!(%server_id, deployment = %job.id, "SSH deploy starting");
        let result = match self.deploy(server_id, &job).await {
            Ok(result) => result,
            Err(f) => {
                self.log(
                    job.id,
                    vec![LogLine {
                        stream: 0,
                        text: format!("FAILED at {}: {}", f.step, f.message),
                    }],
                )
                .await;
                JobResult::failed(f.step, f.message)
            }
        };
        tracing::info!(%server_id, deployment = %job.id, succeeded = result.succeeded, "SSH deploy finished");
        record::finish(&self.pool, job.id, &result).await;
    }

    async fn log(&self, id: Uuid, lines: Vec<LogLine>) {
        record::store_lines(&self.pool, id, &lines).await;
    }

    async fn deploy(&self, server_id: Uuid, job: &Claimed) -> Result<JobResult, Failure> {
        let db = |e: tokio_postgres::Error| fail("dispatch", crate::store::db::describe(&e));
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| fail("dispatch", e.to_string()))?;
        let s = client
            .query_one(
                "SELECT host, port, username, ssh_auth, ssh_private_key_ciphertext, \
                        ssh_password_ciphertext, host_key, ssh_highest_sequence \
                 FROM servers WHERE id = $1",
                &[&server_id],
            )
            .await
            .map_err(db)?;
        drop(client);
        let host: String = s.get(0);
        let port = u16::try_from(s.get::<_, i32>(1)).unwrap_or(22);
        let user: String = s.get::<_, Option<String>>(2).unwrap_or_default();
        let pinned: Option<String> = s.get(6);
        let highest = u64::try_from(s.get::<_, i64>(7)).unwrap_or(0);
        let credential = match (
            s.get::<_, Option<&str>>(3),
            s.get::<_, Option<&str>>(4),
            s.get::<_, Option<&str>>(5),
        ) {
            (Some("key"), Some(sealed), _) => {
                let plain = self
                    .keys
                    .decrypt(sealed)
                    .map_err(|e| fail("dispatch", e.to_string()))?;
                let text = String::from_utf8(plain)
                    .map_err(|_| fail("dispatch", "stored SSH key is not text"))?;
                Credential::Key(Box::new(
                    crate::secrets::ssh_keys::private_key(&text)
                        .map_err(|e| fail("dispatch", e.0))?,
                ))
            }
            (Some("password"), _, Some(sealed)) => {
                let plain = self
                    .keys
                    .decrypt(sealed)
                    .map_err(|e| fail("dispatch", e.to_string()))?;
                Credential::Password(
                    String::from_utf8(plain)
                        .map_err(|_| fail("dispatch", "stored password is not text"))?,
                )
            }
            _ => {
                return Err(fail(
                    "dispatch",
                    "the server's credentials were erased (the server was deleted)",
                ))
            }
        };

        // The same signed job an agent would get, checked the same way.
        let binding = credential.binding();
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| fail("dispatch", e.to_string()))?;
        let ring = self.job_keys.ring();
        let signed = sign::sign(&client, &self.keys, job, binding, &ring.current)
            .await
            .map_err(|e| fail("dispatch", e.to_string()))?;
        drop(client);
        let verifying = [ring.current.verifying_key()];
        let payload = verify(
            &signed,
            &Expectations {
                keys: &verifying,
                server_id,
                certificate_fingerprint: binding,
                highest_sequence: highest,
                now: Utc::now().timestamp(),
            },
        )
        .map_err(|e| fail("verify", e.to_string()))?;
        let sequence = i64::try_from(payload.sequence).unwrap_or(i64::MAX);
        let raised = self
            .pool
            .get()
            .await
            .map_err(|e| fail("dispatch", e.to_string()))?
            .execute(
                "UPDATE servers SET ssh_highest_sequence = $2 WHERE id = $1 AND ssh_highest_sequence < $2",
                &[&server_id, &sequence],
            )
            .await
            .map_err(db)?;
        if raised == 0 {
            return Err(fail(
                "verify",
                format!("replayed job: sequence {sequence} already ran on this server"),
            ));
        }
        let nonce = run_nonce(rand::random());
        let script =
            script_for(&payload.task, job.id, &nonce).map_err(|e| fail("verify", e.to_string()))?;

        // The whole deploy has a deadline: every hook's timeout, the fetch's share and a
        // margin, and never more than the control plane's maximum. A server that never answers
        // or never closes its channel cannot hold a slot for ever.
        let deadline = match &payload.task {
            JobTask::Deploy(spec) => {
                let hooks = spec.hooks.build.len()
                    + spec.hooks.pre_switch.len()
                    + spec.hooks.post_switch.len()
                    + usize::from(spec.health_check.is_some());
                let steps = u32::try_from(hooks + 2).unwrap_or(u32::MAX);
                Duration::from_secs(u64::from(spec.hook_timeout_secs))
                    .saturating_mul(steps)
                    .saturating_add(Duration::from_secs(60))
            }
            JobTask::Rollback(_) | JobTask::ForgetEnv(_) | JobTask::UpgradeAgent(_) => {
                Duration::from_secs(120)
            }
        }
        .min(self.max_job);
        // The deadline covers connecting and authenticating too: a server that completes the
        // key exchange and then stalls must not hold a slot either.
        let work = async {
            let session = self
                .connect(server_id, &host, port, &user, credential, pinned)
                .await?;
            let outcome = self.run_script(&session, job.id, &script, &nonce).await;
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "deploy finished", "en")
                .await;
            outcome
        };
        let (outcome, exit) = match tokio::time::timeout(deadline, work).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                return Err(fail(
                    "run",
                    format!(
                        "deadline exceeded: the deploy ran longer than {}s and was stopped",
                        deadline.as_secs()
                    ),
                ))
            }
        };
        Ok(JobResult::from_run(&outcome, exit))
    }

    async fn connect(
        &self,
        server_id: Uuid,
        host: &str,
        port: u16,
        user: &str,
        credential: Credential,
        pinned: Option<String>,
    ) -> Result<client::Handle<HostKeyCheck>, Failure> {
        let pinned_key = match &pinned {
            Some(line) => {
                Some(crate::secrets::ssh_keys::public_key(line).map_err(|e| fail("connect", e.0))?)
            }
            None => None,
        };
        let seen = Arc::new(Mutex::new(None));
        let handler = HostKeyCheck {
            pinned: pinned_key.clone(),
            seen: seen.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        // Resolved here and checked address by address; the connection goes to the checked
        // addresses only (no second lookup that could answer differently).
        let resolved: Vec<std::net::SocketAddr> = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((host, port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            _ => return Err(fail("connect", format!("cannot resolve {host}"))),
        };
        let allowed: Vec<std::net::SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|a| self.targets.allows(*a))
            .collect();
        if allowed.is_empty() {
            // Said no more precisely: the tenant learns nothing about what is denied or why.
            tracing::info!(%server_id, %host, port, "SSH target denied by the network policy");
            return Err(fail("connect", format!("{host}:{port} is unreachable")));
        }
        let connecting = client::connect(config, allowed.as_slice(), handler);
        let mut session = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => {
                let presented = seen.lock().ok().and_then(|s| s.clone());
                return Err(match (pinned_key, presented) {
                    (Some(expected), Some(got)) if expected.key_data() != got.key_data() => fail(
                        "connect",
                        format!(
                            "host key changed: {host}:{port} presented {} but {} is pinned; refusing to \
                             connect (if the server was reinstalled, delete and re-add it)",
                            crate::secrets::ssh_keys::fingerprint(&got),
                            crate::secrets::ssh_keys::fingerprint(&expected)
                        ),
                    ),
                    _ => fail("connect", format!("cannot reach {host}:{port} over SSH: {e}")),
                });
            }
            Err(_) => {
                return Err(fail(
                    "connect",
                    format!("cannot reach {host}:{port}: timed out"),
                ))
            }
        };
        let auth = match credential {
            Credential::Key(key) => session
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(*key), None))
                .await
                .map(|r| r.success())
                .map_err(|e| fail("connect", format!("SSH authentication error: {e}")))?,
            Credential::Password(password) => session
                .authenticate_password(user, password)
                .await
                .map(|r| r.success())
                .map_err(|e| fail("connect", format!("SSH authentication error: {e}")))?,
        };
        if !auth {
            return Err(fail(
                "connect",
                format!(
                    "SSH authentication failed for {user}@{host}: the key may have been removed from \
                     authorized_keys (or the password changed)"
                ),
            ));
        }
        // First successful connection: pin the host key it presented.
        if pinned.is_none() {
            if let Some(key) = seen.lock().ok().and_then(|s| s.clone()) {
                if let (Ok(line), Ok(client)) = (key.to_openssh(), self.pool.get().await) {
                    let _ = client
                        .execute(
                            "UPDATE servers SET host_key = $2 WHERE id = $1 AND host_key IS NULL",
                            &[&server_id, &line],
                        )
                        .await;
                }
            }
        }
        Ok(session)
    }

    /// Pipes the script into `sh -s` on one channel and reads its output back.
    async fn run_script(
        &self,
        session: &client::Handle<HostKeyCheck>,
        job_id: Uuid,
        script: &str,
        nonce: &str,
    ) -> Result<(Outcome, ScriptExit), Failure> {
        let mut channel = session
            .channel_open_session()
            .await
            .map_err(|e| fail("connect", format!("cannot open an SSH channel: {e}")))?;
        channel
            .exec(true, "sh -s")
            .await
            .map_err(|e| fail("connect", format!("cannot start sh: {e}")))?;
        channel
            .data(script.as_bytes())
            .await
            .map_err(|e| fail("connect", format!("cannot send the deploy script: {e}")))?;
        channel
            .eof()
            .await
            .map_err(|e| fail("connect", format!("cannot send the deploy script: {e}")))?;
        let mut output = ScriptOutput::new(nonce);
        let mut status = None;
        let mut batch: Vec<LogLine> = Vec::new();
        loop {
            let Some(message) = channel.wait().await else {
                break;
            };
            match message {
                ChannelMsg::Data { ref data } => {
                    batch.extend(output.read(OutputStream::Stdout, data))
                }
                ChannelMsg::ExtendedData { ref data, .. } => {
                    batch.extend(output.read(OutputStream::Stderr, data))
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    status = Some(i32::try_from(exit_status).unwrap_or(i32::MAX))
                }
                ChannelMsg::ExitSignal { .. } => status = None,
                _ => {}
            }
            if batch.len() >= 100 {
                self.log(job_id, std::mem::take(&mut batch)).await;
            }
        }
        batch.extend(output.end(OutputStream::Stdout));
        batch.extend(output.end(OutputStream::Stderr));
        self.log(job_id, batch).await;
        Ok((output.into_outcome(), ScriptExit::from_status(status)))
    }
}

enum Credential {
    Key(Box<russh::keys::PrivateKey>),
    Password(String),
}

impl Credential {
    /// What the signed job is bound to: the login key (SHA-256 of its public half), or for
    /// password logins a fixed marker.
    fn binding(&self) -> [u8; 32] {
        match self {
            Credential::Key(key) => crate::secrets::ssh_keys::binding(key.public_key()),
            Credential::Password(_) => Sha256::digest(b"sensei ssh password login").into(),
        }
    }
}

/// Accepts the pinned host key only (or, when none is pinned yet, records what was presented).
struct HostKeyCheck {
    pinned: Option<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(key.clone());
        }
        Ok(match &self.pinned {
            Some(pinned) => pinned.key_data() == key.key_data(),
            None => true,
        })
    }
}
