//! The signed job envelope: what the control plane asks a server to do, bound to that server.
//!
//! A [`SignedJob`] is the encoded [`JobPayload`] and an Ed25519 signature over it by the
//! control plane's job-signing key. The payload binds the job id, the target server id and
//! the SHA-256 fingerprint of its agent certificate, a per-server sequence number, a
//! validity window and the task. [`verify`] is everything an agent (or the SSH runner) checks
//! before it does anything; it is pure, so every refusal is tested without a clock or socket.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, CodecError};

/// Signatures cover this prefix and the payload, so that a signature made for anything else
/// with the same key can never pass as a job.
const DOMAIN: &[u8] = b"sensei-job-v1\0";

/// How far the agent's clock may lag the control plane's before a fresh job looks early.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Shell commands run in the release directory at each stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    pub build: Vec<String>,
    pub pre_switch: Vec<String>,
    pub post_switch: Vec<String>,
}

/// Everything a deploy needs, resolved by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub repo_url: String,
    /// Branch, tag or commit; resolved to a commit on the server.
    pub git_ref: String,
    /// The new release's directory name; sorts by time.
    pub release_id: String,
    pub deploy_path: String,
    pub keep_releases: u32,
    /// Relative paths kept across releases; a trailing `/` marks a directory.
    pub shared_paths: Vec<String>,
    pub hooks: Hooks,
    pub health_check: Option<String>,
    /// Written to `shared/.env` (mode 0600).
    pub env: Vec<(String, String)>,
    /// Longest a single hook or the health check may run.
    pub hook_timeout_secs: u32,
    /// The exact commit to deploy (a rollout's approved commit). It must be the ref's commit
    /// or in its history as fetched on the server; otherwise the deploy fails with "commit
    /// mismatch".
    pub expected_commit: Option<String>,
}

/// Switch back to an earlier release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackSpec {
    pub deploy_path: String,
    /// The release to return to; `None`: the previous good one before `current`.
    pub to_release: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// One task per job, built once and moved a few times: boxing the deploy would cost an
// allocation for nothing measurable.
#[allow(clippy::large_enum_variant)]
pub enum JobTask {
    Deploy(DeploySpec),
    Rollback(RollbackSpec),
    /// Remove the environment file a deleted project left (`shared/.env`); the releases and
    /// the running application stay.
    ForgetEnv(ForgetEnvSpec),
    /// Upgrade the agent's own package to an exact version (an upgrade rollout's job). Only
    /// agents run it; the agent checks the version again before it does anything.
    UpgradeAgent(UpgradeAgentSpec),
}

impl JobTask {
    /// The deploy directory the task works in; an agent upgrade works in none.
    pub fn deploy_path(&self) -> Option<&str> {
        match self {
            Self::Deploy(spec) => Some(&spec.deploy_path),
            Self::Rollback(spec) => Some(&spec.deploy_path),
            Self::ForgetEnv(spec) => Some(&spec.deploy_path),
            Self::UpgradeAgent(_) => None,
        }
    }
}

/// Upgrade the agent's package to `version`, a Debian version
/// ([`crate::upgrade::check_package_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeAgentSpec {
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetEnvSpec {
    pub deploy_path: String,
}

/// What is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPayload {
    pub job_id: Uuid,
    pub server_id: Uuid,
    /// SHA-256 of the DER certificate of the agent the job is for.
    pub certificate_fingerprint: [u8; 32],
    /// Strictly increasing per server; an agent runs each number at most once.
    pub sequence: u64,
    /// Unix seconds.
    pub not_before: i64,
    pub expires_at: i64,
    pub task: JobTask,
}

/// A payload and its signature, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedJob {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

impl SignedJob {
    pub fn sign(payload: &JobPayload, key: &SigningKey) -> Result<Self, CodecError> {
        let bytes = codec::encode(payload)?;
        let signature = key.sign(&signed_message(&bytes));
        Ok(Self {
            payload: bytes,
            signature: signature.to_bytes().to_vec(),
        })
    }
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + payload.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(payload);
    message
}

/// What the receiving side knows and checks the job against.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// The job-signing keys the receiver pins (the one from enrollment, and any a pinned one
    /// endorsed during a rotation: `crate::job_key`); any of them may have signed the job.
    pub keys: &'a [VerifyingKey],
    pub server_id: Uuid,
    pub certificate_fingerprint: [u8; 32],
    /// The highest sequence number already run (0: none).
    pub highest_sequence: u64,
    /// Unix seconds.
    pub now: i64,
}

