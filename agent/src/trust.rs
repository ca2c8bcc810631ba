//! Following a CA or job-key rotation: for the whole session the agent keeps a trust stream
//! open (`sensei_shared::session::AgentTrust`) naming the CAs and the job-signing keys it
//! pins. When the control plane rotates its CA it answers with the new CA endorsed by the old
//! one; the agent pins the new CA only if a CA it already pins signed it ([`pin_endorsed`]),
//! and then renews its own certificate, which the control plane now issues from the new CA.
//! A job-key rotation is followed the same way ([`pin_endorsed_job_key`]); watching again,
//! naming the new key, is the acknowledgement after which the control plane signs this
//! server's jobs with it. Nothing here ends the session: a refused endorsement, or a control
//! plane too old to answer, leaves the agent as it was. A control plane that predates job-key
//! rotation drops the first watch (it cannot read it); the agent then watches with the plain
//! CA watch for the rest of the session.

use quinn::VarInt;
use sensei_certs::{CaEndorsement, EndorsementError, Fingerprint};
use sensei_shared::backoff::Backoff;
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::job_key::{JobKeyEndorsement, JobKeyError};
use sensei_shared::protocol::{close, ControlMessage};
use sensei_shared::session::{AgentTrust, AgentTrustAction, AgentTrustError, HelloSent};
use uuid::Uuid;

use crate::identity::{IdentityError, StateDir};
use crate::session::StreamEnd;

/// Why a new CA was not pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Endorsement(#[from] EndorsementError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("told to keep only the CA {0}, which this agent does not pin")]
    CurrentNotPinned(Fingerprint),
    #[error(transparent)]
    JobKey(#[from] JobKeyError),
}

