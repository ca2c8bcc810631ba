//! Rotating the job-signing key. The key being replaced **endorses** its successor: it signs
//! the successor's public key behind a domain prefix, and an agent adds the successor to the
//! set of job keys it pins ([`JobKeySet`]) only if that signature verifies under a key it
//! already pins. A job is then accepted if any pinned key signed it ([`crate::job::verify`]).
//!
//! The prefix keeps the two kinds of signature apart: a job is signed over
//! `sensei-job-v1\0` and its payload, an endorsement over `sensei-job-key-endorsement-v1\0`
//! and a key. The two prefixes differ within their first bytes, so no job signature can pass
//! as an endorsement, nor the other way round.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::protocol::MAX_PINNED_JOB_KEYS;

/// Endorsements cover this prefix and the successor's public key.
const DOMAIN: &[u8] = b"sensei-job-key-endorsement-v1\0";

/// A new job-signing key, endorsed by the key it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKeyEndorsement {
    /// The successor's Ed25519 public key.
    pub new_key: [u8; 32],
    /// The endorsing (old) key.
    pub endorser: [u8; 32],
    /// Ed25519 by the endorser over the domain prefix and `new_key`.
    pub signature: Vec<u8>,
}

fn endorsed_message(new_key: &[u8; 32]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + new_key.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(new_key);
    message
}

impl JobKeyEndorsement {
    /// `old` endorses `new`.
    pub fn sign(old: &SigningKey, new: &VerifyingKey) -> Self {
        let new_key = new.to_bytes();
        Self {
            new_key,
            endorser: old.verifying_key().to_bytes(),
            signature: old.sign(&endorsed_message(&new_key)).to_bytes().to_vec(),
        }
    }
}

/// Why a change to the pinned job keys was refused. Nothing changes when one is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobKeyError {
    /// Only a pinned key can introduce another.
    #[error("the endorsing job-signing key {} is not one this agent pins", hex_short(.0))]
    UnknownEndorser([u8; 32]),
    /// Forged, or altered.
    #[error("the endorsement's signature does not verify under the pinned job-signing key")]
    BadSignature,
    /// Not an Ed25519 public key.
    #[error("{} is not a valid Ed25519 public key", hex_short(.0))]
    InvalidKey([u8; 32]),
    /// More keys than an agent pins at once.
    #[error("an agent pins at most {MAX_PINNED_JOB_KEYS} job-signing keys, not {0}")]
    TooMany(usize),
    /// An agent always pins at least one key.
    #[error("no job-signing key is pinned")]
    Empty,
    /// Told to keep a key it does not pin: the message is refused whole.
    #[error("told to keep only the job-signing key {}, which this agent does not pin", hex_short(.0))]
    CurrentNotPinned([u8; 32]),
    /// Told that an older key is current: a replica that missed the rotation (its keys not
    /// reloaded) must not make the agent drop the newer key its jobs are signed with.
    #[error("told that the job-signing key {} is current, but this agent pinned a newer one", hex_short(.0))]
    CurrentNotNewest([u8; 32]),
}

fn hex_short(key: &[u8; 32]) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The job-signing keys an agent pins: the one from its enrollment and any a pinned key
/// endorsed since, at most [`MAX_PINNED_JOB_KEYS`], in the order they were pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKeySet {
    keys: Vec<VerifyingKey>,
}

impl JobKeySet {
    /// The set of these keys (duplicates dropped): at least one, at most
    /// [`MAX_PINNED_JOB_KEYS`], each a valid Ed25519 key.
    pub fn new(raw: &[[u8; 32]]) -> Result<Self, JobKeyError> {
        let mut keys: Vec<VerifyingKey> = Vec::with_capacity(raw.len());
        for key in raw {
            let key = VerifyingKey::from_bytes(key).map_err(|_| JobKeyError::InvalidKey(*key))?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        match keys.len() {
            0 => Err(JobKeyError::Empty),
            n if n > MAX_PINNED_JOB_KEYS => Err(JobKeyError::TooMany(n)),
            _ => Ok(Self { keys }),
        }
    }

    /// The keys, oldest first.
    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// The keys as bytes, oldest first.
    pub fn raw(&self) -> Vec<[u8; 32]> {
        self.keys.iter().map(VerifyingKey::to_bytes).collect()
    }

    /// The key pinned last: the one the control plane signs with once this agent follows.
    pub fn newest(&self) -> &VerifyingKey {
        // Never empty (checked by every constructor).
        &self.keys[self.keys.len() - 1]
    }

    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.keys.iter().any(|k| k.as_bytes() == key)
    }