/// Why a job was refused. Each reason is reported back to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobRejection {
    #[error(
        "bad signature: the job was not signed by a job-signing key this agent pins, or was \
         altered (an agent that missed a job-key rotation must be enrolled again)"
    )]
    BadSignature,
    #[error("malformed job: {0}")]
    Malformed(String),
    #[error("job is for server {target}, this is server {this}")]
    WrongServer { target: Uuid, this: Uuid },
    #[error("job is bound to another agent certificate")]
    WrongCertificate,
    #[error("replayed job: sequence {sequence} is not above {highest}, the highest already run")]
    Replay { sequence: u64, highest: u64 },
    #[error("job is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: i64, now: i64 },
    #[error("job expired at {expires_at} (now {now})")]
    Expired { expires_at: i64, now: i64 },
}

/// Checks a job: signature first (over the raw bytes, before anything is decoded), then the
/// target, the certificate binding, the sequence and the validity window.
pub fn verify(job: &SignedJob, expect: &Expectations<'_>) -> Result<JobPayload, JobRejection> {
    let signature =
        Signature::from_slice(&job.signature).map_err(|_| JobRejection::BadSignature)?;
    let message = signed_message(&job.payload);
    if !expect
        .keys
        .iter()
        .any(|key| key.verify(&message, &signature).is_ok())
    {
        return Err(JobRejection::BadSignature);
    }
    let payload: JobPayload =
        codec::decode(&job.payload).map_err(|e| JobRejection::Malformed(e.to_string()))?;
    if payload.server_id != expect.server_id {
        return Err(JobRejection::WrongServer {
            target: payload.server_id,
            this: expect.server_id,
        });
    }
    if payload.certificate_fingerprint != expect.certificate_fingerprint {
        return Err(JobRejection::WrongCertificate);
    }
    if payload.sequence <= expect.highest_sequence {
        return Err(JobRejection::Replay {
            sequence: payload.sequence,
            highest: expect.highest_sequence,
        });
    }
    if expect.now + CLOCK_SKEW_SECS < payload.not_before {
        return Err(JobRejection::NotYetValid {
            not_before: payload.not_before,
            now: expect.now,
        });
    }
    if expect.now >= payload.expires_at {
        return Err(JobRejection::Expired {
            expires_at: payload.expires_at,
            now: expect.now,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn payload() -> JobPayload {
        JobPayload {
            job_id: Uuid::from_u128(1),
            server_id: Uuid::from_u128(2),
            certificate_fingerprint: [3u8; 32],
            sequence: 5,
            not_before: NOW - 10,
            expires_at: NOW + 600,
            task: JobTask::Deploy(DeploySpec {
                repo_url: "https://git.example/app.git".into(),
                git_ref: "main".into(),
                release_id: "20270115080000-000001".into(),
                deploy_path: "/srv/app".into(),
                keep_releases: 5,
                shared_paths: vec![".env".into(), "storage/".into()],
                hooks: Hooks {
                    build: vec!["make".into()],
                    ..Hooks::default()
                },
                health_check: Some("test -f index.html".into()),
                env: vec![("SECRET".into(), "s3cr3t".into())],
                hook_timeout_secs: 600,
                expected_commit: None,
            }),
        }
    }

    fn expectations(vk: &VerifyingKey) -> Expectations<'_> {
        Expectations {
            keys: std::slice::from_ref(vk),
            server_id: Uuid::from_u128(2),
            certificate_fingerprint: [3u8; 32],
            highest_sequence: 4,
            now: NOW,
        }
    }

    #[test]
    fn a_good_job_verifies() {
        let k = key();
        let vk = k.verifying_key();
        let job = SignedJob::sign(&payload(), &k).expect("sign");
        assert_eq!(verify(&job, &expectations(&vk)), Ok(payload()));
    }

    #[test]
    fn another_key_is_refused() {
        let job = SignedJob::sign(&payload(), &SigningKey::from_bytes(&[9u8; 32])).expect("sign");
        let vk = key().verifying_key();
        assert_eq!(
            verify(&job, &expectations(&vk)),
            Err(JobRejection::BadSignature)
        );
    }

    /// During a job-key rotation an agent pins two keys: a job signed by either verifies,
    /// one signed by neither does not.
    #[test]
    fn a_job_signed_by_any_pinned_key_verifies() {
        let (old, new) = (key(), SigningKey::from_bytes(&[8u8; 32]));
        let pinned = [old.verifying_key(), new.verifying_key()];
        let mut e = expectations(&pinned[0]);
        e.keys = &pinned;
        for signer in [&old, &new] {
            let job = SignedJob::sign(&payload(), signer).expect("sign");
            assert_eq!(verify(&job, &e), Ok(payload()));
        }
        let stranger =
            SignedJob::sign(&payload(), &SigningKey::from_bytes(&[9u8; 32])).expect("sign");
        assert_eq!(verify(&stranger, &e), Err(JobRejection::BadSignature));
        e.keys = &[];
        let job = SignedJob::sign(&payload(), &old).expect("sign");
        assert_eq!(verify(&job, &e), Err(JobRejection::BadSignature));
    }

    #[test]
    fn another_servers_job_is_refused() {
        let k = key();
        let vk = k.verifying_key();
        let mut p = payload();
        p.server_id = Uuid::from_u128(99);
        let job = SignedJob::sign(&p, &k).expect("sign");
        assert!(matches!(
            verify(&job, &expectations(&vk)),
            Err(JobRejection::WrongServer { .. })
        ));
        let mut p = payload();
        p.certificate_fingerprint = [4u8; 32];
        let job = SignedJob::sign(&p, &k).expect("sign");
        assert_eq!(
            verify(&job, &expectations(&vk)),
            Err(JobRejection::WrongCertificate)
        );
    }

    #[test]
    fn replays_are_refused() {
        let k = key();
        let vk = k.verifying_key();
        let job = SignedJob::sign(&payload(), &k).expect("sign");
        let mut e = expectations(&vk);
        e.highest_sequence = 5;
        assert_eq!(
            verify(&job, &e),
            Err(JobRejection::Replay {
                sequence: 5,
                highest: 5
            })
        );
        e.highest_sequence = 6;
        assert!(matches!(verify(&job, &e), Err(JobRejection::Replay { .. })));
    }

    #[test]
    fn the_validity_window_is_enforced() {
        let k = key();
        let vk = k.verifying_key();
        let job = SignedJob::sign(&payload(), &k).expect("sign");
        let mut e = expectations(&vk);
        e.now = NOW + 600;
        assert!(matches!(
            verify(&job, &e),
            Err(JobRejection::Expired { .. })
        ));
        e.now = NOW - 10 - CLOCK_SKEW_SECS - 1;
        assert!(matches!(
            verify(&job, &e),
            Err(JobRejection::NotYetValid { .. })
        ));
        e.now = NOW - 10 - CLOCK_SKEW_SECS;
        assert!(verify(&job, &e).is_ok(), "within the clock-skew allowance");
    }

    /// Flipping any single bit anywhere in the job as sent is refused: by the codec, or by
    /// the signature check. Exhaustive over every bit of the encoded envelope.
    #[test]
    fn flipping_any_bit_of_a_signed_job_is_refused() {
        let k = key();
        let vk = k.verifying_key();
        let wire = codec::encode(&SignedJob::sign(&payload(), &k).expect("sign")).expect("encode");
        let mut checked = 0;
        for i in 0..wire.len() {
            for bit in 0..8 {
                let mut tampered = wire.clone();
                tampered[i] ^= 1 << bit;
                let accepted = codec::decode::<SignedJob>(&tampered)
                    .ok()
                    .and_then(|job| verify(&job, &expectations(&vk)).ok());
                assert!(
                    accepted.is_none(),
                    "flip of bit {bit} of byte {i} was accepted"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, wire.len() * 8);
    }

    #[test]
    fn truncated_or_garbage_signature_is_refused() {
        let k = key();
        let vk = k.verifying_key();
        let mut job = SignedJob::sign(&payload(), &k).expect("sign");
        job.signature.truncate(10);
        assert_eq!(
            verify(&job, &expectations(&vk)),
            Err(JobRejection::BadSignature)
        );
        job.signature = vec![0; 64];
        assert_eq!(
            verify(&job, &expectations(&vk)),
            Err(JobRejection::BadSignature)
        );
    }
}
