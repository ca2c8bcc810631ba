//! Rotating the agents' CA (`sensei-control-plane ca rotate`, then `ca retire`).
//!
//! The CA is the `ca` row of `pki_material`, its key sealed under the field key like every
//! other. A rotation moves it to `ca.previous` and writes a new `ca`, in one transaction.
//! From then on, until `ca retire`:
//! - the gateway accepts agent certificates from both CAs;
//! - every certificate is issued by the new CA (enrollments and renewals);
//! - the gateway and the API still present their certificate from the *previous* CA, which
//!   is also the fingerprint new enrollments pin: an agent that has not heard of the new CA
//!   yet must still be able to connect, or it never would;
//! - every connected agent is sent the new CA endorsed by the previous one
//!   ([`sensei_certs::rotation`]), pins it, and renews its certificate under it.
//!
//! `ca retire` destroys the previous CA's key, retires every certificate it issued (an agent
//! that never moved must enroll again) and the gateway presents a certificate from the new CA
//! from then on. It refuses while a connected agent still holds only a certificate from the
//! previous CA, unless forced. Both steps are audited and told to every replica with a
//! `NOTIFY` on the agent-certificate channel.

use deadpool_postgres::Pool;
use sensei_certs::{CaEndorsement, CertificateAuthority, Fingerprint};
use sensei_shared::protocol::ControlMessage;
use serde_json::json;
use uuid::Uuid;

use super::cert_events;
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::pki::{self, PkiError};

/// The row of the CA being rotated out.
const PREVIOUS: &str = "ca.previous";

/// The CAs the control plane holds: the one that issues, and during a rotation the one it
/// replaces.
pub struct CaRing {
    /// Issues every agent certificate.
    pub current: CertificateAuthority,
    /// The CA being replaced, until `ca retire`.
    pub previous: Option<CertificateAuthority>,
    /// `previous` endorsing `current`, made once when the ring is loaded.
    pub endorsement: Option<CaEndorsement>,
}

impl CaRing {
    /// The CA whose certificate the gateway and the API present, and whose fingerprint new
    /// enrollments pin: the previous one while a rotation is under way.
    pub fn presented(&self) -> &CertificateAuthority {
        self.previous.as_ref().unwrap_or(&self.current)
    }

    /// Every CA an agent certificate may chain to, PEM.
    pub fn trusted_pem(&self) -> String {
        match &self.previous {
            Some(previous) => format!("{}{}", self.current.cert_pem(), previous.cert_pem()),
            None => self.current.cert_pem().to_owned(),
        }
    }

    /// What to tell an agent pinning `pinned` whose session certificate is `leaf_der`, if
    /// anything:
    /// - during a rotation, the new CA endorsed by the previous one (and whether to renew
    ///   under it), unless the agent pinned it and holds a certificate from it already, or
    ///   pins no CA that could endorse it;
    /// - after a rotation was retired, to an agent pinning the current CA and others, that
    ///   the others are retired.
    pub fn news_for(&self, pinned: &[[u8; 32]], leaf_der: &[u8]) -> Option<ControlMessage> {
        let current = *self.current.fingerprint().as_bytes();
        let pins_current = pinned.contains(&current);
        match (&self.previous, &self.endorsement) {
            (Some(previous), Some(endorsement)) => {
                if !pinned.contains(previous.fingerprint().as_bytes()) {
                    return None;
                }
                let renew = sensei_certs::issued_by(leaf_der, previous.cert_der());
                (renew || !pins_current).then(|| ControlMessage::CaEndorsed {
                    ca_pem: endorsement.ca_pem.clone(),
                    endorser: *endorsement.endorser.as_bytes(),
                    signature: endorsement.signature.clone(),
                    renew,
                })
            }
            _ => {
                let retired: Vec<[u8; 32]> = pinned
                    .iter()
                    .filter(|fp| **fp != current)
                    .copied()
                    .collect();
                (pins_current && !retired.is_empty())
                    .then_some(ControlMessage::CaRetired { retired, current })
            }
        }
    }
}

