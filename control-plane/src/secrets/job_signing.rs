//! The control plane's Ed25519 job-signing keys: created at first start, stored sealed under
//! the field key in `signing_keys`, shared by every replica. Agents pin the public half of
//! the current key at enrollment. During a rotation
//! (`crate::runners::agent::job_key_rotation`) the key being replaced stays as
//! `job-signing.previous` until `job-key retire`, and endorses the new one.
//!
//! The keys a replica signs with are a [`JobKeys`] handle, reloaded when a rotation or a
//! retirement anywhere is announced (`NOTIFY`), so no restart is needed.

use std::sync::Arc;

use deadpool_postgres::Pool;
use ed25519_dalek::SigningKey;
use sensei_shared::job_key::JobKeyEndorsement;
use sensei_shared::protocol::ControlMessage;
use tokio::sync::watch;

use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::pki::PkiError;

/// The row of the current key.
pub const NAME: &str = "job-signing";
/// The row of the key being rotated out.
pub const PREVIOUS: &str = "job-signing.previous";

/// Loads the current key, creating it on the very first start.
pub async fn load_or_create(pool: &Pool, keys: &FieldKeys) -> Result<SigningKey, PkiError> {
    let client = pool.get().await?;
    let fresh = SigningKey::generate(&mut rand::rngs::OsRng);
    // Replicas starting together: the first insert wins, everyone reads the stored row.
    client
        .execute(
            "INSERT INTO signing_keys (name, public_key, private_key_ciphertext) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            &[
                &NAME,
                &fresh.verifying_key().to_bytes().as_slice(),
                &keys.encrypt(&fresh.to_bytes()),
            ],
        )
        .await?;
    load(&**client, keys, NAME)
        .await?
        .ok_or_else(|| PkiError::Db("the job-signing key vanished".into()))
}