/// Checks `endorsement` against the job-signing keys pinned in `state` and, if it holds, pins
/// the new key. Returns whether it was new. Nothing is written for an endorsement that does
/// not hold.
pub fn pin_endorsed_job_key(
    state: &StateDir,
    endorsement: &JobKeyEndorsement,
) -> Result<bool, PinError> {
    match state.job_keys()?.with_endorsed(endorsement)? {
        Some(next) => {
            state.store_job_keys(&next)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Unpins the job-signing keys in `retired` (a job-key rotation was retired), keeping
/// `current`, which must be pinned. Returns whether anything was unpinned.
pub fn unpin_retired_job_keys(
    state: &StateDir,
    retired: &[[u8; 32]],
    current: [u8; 32],
) -> Result<bool, PinError> {
    match state.job_keys()?.without_retired(retired, current)? {
        Some(next) => {
            state.store_job_keys(&next)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Checks `endorsement` against the CAs pinned in `state` and, if it holds, pins the new CA
/// (written as the DER that was checked). Returns whether it was new. Nothing is written for
/// an endorsement that does not hold.
pub fn pin_endorsed(state: &StateDir, endorsement: &CaEndorsement) -> Result<bool, PinError> {
    let identity = state.load()?;
    let der = sensei_certs::check_endorsement(&identity.ca_pem, endorsement)?;
    if sensei_certs::tls::fingerprints(&identity.ca_pem).contains(&Fingerprint::of_der(&der)) {
        return Ok(false);
    }
    state.pin_ca(&sensei_certs::tls::der_to_pem(&der))?;
    Ok(true)
}

/// Unpins the CAs in `retired` (a CA rotation was retired), keeping `current`, which must be
/// pinned: the control plane can narrow what the agent trusts, never empty it nor drop the CA
/// it says it uses. Returns whether anything was unpinned.
pub fn unpin_retired(
    state: &StateDir,
    retired: &[Fingerprint],
    current: Fingerprint,
) -> Result<bool, PinError> {
    let identity = state.load()?;
    let pinned = sensei_certs::tls::certs_from_pem(&identity.ca_pem).unwrap_or_default();
    if !pinned.iter().any(|der| Fingerprint::of_der(der) == current) {
        return Err(PinError::CurrentNotPinned(current));
    }
    let kept: Vec<_> = pinned
        .iter()
        .filter(|der| {
            let fp = Fingerprint::of_der(der);
            fp == current || !retired.contains(&fp)
        })
        .collect();
    if kept.len() == pinned.len() {
        return Ok(false);
    }
    let pem: String = kept
        .iter()
        .map(|der| sensei_certs::tls::der_to_pem(der))
        .collect();
    state.replace_pinned_cas(&pem)?;
    Ok(true)
}

/// How many trust watches one session opens at most.
const WATCHES_PER_SESSION: usize = 4;

/// Watches for a CA rotation for as long as the session lasts.
pub async fn trust_loop(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    state: &StateDir,
) -> StreamEnd {
    // A session follows a handful of changes at most (a rotation, its retirement): more is a
    // control plane that repeats itself, and is not worth a stream each.
    let mut job_keys = true;
    for _ in 0..WATCHES_PER_SESSION {
        match watch(connection, hello, server_id, state, job_keys).await {
            // The renewal ends the session (the control plane drains it): nothing more to
            // watch on this one.
            Ok(true) => {
                renew_under_new_ca(connection, hello, server_id, state).await;
                break;
            }
            // Followed; watch again with what is pinned now (a retirement may come on this
            // same session).
            Ok(false) => {}
            // A control plane older than job-key rotation cannot read the watch naming job
            // keys: it still follows CA rotations with the plain watch.
            Err(WatchEnd::Exchange(AgentTrustError::Unanswered)) if job_keys => {
                tracing::debug!(%server_id, "the control plane does not announce job-key rotations; watching for CA rotations only");
                job_keys = false;
            }
            // An older control plane cannot read the watch: nothing to follow on this
            // connection.
            Err(WatchEnd::Exchange(AgentTrustError::Unanswered)) => {
                tracing::debug!(%server_id, "the control plane does not announce CA rotations");
                break;
            }
            Err(e) => {
                tracing::warn!(%server_id, error = %e, "stopped watching for a CA rotation on this connection");
                break;
            }
        }
    }
    std::future::pending().await
}

#[derive(Debug, thiserror::Error)]
enum WatchEnd {
    #[error("cannot read the pinned CAs: {0}")]
    Identity(#[from] IdentityError),
    #[error("cannot open the trust stream")]
    Stream,
    #[error(transparent)]
    Exchange(#[from] AgentTrustError),
    #[error("refused the control plane's change to the pinned CAs or job-signing keys: {0}")]
    Refused(PinError),
}

/// One trust stream. Returns whether the agent must renew its certificate under the new CA.
async fn watch(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    state: &StateDir,
    job_keys: bool,
) -> Result<bool, WatchEnd> {
    let pinned: Vec<[u8; 32]> = sensei_certs::tls::fingerprints(&state.load()?.ca_pem)
        .iter()
        .map(|fp| *fp.as_bytes())
        .collect();
    let mut machine = if job_keys {
        AgentTrust::with_job_keys(hello, pinned, state.job_keys()?.raw())?
    } else {
        AgentTrust::new(hello, pinned)?
    };
    let (mut send, recv) = connection.open_bi().await.map_err(|_| WatchEnd::Stream)?;
    let mut recv = FrameReader::new(recv);
    let mut renew = false;
    let mut refusal = None;
    loop {
        while let Some(action) = machine.poll() {
            match action {
                AgentTrustAction::Send(message) => {
                    if write_frame(&mut send, &message).await.is_err() {
                        machine.handle_end()?;
                    }
                }
                AgentTrustAction::Check {
                    ca_pem,
                    endorser,
                    signature,
                    renew: renew_now,
                } => {
                    let endorsement = CaEndorsement {
                        ca_pem,
                        endorser: Fingerprint::from_raw(&endorser).ok_or(WatchEnd::Stream)?,
                        signature,
                    };
                    // Cannot be out of order: the machine asked for this check.
                    let _ = match pin_endorsed(state, &endorsement) {
                        Ok(new) => {
                            tracing::info!(%server_id, new, endorsed_by = %endorsement.endorser, "pinned the control plane's new CA, endorsed by a pinned one");
                            renew = renew_now;
                            machine.stored()
                        }
                        Err(e) => {
                            tracing::error!(%server_id, error = %e, "REFUSED a new CA from the control plane: it is not endorsed by a CA this agent pins. Nothing was changed");
                            refusal = Some(e);
                            machine.refused()
                        }
                    };
                }
                AgentTrustAction::Unpin { retired, current } => {
                    let retired: Vec<Fingerprint> = retired
                        .iter()
                        .filter_map(|fp| Fingerprint::from_raw(fp))
                        .collect();
                    let current = Fingerprint::from_raw(&current).ok_or(WatchEnd::Stream)?;
                    // Cannot be out of order: the machine asked for this.
                    let _ = match unpin_retired(state, &retired, current) {
                        Ok(changed) => {
                            tracing::info!(%server_id, changed, %current, "the control plane's CA rotation is over; unpinned the retired CA");
                            machine.stored()
                        }
                        Err(e) => {
                            tracing::error!(%server_id, error = %e, "refused to unpin CAs; nothing was changed");
                            refusal = Some(e);
                            machine.refused()
                        }
                    };
                }
                AgentTrustAction::CheckJobKey {
                    new_key,
                    endorser,
                    signature,
                } => {
                    let endorsement = JobKeyEndorsement {
                        new_key,
                        endorser,
                        signature,
                    };
                    // Cannot be out of order: the machine asked for this check.
                    let _ = match pin_endorsed_job_key(state, &endorsement) {
                        Ok(new) => {
                            tracing::info!(%server_id, new, new_key = %hex::encode(new_key), "pinned the control plane's new job-signing key, endorsed by a pinned one");
                            machine.stored()
                        }
                        Err(e) => {
                            tracing::error!(%server_id, error = %e, "REFUSED a new job-signing key from the control plane: it is not endorsed by a key this agent pins. Nothing was changed");
                            refusal = Some(e);
                            machine.refused()
                        }
                    };
                }
                AgentTrustAction::UnpinJobKeys { retired, current } => {
                    // Cannot be out of order: the machine asked for this.
                    let _ = match unpin_retired_job_keys(state, &retired, current) {
                        Ok(changed) => {
                            tracing::info!(%server_id, changed, current = %hex::encode(current), "the control plane's job-key rotation is over; unpinned the retired key");
                            machine.stored()
                        }
                        Err(e) => {
                            tracing::error!(%server_id, error = %e, "refused to unpin job-signing keys; nothing was changed");
                            refusal = Some(e);
                            machine.refused()
                        }
                    };
                }
                AgentTrustAction::Finish => {
                    let _ = send.finish();
                    return Ok(renew);
                }
                AgentTrustAction::Reset => {
                    let _ = send.reset(VarInt::from_u32(close::LEAVING));
                    return Err(match refusal.take() {
                        Some(e) => WatchEnd::Refused(e),
                        None => WatchEnd::Exchange(AgentTrustError::Unexpected("answer")),
                    });
                }
            }
        }
        let handled = match recv.next::<ControlMessage>().await {
            Ok(Some(message)) => machine.handle(message),
            Ok(None) | Err(_) => machine.handle_end(),
        };
        if let Err(e) = handled {
            let _ = send.reset(VarInt::from_u32(close::LEAVING));
            return Err(e.into());
        }
    }
}

/// Renews the certificate now, under the new CA, retrying with backoff while the session
/// lasts. A successful renewal makes the control plane close the session (between jobs) and
/// the agent reconnects with the new certificate.
async fn renew_under_new_ca(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    state: &StateDir,
) {
    let mut backoff = Backoff::agent_default();
    loop {
        match crate::renew::attempt(connection, hello, server_id, state).await {
            Ok(()) => {
                tracing::info!(%server_id, "certificate renewed under the new CA; reconnecting with it once no job runs");
                return;
            }
            Err(e) if e.is_final() => {
                tracing::error!(%server_id, error = %e, "renewal under the new CA refused for good; this agent must be enrolled again");
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(%server_id, error = %e, ?delay, "renewal under the new CA failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, IdentityMeta};
    use sensei_certs::CertificateAuthority;

    fn enrolled(dir: &std::path::Path, ca: &CertificateAuthority) -> StateDir {
        let state = StateDir::new(dir);
        state
            .save(&Identity {
                meta: IdentityMeta {
                    server_id: Uuid::new_v4(),
                    control_plane: "cp.example:7443".into(),
                    ca_fingerprint: ca.fingerprint().to_string(),
                    job_signing_public_key: "ab".repeat(32),
                    agent_version: crate::version().into(),
                    job_signing_keys: Vec::new(),
                },
                key_pem: "KEY".into(),
                cert_pem: "CERT".into(),
                ca_pem: ca.cert_pem().to_owned(),
            })
            .expect("save");
        state
    }

    fn pinned(state: &StateDir) -> Vec<Fingerprint> {
        sensei_certs::tls::fingerprints(&state.load().expect("load").ca_pem)
    }

    /// The rotation as an agent sees it: the new CA, endorsed by the pinned one, is added
    /// (once) next to it, and the agent then trusts a server certificate from either.
    #[test]
    fn a_ca_endorsed_by_the_pinned_one_is_pinned_next_to_it() {
        let dir = tempfile::tempdir().expect("dir");
        let old = CertificateAuthority::generate("old").expect("old");
        let new = CertificateAuthority::generate("new").expect("new");
        let state = enrolled(dir.path(), &old);
        let endorsement = old.endorse(&new).expect("endorse");
        assert!(pin_endorsed(&state, &endorsement).expect("pinned"));
        assert_eq!(pinned(&state), [old.fingerprint(), new.fingerprint()]);
        // Told again (a reconnection before the renewal): nothing changes.
        assert!(!pin_endorsed(&state, &endorsement).expect("again"));
        assert_eq!(pinned(&state), [old.fingerprint(), new.fingerprint()]);
        // The gateway's certificate from the new CA is trusted, as is the old one's.
        let trusted = state.load().expect("load").ca_pem;
        for ca in [&old, &new] {
            let server = ca
                .issue_server_certificate(&["cp.example".into()], time::Duration::days(1))
                .expect("server");
            let verifier = sensei_certs::tls::verifier_trusting(&trusted).expect("verifier");
            let leaf = rustls::pki_types::CertificateDer::from(server.cert_der);
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls::pki_types::ServerName::try_from("cp.example").expect("name"),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .expect("trusted");
        }
    }

    /// After the retirement the old CA is unpinned, never the current one, and never when the
    /// current one is not pinned.
    #[test]
    fn a_retired_ca_is_unpinned_but_never_the_current_one() {
        let dir = tempfile::tempdir().expect("dir");
        let old = CertificateAuthority::generate("old").expect("old");
        let new = CertificateAuthority::generate("new").expect("new");
        let state = enrolled(dir.path(), &old);
        pin_endorsed(&state, &old.endorse(&new).expect("endorse")).expect("pinned");
        // Told to keep a CA it does not pin: refused, nothing written.
        let stranger = CertificateAuthority::generate("stranger").expect("stranger");
        let before = std::fs::read(dir.path().join("ca.crt")).expect("ca");
        assert!(matches!(
            unpin_retired(&state, &[old.fingerprint()], stranger.fingerprint()),
            Err(PinError::CurrentNotPinned(_))
        ));
        assert_eq!(
            std::fs::read(dir.path().join("ca.crt")).expect("ca"),
            before
        );
        // Told to drop the current one too: it stays.
        assert!(unpin_retired(
            &state,
            &[old.fingerprint(), new.fingerprint()],
            new.fingerprint()
        )
        .expect("unpinned"));
        assert_eq!(pinned(&state), [new.fingerprint()]);
        assert!(!unpin_retired(&state, &[old.fingerprint()], new.fingerprint()).expect("again"));
    }

    /// A control plane (or whoever holds the connection) sends a "new CA" that the pinned CA
    /// did not sign: self-endorsed under the pinned CA's name, endorsed by a stranger, or a
    /// genuine endorsement with another certificate swapped in. Each is refused, and the
    /// pinned trust on disk is byte for byte what it was.
    #[test]
    fn a_forged_new_ca_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("dir");
        let old = CertificateAuthority::generate("old").expect("old");
        let new = CertificateAuthority::generate("new").expect("new");
        let attacker = CertificateAuthority::generate("attacker").expect("attacker");
        let state = enrolled(dir.path(), &old);
        let before = std::fs::read(dir.path().join("ca.crt")).expect("ca");

        let mut self_endorsed = attacker.endorse(&attacker).expect("self");
        self_endorsed.endorser = old.fingerprint();
        let by_stranger = attacker.endorse(&new).expect("stranger");
        let mut swapped = old.endorse(&new).expect("genuine");
        swapped.ca_pem = attacker.cert_pem().to_owned();
        for (forged, expected) in [
            (&self_endorsed, EndorsementError::BadSignature),
            (
                &by_stranger,
                EndorsementError::UnknownEndorser(attacker.fingerprint()),
            ),
            (&swapped, EndorsementError::BadSignature),
        ] {
            match pin_endorsed(&state, forged) {
                Err(PinError::Endorsement(e)) => assert_eq!(e, expected),
                other => panic!("a forged CA was not refused: {other:?}"),
            }
            assert_eq!(
                std::fs::read(dir.path().join("ca.crt")).expect("ca"),
                before,
                "the pinned trust changed"
            );
        }
        assert_eq!(pinned(&state), [old.fingerprint()]);
    }

    fn job_key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    /// An agent enrolled with the job key of seed 1.
    fn enrolled_with_job_key(dir: &std::path::Path) -> StateDir {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let state = enrolled(dir, &ca);
        let mut identity = state.load().expect("load");
        identity.meta.job_signing_public_key = hex::encode(job_key(1).verifying_key().as_bytes());
        state.save(&identity).expect("save");
        state
    }

    fn pinned_job_keys(state: &StateDir) -> Vec<[u8; 32]> {
        state.job_keys().expect("job keys").raw()
    }

    /// The job-key rotation as an agent sees it: the new key, endorsed by the pinned one, is
    /// added next to it (once), and after the retirement the old one goes, never the current.
    #[test]
    fn a_job_key_endorsed_by_the_pinned_one_is_pinned_then_the_old_one_unpinned() {
        let dir = tempfile::tempdir().expect("dir");
        let state = enrolled_with_job_key(dir.path());
        let (old, new) = (job_key(1), job_key(2));
        let endorsement = JobKeyEndorsement::sign(&old, &new.verifying_key());
        assert!(pin_endorsed_job_key(&state, &endorsement).expect("pinned"));
        let both = [
            old.verifying_key().to_bytes(),
            new.verifying_key().to_bytes(),
        ];
        assert_eq!(pinned_job_keys(&state), both);
        assert!(!pin_endorsed_job_key(&state, &endorsement).expect("again"));
        // What an older agent binary would read is the newest key.
        assert_eq!(
            state.load().expect("load").meta.job_signing_public_key,
            hex::encode(new.verifying_key().as_bytes())
        );
        // Told to keep a key it does not pin: refused, nothing written.
        let before = std::fs::read(dir.path().join("agent.json")).expect("meta");
        assert!(matches!(
            unpin_retired_job_keys(&state, &both, job_key(9).verifying_key().to_bytes()),
            Err(PinError::JobKey(JobKeyError::CurrentNotPinned(_)))
        ));
        assert_eq!(
            std::fs::read(dir.path().join("agent.json")).expect("meta"),
            before
        );
        assert!(unpin_retired_job_keys(&state, &both, both[1]).expect("unpinned"));
        assert_eq!(pinned_job_keys(&state), [both[1]]);
    }

    /// A "new job key" that no pinned key signed: self-endorsed under the pinned key's name,
    /// endorsed by a stranger, a genuine endorsement with another key swapped in. Each is
    /// refused and `agent.json` is byte for byte what it was.
    #[test]
    fn a_forged_new_job_key_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("dir");
        let state = enrolled_with_job_key(dir.path());
        let (old, new, attacker) = (job_key(1), job_key(2), job_key(66));
        let before = std::fs::read(dir.path().join("agent.json")).expect("meta");
        let mut self_endorsed = JobKeyEndorsement::sign(&attacker, &attacker.verifying_key());
        self_endorsed.endorser = old.verifying_key().to_bytes();
        let by_stranger = JobKeyEndorsement::sign(&attacker, &new.verifying_key());
        let mut swapped = JobKeyEndorsement::sign(&old, &new.verifying_key());
        swapped.new_key = attacker.verifying_key().to_bytes();
        for (forged, expected) in [
            (&self_endorsed, JobKeyError::BadSignature),
            (
                &by_stranger,
                JobKeyError::UnknownEndorser(attacker.verifying_key().to_bytes()),
            ),
            (&swapped, JobKeyError::BadSignature),
        ] {
            match pin_endorsed_job_key(&state, forged) {
                Err(PinError::JobKey(e)) => assert_eq!(e, expected),
                other => panic!("a forged job key was not refused: {other:?}"),
            }
            assert_eq!(
                std::fs::read(dir.path().join("agent.json")).expect("meta"),
                before,
                "the pinned job keys changed"
            );
        }
        assert_eq!(pinned_job_keys(&state), [old.verifying_key().to_bytes()]);
    }
}