/// Loads the CA ring, creating the CA on the very first start.
pub async fn load(pool: &Pool, keys: &FieldKeys) -> Result<CaRing, PkiError> {
    let current = pki::certificate_authority(pool, keys).await?;
    let previous = match pki::load(pool, keys, PREVIOUS, "previous CA").await? {
        Some((cert, key, _)) => Some(CertificateAuthority::from_pem(&cert, &key)?),
        None => None,
    };
    let endorsement = match &previous {
        Some(previous) => Some(previous.endorse(&current)?),
        None => None,
    };
    Ok(CaRing {
        current,
        previous,
        endorsement,
    })
}

/// Why a rotation step was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaRotationError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "a CA rotation is already under way (the CA {0} is still accepted): finish it with \
         `ca retire` first"
    )]
    AlreadyRotating(Fingerprint),
    #[error("no CA rotation is under way: nothing to retire")]
    NotRotating,
    #[error(
        "{} connected agent(s) still hold only a certificate from the CA being retired: {}. \
         Wait until they renewed (`ca status`), or retire with --force: they are disconnected \
         and must enroll again",
        .0.len(),
        .0.iter().map(|s| format!("{} ({})", s.name, s.id)).collect::<Vec<_>>().join(", ")
    )]
    StillConnected(Vec<LaggingServer>),
}

impl From<tokio_postgres::Error> for CaRotationError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pki(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for CaRotationError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pki(e.into())
    }
}

/// A server whose agent has not followed a rotation: not moved to the current CA, or (in
/// [`super::job_key_rotation`]) not acknowledged the current job-signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaggingServer {
    pub id: Uuid,
    pub account_id: Uuid,
    pub name: String,
    pub connected: bool,
}

/// What `ca rotate` did.
#[derive(Debug)]
pub struct Rotated {
    pub previous: Fingerprint,
    pub current: Fingerprint,
}

/// Starts a rotation: the current CA becomes the previous one, a new CA issues from now on.
pub async fn rotate(pool: &Pool, keys: &FieldKeys) -> Result<Rotated, CaRotationError> {
    // The CA exists (a control plane that never started has none yet), and the audit chain
    // key these field keys open is loaded.
    let old = pki::certificate_authority(pool, keys).await?;
    audit::keys::load(pool, keys)
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Both rows locked: two rotations (or a rotation and a retirement) never interleave.
    let rows = tx
        .query(
            "SELECT name, cert_pem FROM pki_material WHERE name IN ('ca', $1) FOR UPDATE",
            &[&PREVIOUS],
        )
        .await?;
    for row in &rows {
        if row.get::<_, &str>(0) == PREVIOUS {
            let fp = sensei_certs::tls::first_cert_der(row.get(1))
                .map(|der| Fingerprint::of_der(&der))
                .map_err(PkiError::from)?;
            return Err(CaRotationError::AlreadyRotating(fp));
        }
    }
    // A distinct name, so that the two CAs are told apart by name as well as by key.
    let new = CertificateAuthority::generate(&format!(
        "Sensei control plane CA {}",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    ))
    .map_err(PkiError::from)?;
    let not_after =
        pki::to_chrono(sensei_certs::not_after(new.cert_pem()).map_err(PkiError::from)?);
    tx.execute(
        "UPDATE pki_material SET name = $1 WHERE name = 'ca'",
        &[&PREVIOUS],
    )
    .await?;
    tx.execute(
        "INSERT INTO pki_material (name, cert_pem, key_ciphertext, not_after) \
         VALUES ('ca', $1, $2, $3)",
        &[
            &new.cert_pem(),
            &keys.encrypt(new.key_pem().as_bytes()),
            &not_after,
        ],
    )
    .await?;
    // Certificates issued before the first rotation name no CA: they are the old one's.
    tx.execute(
        "UPDATE agent_certificates SET ca_fingerprint = $1 WHERE ca_fingerprint IS NULL",
        &[&old.fingerprint().as_bytes().as_slice()],
    )
    .await?;
    cert_events::notify_ca_changed(&tx).await?;
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "ca.rotated",
            target: None,
            outcome: Outcome::Success,
            metadata: json!({
                "previous_ca": old.fingerprint().to_string(),
                "new_ca": new.fingerprint().to_string(),
            }),
        },
    )
    .await
    .map_err(|e| PkiError::Db(e.to_string()))?;
    tx.commit().await?;
    Ok(Rotated {
        previous: old.fingerprint(),
        current: new.fingerprint(),
    })
}

