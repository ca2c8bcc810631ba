//! Enrollment: make a key pair here, send a CSR with the one-time token to the control plane
//! (authenticated by the CA fingerprint given on the command line, never trusted on first
//! use), and store the certificate, the CA and the job-signing key that come back.

use std::time::Duration;

use quinn::VarInt;
use sensei_certs::{AgentKeyRequest, Fingerprint, PinnedCaVerifier};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{close, EnrollRequest, EnrollResponse};
use uuid::Uuid;

use crate::identity::{Identity, IdentityError, IdentityMeta, StateDir};
use crate::transport::{self, TransportError, CONNECT_TIMEOUT};

/// What `sensei-agent enroll` was given.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub control_plane: String,
    pub token: String,
    pub ca_fingerprint: Fingerprint,
    pub expected_server_id: Option<Uuid>,
    pub state_dir: StateDir,
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server's CA is not the pinned one: possibly the wrong address, possibly an attack.
    #[error("refusing to enroll: {0}")]
    UntrustedControlPlane(String),
    #[error("cannot reach the control plane at {address}: {message}")]
    Unreachable { address: String, message: String },
    /// The control plane said no, and why.
    #[error("the control plane refused enrollment: {0}")]
    Refused(String),
    #[error("the control plane broke the enrollment protocol: {0}")]
    Protocol(String),
    #[error("cannot create a key pair: {0}")]
    Key(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Enrolls this server and stores its identity. Returns the stored identity.
pub async fn enroll(options: &EnrollOptions) -> Result<Identity, EnrollError> {
    let (remote, server_name) = transport::resolve(&options.control_plane).await?;
    let request_key =
        AgentKeyRequest::generate(&hostname()).map_err(|e| EnrollError::Key(e.to_string()))?;
    let verifier = PinnedCaVerifier::new(options.ca_fingerprint);
    let endpoint = transport::endpoint(remote)?;
    let config = transport::client_config(verifier.clone(), None)?;
    let unreachable = |message: String| EnrollError::Unreachable {
        address: options.control_plane.clone(),
        message,
    };
    let connecting = endpoint
        .connect_with(config, remote, &server_name)
        .map_err(|e| unreachable(e.to_string()))?;
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(match verifier.last_failure() {
                Some(reason) => EnrollError::UntrustedControlPlane(reason),
                None => unreachable(e.to_string()),
            })
        }
        Err(_) => return Err(unreachable("no answer (is UDP to that port open?)".into())),
    };
    let response = exchange(&connection, options, &request_key.csr_der).await;
    connection.close(VarInt::from_u32(close::DONE), b"enrolled");
    endpoint.wait_idle().await;
    let (server_id, certificate_pem, ca_pem, job_signing_public_key) = match response? {
        EnrollResponse::Enrolled {
            server_id,
            certificate_pem,
            ca_pem,
            job_signing_public_key,
        } => (server_id, certificate_pem, ca_pem, job_signing_public_key),
        EnrollResponse::Refused { reason } => return Err(EnrollError::Refused(reason)),
    };
    // The CA that came back must be the one we pinned, and the certificate must chain to it.
    let ca_der = sensei_certs::tls::first_cert_der(&ca_pem)
        .map_err(|e| EnrollError::Protocol(format!("CA certificate: {e}")))?;
    if Fingerprint::of_der(&ca_der) != options.ca_fingerprint {
        return Err(EnrollError::UntrustedControlPlane(
            "the CA certificate returned does not match the pinned fingerprint".into(),
        ));
    }
    let identity = Identity {
        meta: IdentityMeta {
            server_id,
            control_plane: options.control_plane.clone(),
            ca_fingerprint: options.ca_fingerprint.to_string(),
            job_signing_public_key: hex::encode(job_signing_public_key),
            agent_version: crate::version().into(),
            job_signing_keys: Vec::new(),
        },
        key_pem: request_key.key_pem,
        cert_pem: certificate_pem,
        ca_pem,
    };
    options.state_dir.save(&identity)?;
    Ok(identity)
}

async fn exchange(
    connection: &quinn::Connection,
    options: &EnrollOptions,
    csr_der: &[u8],
) -> Result<EnrollResponse, EnrollError> {
    let protocol = |e: String| EnrollError::Protocol(e);
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let request = EnrollRequest {
        token: options.token.clone(),
        expected_server_id: options.expected_server_id,
        csr_der: csr_der.to_vec(),
        agent_version: crate::version().into(),
        hostname: hostname(),
    };
    write_frame(&mut send, &request)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let _ = send.finish();
    match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv)).await {
        Ok(Ok(Some(response))) => Ok(response),
        Ok(Ok(None)) => Err(protocol("no answer".into())),
        Ok(Err(e)) => Err(protocol(e.to_string())),
        Err(_) => Err(protocol("no answer within 30 s".into())),
    }
}