/// The key stored under `name`, if any, checked against its public half.
pub async fn load(
    client: &impl tokio_postgres::GenericClient,
    keys: &FieldKeys,
    name: &str,
) -> Result<Option<SigningKey>, PkiError> {
    let Some(row) = client
        .query_opt(
            "SELECT public_key, private_key_ciphertext FROM signing_keys WHERE name = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let secret = keys
        .decrypt(row.get::<_, &str>(1))
        .map_err(|_| PkiError::WrongFieldKey("job-signing"))?;
    let secret: [u8; 32] = secret
        .try_into()
        .map_err(|_| PkiError::Db(format!("stored key {name} has the wrong length")))?;
    let key = SigningKey::from_bytes(&secret);
    let public: &[u8] = row.get(0);
    if public != key.verifying_key().to_bytes().as_slice() {
        return Err(PkiError::Db(format!(
            "stored key {name}: the public key does not match its private key"
        )));
    }
    Ok(Some(key))
}

/// The job-signing keys the control plane holds: the current one, and during a rotation the
/// one it replaces.
pub struct JobKeyRing {
    /// The newest key: signs the jobs of servers whose agent acknowledged it, and every job
    /// once the rotation is retired.
    pub current: SigningKey,
    /// The key being replaced, until `job-key retire`.
    pub previous: Option<SigningKey>,
    /// `previous` endorsing `current`, made once when the ring is loaded.
    pub endorsement: Option<JobKeyEndorsement>,
}

impl JobKeyRing {
    pub fn new(current: SigningKey, previous: Option<SigningKey>) -> Self {
        let endorsement = previous
            .as_ref()
            .map(|p| JobKeyEndorsement::sign(p, &current.verifying_key()));
        Self {
            current,
            previous,
            endorsement,
        }
    }

    /// The public half of the current key.
    pub fn current_public(&self) -> [u8; 32] {
        self.current.verifying_key().to_bytes()
    }

    /// The key that signs the jobs of a server whose agent acknowledged `acknowledged` (the
    /// newest key it named, or was given at enrollment): the current key once it is that
    /// one, or when no rotation is under way; the previous key otherwise.
    pub fn for_server(&self, acknowledged: Option<&[u8]>) -> &SigningKey {
        match &self.previous {
            Some(previous) if acknowledged != Some(self.current_public().as_slice()) => previous,
            _ => &self.current,
        }
    }

    /// What to tell an agent pinning the job keys `pinned`, if anything:
    /// - during a rotation, the new key endorsed by the previous one, unless the agent pins
    ///   it already or pins no key that could endorse it;
    /// - after a rotation was retired, to an agent pinning the current key and others, that
    ///   the others are retired.
    pub fn news_for(&self, pinned: &[[u8; 32]]) -> Option<ControlMessage> {
        let current = self.current_public();
        let pins_current = pinned.contains(&current);
        match (&self.previous, &self.endorsement) {
            (Some(previous), Some(endorsement)) => (!pins_current
                && pinned.contains(&previous.verifying_key().to_bytes()))
            .then(|| ControlMessage::JobKeyEndorsed {
                new_key: endorsement.new_key,
                endorser: endorsement.endorser,
                signature: endorsement.signature.clone(),
            }),
            _ => {
                let retired: Vec<[u8; 32]> =
                    pinned.iter().filter(|k| **k != current).copied().collect();
                (pins_current && !retired.is_empty())
                    .then_some(ControlMessage::JobKeyRetired { retired, current })
            }
        }
    }
}

/// Loads the ring, creating the key on the very first start.
pub async fn load_ring(pool: &Pool, keys: &FieldKeys) -> Result<JobKeyRing, PkiError> {
    let current = load_or_create(pool, keys).await?;
    let client = pool.get().await?;
    let previous = load(&**client, keys, PREVIOUS).await?;
    Ok(JobKeyRing::new(current, previous))
}

/// The job-signing keys one replica works with, kept current while it runs: a `job-key
/// rotate` or `job-key retire` run anywhere reaches every replica as a notification, and
/// [`follow`] reloads. Signing code reads [`JobKeys::ring`] for each job.
pub struct JobKeys {
    ring: watch::Sender<Arc<JobKeyRing>>,
}

impl JobKeys {
    pub fn new(ring: JobKeyRing) -> Arc<Self> {
        Arc::new(Self {
            ring: watch::Sender::new(Arc::new(ring)),
        })
    }

    /// The keys now.
    pub fn ring(&self) -> Arc<JobKeyRing> {
        self.ring.borrow().clone()
    }

    /// Reloads the keys from the database.
    pub async fn reload(&self, pool: &Pool, keys: &FieldKeys) -> Result<(), PkiError> {
        let ring = load_ring(pool, keys).await?;
        tracing::info!(
            current = %hex::encode(ring.current_public()),
            previous = ?ring.previous.as_ref().map(|p| hex::encode(p.verifying_key().as_bytes())),
            "job-signing keys loaded"
        );
        self.ring.send_replace(Arc::new(ring));
        Ok(())
    }

    /// Waits until the agent pinning the job keys `pinned` has a change to follow (a
    /// rotation, or its retirement), and returns the message that tells it. Waits for ever
    /// when none comes (the watch lives as long as the session).
    pub async fn watch(&self, pinned: &[[u8; 32]]) -> ControlMessage {
        let mut changes = self.ring.subscribe();
        loop {
            {
                if let Some(news) = changes.borrow_and_update().news_for(pinned) {
                    return news;
                }
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> [u8; 32] {
        key(seed).verifying_key().to_bytes()
    }

    /// During a rotation: a server that acknowledged the new key gets jobs signed by it, any
    /// other by the old key; an agent pinning the old key is sent the endorsement, one that
    /// pins the new one (it acknowledged) or neither is told nothing.
    #[test]
    fn during_a_rotation_only_acknowledging_servers_get_the_new_key() {
        let ring = JobKeyRing::new(key(2), Some(key(1)));
        assert_eq!(
            ring.for_server(Some(&public(2))).verifying_key().to_bytes(),
            public(2)
        );
        for other in [None, Some(public(1).as_slice()), Some(&[0u8; 3][..])] {
            assert_eq!(ring.for_server(other).verifying_key().to_bytes(), public(1));
        }
        match ring.news_for(&[public(1)]) {
            Some(ControlMessage::JobKeyEndorsed {
                new_key,
                endorser,
                signature,
            }) => {
                let endorsement = JobKeyEndorsement {
                    new_key,
                    endorser,
                    signature,
                };
                let set = sensei_shared::job_key::JobKeySet::new(&[public(1)]).expect("set");
                assert_eq!(
                    set.with_endorsed(&endorsement)
                        .expect("verifies")
                        .expect("new")
                        .raw(),
                    [public(1), public(2)]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.news_for(&[public(1), public(2)]), None);
        assert_eq!(ring.news_for(&[public(9)]), None);
    }

    /// After the retirement every job is signed by the current key, and an agent pinning it
    /// and others is told to unpin the others.
    #[test]
    fn after_the_retirement_only_the_current_key_signs() {
        let ring = JobKeyRing::new(key(2), None);
        for acknowledged in [None, Some(public(1).as_slice()), Some(public(2).as_slice())] {
            assert_eq!(
                ring.for_server(acknowledged).verifying_key().to_bytes(),
                public(2)
            );
        }
        assert_eq!(
            ring.news_for(&[public(1), public(2)]),
            Some(ControlMessage::JobKeyRetired {
                retired: vec![public(1)],
                current: public(2)
            })
        );
        assert_eq!(ring.news_for(&[public(2)]), None);
        // A stranded agent (only the retired key) cannot be told anything it could check.
        assert_eq!(ring.news_for(&[public(1)]), None);
    }
}