/// Agent servers (not deleted) whose newest certificate was not issued by the CA
/// `current`: during a rotation, the agents that have not moved yet; after it, the ones that
/// must enroll again.
pub async fn servers_on_old_ca(
    client: &impl tokio_postgres::GenericClient,
    current: &Fingerprint,
    account: Option<Uuid>,
) -> Result<Vec<LaggingServer>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT s.id, s.account_id, s.name, s.connected_replica IS NOT NULL AS connected \
             FROM servers s \
             JOIN LATERAL (SELECT c.ca_fingerprint FROM agent_certificates c \
                           WHERE c.server_id = s.id AND c.revoked_at IS NULL \
                           ORDER BY c.issued_at DESC LIMIT 1) newest ON true \
             WHERE s.deleted_at IS NULL AND s.transport = 'agent' \
               AND ($2::uuid IS NULL OR s.account_id = $2) \
               AND newest.ca_fingerprint IS DISTINCT FROM $1 \
             ORDER BY s.name, s.id",
            &[&current.as_bytes().as_slice(), &account],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| LaggingServer {
            id: row.get(0),
            account_id: row.get(1),
            name: row.get(2),
            connected: row.get(3),
        })
        .collect())
}

/// What `ca retire` did.
#[derive(Debug)]
pub struct Retired {
    pub retired: Fingerprint,
    pub current: Fingerprint,
    /// Agents that never moved: their certificates are retired, they must enroll again.
    pub stranded: Vec<LaggingServer>,
    pub certificates_retired: u64,
}

