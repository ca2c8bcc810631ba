//! The CAs one replica works with, kept current while it runs: a `ca rotate` or `ca retire`
//! run anywhere (`crate::runners::agent::ca_rotation`) reaches every replica as a notification on
//! the certificate channel, and [`follow`] reloads. From then on the gateway trusts the new
//! set of CAs, issues from the new one, presents the right server certificate, and every
//! agent watching for a rotation ([`watch_trust`]) is sent the endorsement.

use std::sync::Arc;

use deadpool_postgres::Pool;
use sensei_certs::tls::{GatewayCertificate, TlsConfigError};
use sensei_certs::{AgentCertificateSet, AgentClientVerifier, Fingerprint};
use sensei_shared::protocol::ControlMessage;
use tokio::sync::watch;

use super::AgentHub;
use crate::runners::agent::ca_rotation::{self, CaRing};
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::pki;

/// The current CA ring and what the gateway derives from it.
pub struct Authority {
    ring: watch::Sender<Arc<CaRing>>,
    /// Checks agents' certificates against every CA of the ring.
    pub verifier: Arc<AgentClientVerifier>,
    /// The gateway's server certificate, from the presented CA.
    pub certificate: Arc<GatewayCertificate>,
    /// The names the gateway's (and the API's) certificate is for.
    names: Vec<String>,
}

impl Authority {
    /// The authority for `ring`, the gateway presenting `chain_pem` (issued by the ring's
    /// presented CA for `names`).
    pub fn new(
        ring: CaRing,
        chain_pem: &str,
        key_pem: &str,
        names: Vec<String>,
        certificates: Arc<AgentCertificateSet>,
    ) -> Result<Arc<Self>, TlsConfigError> {
        Ok(Arc::new(Self {
            verifier: AgentClientVerifier::new(&ring.trusted_pem(), certificates)?,
            certificate: GatewayCertificate::new(chain_pem, key_pem)?,
            ring: watch::Sender::new(Arc::new(ring)),
            names,
        }))
    }

    /// The CAs now.
    pub fn ring(&self) -> Arc<CaRing> {
        self.ring.borrow().clone()
    }

    /// The fingerprint new enrollments pin (the CA the gateway presents).
    pub fn presented_fingerprint(&self) -> Fingerprint {
        self.ring.borrow().presented().fingerprint()
    }

    /// Reloads the CAs from the database and applies them.
    pub async fn reload(&self, pool: &Pool, keys: &FieldKeys) -> Result<(), pki::PkiError> {
        let ring = ca_rotation::load(pool, keys).await?;
        self.verifier
            .trust(&ring.trusted_pem())
            .map_err(|e| pki::PkiError::Db(format!("cannot trust the reloaded CAs: {e}")))?;
        let presented = ring.presented().fingerprint();
        if presented != self.presented_fingerprint() {
            let cert = pki::api_certificate(pool, keys, ring.presented(), &self.names).await?;
            self.certificate
                .replace(&cert.chain_pem, &cert.key_pem)
                .map_err(|e| {
                    pki::PkiError::Db(format!("cannot present the new certificate: {e}"))
                })?;
            tracing::info!(ca_fingerprint = %presented, "the agent gateway presents a certificate from the new CA");
        }
        tracing::info!(
            current = %ring.current.fingerprint(),
            previous = ?ring.previous.as_ref().map(|p| p.fingerprint().to_string()),
            "agent CAs loaded"
        );
        self.ring.send_replace(Arc::new(ring));
        Ok(())
    }
}

/// Reloads the CAs (and then every certificate, some of which a retirement retired) each
/// time the hub hears they changed, until `shutdown`.
pub async fn follow(
    authority: Arc<Authority>,
    hub: Arc<AgentHub>,
    pool: Pool,
    keys: Arc<FieldKeys>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = hub.ca_changed.notified() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = authority.reload(&pool, &keys).await {
            tracing::error!(error = %e, "reloading the agent CAs failed; still using the previous ones");
            continue;
        }
        if let Err(e) = super::cert_events::load_all(&pool, &hub).await {
            tracing::warn!(error = %crate::store::db::describe(&e), "reloading agent certificates after a CA change failed");
        }
    }
}

/// Waits until the agent pinning `pinned`, whose session certificate is `leaf_der`, has a
/// CA change to follow (a rotation, or its retirement), and returns the message that tells
/// it. Waits for ever when none comes
/// (the stream lives as long as the session).
pub async fn watch_trust(
    authority: &Authority,
    pinned: &[[u8; 32]],
    leaf_der: &[u8],
) -> ControlMessage {
    let mut changes = authority.ring.subscribe();
    loop {
        {
            if let Some(news) = changes.borrow_and_update().news_for(pinned, leaf_der) {
                return news;
            }
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