    /// The set with the endorsed key added, if `endorsement` was signed by a pinned key;
    /// `None` if the key is pinned already.
    pub fn with_endorsed(
        &self,
        endorsement: &JobKeyEndorsement,
    ) -> Result<Option<Self>, JobKeyError> {
        let endorser = self
            .keys
            .iter()
            .find(|k| k.as_bytes() == &endorsement.endorser)
            .ok_or(JobKeyError::UnknownEndorser(endorsement.endorser))?;
        let signature =
            Signature::from_slice(&endorsement.signature).map_err(|_| JobKeyError::BadSignature)?;
        endorser
            .verify(&endorsed_message(&endorsement.new_key), &signature)
            .map_err(|_| JobKeyError::BadSignature)?;
        if self.contains(&endorsement.new_key) {
            return Ok(None);
        }
        let mut raw = self.raw();
        raw.push(endorsement.new_key);
        Self::new(&raw).map(Some)
    }

    /// The set without the keys in `retired`, keeping `current` whatever `retired` says;
    /// refused if `current` is not pinned, or is not the newest key pinned (the control plane
    /// can narrow what the agent accepts, never empty it, drop the key it signs with, nor
    /// turn the agent back to an older key). `None` if nothing changes.
    pub fn without_retired(
        &self,
        retired: &[[u8; 32]],
        current: [u8; 32],
    ) -> Result<Option<Self>, JobKeyError> {
        if !self.contains(&current) {
            return Err(JobKeyError::CurrentNotPinned(current));
        }
        if self.newest().as_bytes() != &current {
            return Err(JobKeyError::CurrentNotNewest(current));
        }
        let kept: Vec<[u8; 32]> = self
            .raw()
            .into_iter()
            .filter(|k| *k == current || !retired.contains(k))
            .collect();
        if kept.len() == self.keys.len() {
            return Ok(None);
        }
        Self::new(&kept).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{verify, Expectations, JobPayload, JobTask, RollbackSpec, SignedJob};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn pub_of(seed: u8) -> [u8; 32] {
        key(seed).verifying_key().to_bytes()
    }

    #[test]
    fn an_endorsement_by_a_pinned_key_adds_the_new_key_once() {
        let set = JobKeySet::new(&[pub_of(1)]).expect("set");
        let endorsement = JobKeyEndorsement::sign(&key(1), &key(2).verifying_key());
        let next = set.with_endorsed(&endorsement).expect("ok").expect("new");
        assert_eq!(next.raw(), [pub_of(1), pub_of(2)]);
        assert_eq!(next.newest().to_bytes(), pub_of(2));
        // Told again: nothing to add.
        assert_eq!(next.with_endorsed(&endorsement), Ok(None));
        // The new key may endorse the next one in turn.
        let third = JobKeyEndorsement::sign(&key(2), &key(3).verifying_key());
        assert_eq!(
            next.with_endorsed(&third).expect("ok").expect("new").raw(),
            [pub_of(1), pub_of(2), pub_of(3)]
        );
    }

    /// Self-endorsed under a pinned key's name, endorsed by a stranger, a genuine endorsement
    /// with another key swapped in, a truncated signature: each refused, the set unchanged.
    #[test]
    fn forged_endorsements_are_refused() {
        let set = JobKeySet::new(&[pub_of(1)]).expect("set");
        let mut self_endorsed = JobKeyEndorsement::sign(&key(9), &key(9).verifying_key());
        self_endorsed.endorser = pub_of(1);
        let by_stranger = JobKeyEndorsement::sign(&key(9), &key(2).verifying_key());
        let mut swapped = JobKeyEndorsement::sign(&key(1), &key(2).verifying_key());
        swapped.new_key = pub_of(9);
        let mut truncated = JobKeyEndorsement::sign(&key(1), &key(2).verifying_key());
        truncated.signature.truncate(10);
        for (forged, expected) in [
            (&self_endorsed, JobKeyError::BadSignature),
            (&by_stranger, JobKeyError::UnknownEndorser(pub_of(9))),
            (&swapped, JobKeyError::BadSignature),
            (&truncated, JobKeyError::BadSignature),
        ] {
            assert_eq!(set.with_endorsed(forged), Err(expected));
        }
        assert_eq!(set.raw(), [pub_of(1)]);
    }

    /// A job signature is never an endorsement, and an endorsement never a job signature,
    /// even when the bytes signed are chosen by whoever asks for the signature.
    #[test]
    fn job_signatures_and_endorsements_cannot_pass_for_each_other() {
        let old = key(1);
        let set = JobKeySet::new(&[pub_of(1)]).expect("set");
        // A job whose payload is exactly a key: its signature, presented as an endorsement.
        let job = SignedJob {
            payload: pub_of(2).to_vec(),
            signature: Vec::new(),
        };
        let signed_over_key = {
            let mut message = b"sensei-job-v1\0".to_vec();
            message.extend_from_slice(&job.payload);
            old.sign(&message).to_bytes().to_vec()
        };
        let as_endorsement = JobKeyEndorsement {
            new_key: pub_of(2),
            endorser: pub_of(1),
            signature: signed_over_key,
        };
        assert_eq!(
            set.with_endorsed(&as_endorsement),
            Err(JobKeyError::BadSignature)
        );
        // An endorsement's signature, presented as a job's.
        let endorsement = JobKeyEndorsement::sign(&old, &key(2).verifying_key());
        let payload = JobPayload {
            job_id: uuid::Uuid::from_u128(1),
            server_id: uuid::Uuid::from_u128(2),
            certificate_fingerprint: [3; 32],
            sequence: 1,
            not_before: 0,
            expires_at: i64::MAX,
            task: JobTask::Rollback(RollbackSpec {
                deploy_path: "/srv/app".into(),
                to_release: None,
            }),
        };
        let mut job = SignedJob::sign(&payload, &old).expect("sign");
        job.signature = endorsement.signature;
        let keys = [old.verifying_key()];
        assert!(verify(
            &job,
            &Expectations {
                keys: &keys,
                server_id: uuid::Uuid::from_u128(2),
                certificate_fingerprint: [3; 32],
                highest_sequence: 0,
                now: 1,
            }
        )
        .is_err());
    }

    #[test]
    fn a_retirement_narrows_the_set_but_never_drops_the_current_key() {
        let set = JobKeySet::new(&[pub_of(1), pub_of(2)]).expect("set");
        // Told to keep a key it does not pin: refused whole.
        assert_eq!(
            set.without_retired(&[pub_of(1)], pub_of(9)),
            Err(JobKeyError::CurrentNotPinned(pub_of(9)))
        );
        // Told to drop the current one too: it stays.
        let narrowed = set
            .without_retired(&[pub_of(1), pub_of(2)], pub_of(2))
            .expect("ok")
            .expect("changed");
        assert_eq!(narrowed.raw(), [pub_of(2)]);
        assert_eq!(narrowed.without_retired(&[pub_of(1)], pub_of(2)), Ok(None));
        // A replica that missed the rotation names the old key as current and the new one as
        // retired: refused whole, the newer key stays.
        assert_eq!(
            set.without_retired(&[pub_of(2)], pub_of(1)),
            Err(JobKeyError::CurrentNotNewest(pub_of(1)))
        );
    }

    #[test]
    fn the_set_is_bounded_valid_and_never_empty() {
        assert_eq!(JobKeySet::new(&[]), Err(JobKeyError::Empty));
        let too_many: Vec<[u8; 32]> = (1..=MAX_PINNED_JOB_KEYS as u8 + 1).map(pub_of).collect();
        assert_eq!(
            JobKeySet::new(&too_many),
            Err(JobKeyError::TooMany(MAX_PINNED_JOB_KEYS + 1))
        );
        // Duplicates count once.
        assert_eq!(
            JobKeySet::new(&[pub_of(1), pub_of(1)]).expect("set").raw(),
            [pub_of(1)]
        );
        // A full set refuses one more, even genuinely endorsed.
        let full: Vec<[u8; 32]> = (1..=MAX_PINNED_JOB_KEYS as u8).map(pub_of).collect();
        let set = JobKeySet::new(&full).expect("full");
        let one_more = JobKeyEndorsement::sign(&key(1), &key(77).verifying_key());
        assert_eq!(
            set.with_endorsed(&one_more),
            Err(JobKeyError::TooMany(MAX_PINNED_JOB_KEYS + 1))
        );
        // Not a point on the curve.
        let bad = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .expect("an invalid key");
        assert_eq!(JobKeySet::new(&[bad]), Err(JobKeyError::InvalidKey(bad)));
    }
}