/// Ends a rotation: the previous CA's key is destroyed and every certificate it issued is
/// retired. Refused while a connected agent still holds only a certificate from it, unless
/// `force`.
pub async fn retire(
    pool: &Pool,
    keys: &FieldKeys,
    force: bool,
) -> Result<Retired, CaRotationError> {
    audit::keys::load(pool, keys)
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT name, cert_pem FROM pki_material WHERE name IN ('ca', $1) FOR UPDATE",
            &[&PREVIOUS],
        )
        .await?;
    let fingerprint_of = |name: &str| -> Result<Option<Fingerprint>, CaRotationError> {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| {
                sensei_certs::tls::first_cert_der(r.get(1))
                    .map(|der| Fingerprint::of_der(&der))
                    .map_err(|e| CaRotationError::Pki(e.into()))
            })
            .transpose()
    };
    let (Some(previous), Some(current)) = (fingerprint_of(PREVIOUS)?, fingerprint_of("ca")?) else {
        return Err(CaRotationError::NotRotating);
    };
    let stranded = servers_on_old_ca(&*tx, &current, None).await?;
    let connected: Vec<LaggingServer> = stranded.iter().filter(|s| s.connected).cloned().collect();
    if !connected.is_empty() && !force {
        return Err(CaRotationError::StillConnected(connected));
    }
    let certificates_retired = tx
        .execute(
            "UPDATE agent_certificates SET retired_at = now() \
             WHERE ca_fingerprint = $1 AND retired_at IS NULL AND revoked_at IS NULL",
            &[&previous.as_bytes().as_slice()],
        )
        .await?;
    tx.execute("DELETE FROM pki_material WHERE name = $1", &[&PREVIOUS])
        .await?;
    cert_events::notify_ca_changed(&tx).await?;
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "ca.retired",
            target: None,
            outcome: Outcome::Success,
            metadata: json!({
                "retired_ca": previous.to_string(),
                "current_ca": current.to_string(),
                "forced": force,
                "certificates_retired": certificates_retired,
                "servers_to_enroll_again": stranded.len(),
                "connected_disconnected": connected.len(),
            }),
        },
    )
    .await
    .map_err(|e| PkiError::Db(e.to_string()))?;
    // Each account learns which of its servers must enroll again, in its own chain.
    for server in &stranded {
        audit::append(
            &tx,
            keys.audit_keys(),
            &AuditEvent {
                account_id: Some(server.account_id),
                actor: Actor::System,
                client_ip: None,
                user_agent: None,
                action: "agent.ca_retired",
                target: Some(("server", server.id)),
                outcome: Outcome::Success,
                metadata: json!({
                    "retired_ca": previous.to_string(),
                    "connected": server.connected,
                }),
            },
        )
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    }
    tx.commit().await?;
    Ok(Retired {
        retired: previous,
        current,
        stranded,
        certificates_retired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> CertificateAuthority {
        CertificateAuthority::generate(name).expect("ca")
    }

    fn leaf(ca: &CertificateAuthority) -> Vec<u8> {
        let request = sensei_certs::AgentKeyRequest::generate("agent").expect("key");
        let now = time::OffsetDateTime::now_utc();
        ca.sign_agent_csr(
            &request.csr_der,
            Uuid::new_v4(),
            now,
            now + time::Duration::days(1),
        )
        .expect("leaf")
        .cert_der
    }

    fn rotating() -> (CaRing, [u8; 32], [u8; 32]) {
        let (old, new) = (ca("old"), ca("new"));
        let endorsement = old.endorse(&new).expect("endorse");
        let (o, n) = (*old.fingerprint().as_bytes(), *new.fingerprint().as_bytes());
        (
            CaRing {
                current: new,
                previous: Some(old),
                endorsement: Some(endorsement),
            },
            o,
            n,
        )
    }

    /// Who is told what during a rotation: an agent on the old CA gets the endorsement and
    /// renews; one that pinned the new CA but still holds an old certificate renews again;
    /// one that moved waits; one pinning neither is told nothing it could check.
    #[test]
    fn during_a_rotation_only_agents_that_have_not_moved_are_told() {
        let (ring, old, new) = rotating();
        let on_old = leaf(ring.previous.as_ref().expect("previous"));
        let on_new = leaf(&ring.current);
        let renew = |m: Option<ControlMessage>| match m {
            Some(ControlMessage::CaEndorsed {
                renew, endorser, ..
            }) => {
                assert_eq!(endorser, old);
                Some(renew)
            }
            None => None,
            Some(other) => panic!("{other:?}"),
        };
        assert_eq!(renew(ring.news_for(&[old], &on_old)), Some(true));
        assert_eq!(renew(ring.news_for(&[old, new], &on_old)), Some(true));
        // Enrolled during the overlap: a certificate from the new CA, the old one pinned.
        assert_eq!(renew(ring.news_for(&[old], &on_new)), Some(false));
        assert_eq!(renew(ring.news_for(&[old, new], &on_new)), None);
        assert_eq!(renew(ring.news_for(&[[9; 32]], &on_old)), None);
    }

    /// After the retirement, an agent pinning the current CA and others is told to unpin the
    /// others; one pinning only the current one, or not pinning it, is told nothing.
    #[test]
    fn after_the_retirement_agents_unpin_the_others() {
        let (mut ring, old, new) = rotating();
        ring.previous = None;
        ring.endorsement = None;
        let on_new = leaf(&ring.current);
        assert_eq!(
            ring.news_for(&[old, new], &on_new),
            Some(ControlMessage::CaRetired {
                retired: vec![old],
                current: new
            })
        );
        assert_eq!(ring.news_for(&[new], &on_new), None);
        assert_eq!(ring.news_for(&[old], &on_new), None);
        assert_eq!(ring.presented().fingerprint().as_bytes(), &new);
        assert_eq!(
            sensei_certs::tls::fingerprints(&ring.trusted_pem()),
            [ring.current.fingerprint()]
        );
    }
}
