//! RFC 2136 dynamic updates signed with TSIG (RFC 8945), over TCP to the zone's primary: the
//! only DNS Sensei speaks. Messages are built and signed by `hickory-proto`; this file sends
//! them, bounds what it reads back, and says what the server answered.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::update_message::{self, UpdateMessage};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{Name, RData, Record, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest a whole exchange (connect, send, answer) may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds of clock difference the server may tolerate on the signature.
const FUDGE: u16 = 300;

/// Why an update did not happen. Messages carry no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the DNS server {server}: {message}")]
    Unreachable { server: SocketAddr, message: String },
    #[error("the DNS server {server} did not answer within {}s", EXCHANGE_TIMEOUT.as_secs())]
    Timeout { server: SocketAddr },
    #[error("the DNS server sent an unreadable answer: {0}")]
    Unreadable(String),
    /// The server refused: `NOTAUTH` is a TSIG key it does not accept (wrong name, algorithm or
    /// secret), `REFUSED` an update policy that does not allow this key on this zone.
    #[error("the DNS server refused the update: {0}")]
    Refused(String),
    #[error("the DNS server's answer is not signed with the zone's key: {0}")]
    Unsigned(String),
}

/// Where records of one zone are written, and with which key.
#[derive(Clone)]
pub struct Zone {
    pub origin: Name,
    pub server: SocketAddr,
    pub signer: TSigner,
    pub ttl: u32,
}

/// What a name points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Address(IpAddr),
    /// An SSH server known by a host name: the record is an alias of it.
    Alias(Name),
}

impl Zone {
    /// A zone from its stored settings; `secret` is the TSIG key's bytes.
    pub fn new(
        origin: &str,
        server: SocketAddr,
        key_name: &str,
        algorithm: &str,
        secret: Vec<u8>,
        ttl: u32,
    ) -> Result<Self, UpdateError> {
        let origin = fqdn(origin)?;
        let algorithm = match algorithm {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => {
                return Err(UpdateError::Invalid(format!(
                    "TSIG algorithm {other:?}: use hmac-sha256, hmac-sha384 or hmac-sha512"
                )))
            }
        };
        let signer = TSigner::new(secret, algorithm, fqdn(key_name)?, FUDGE)
            .map_err(|e| UpdateError::Invalid(e.to_string()))?;
        Ok(Self {
            origin,
            server,
            signer,
            ttl,
        })
    }

    /// `label.origin`.
    pub fn name(&self, label: &str) -> Result<Name, UpdateError> {
        Name::from_ascii(label)
            .and_then(|l| l.append_domain(&self.origin))
            .map_err(|e| UpdateError::Invalid(format!("{label:?} is not a DNS label: {e}")))
    }

    /// Makes `name` point at `target` and nothing else: its A, AAAA and CNAME records are
    /// replaced in one atomic update.
    pub async fn replace(&self, name: &Name, target: &Target) -> Result<(), UpdateError> {
        let mut message = self.clear(name);
        let data = match target {
            Target::Address(ip) => RData::from(*ip),
            Target::Alias(host) => RData::CNAME(CNAME(host.clone())),
        };
        message.add_update(Record::from_rdata(name.clone(), self.ttl, data));
        self.exchange(message).await
    }

    /// Removes every A, AAAA and CNAME record of `name`.
    pub async fn remove(&self, name: &Name) -> Result<(), UpdateError> {
        self.exchange(self.clear(name)).await
    }

    fn clear(&self, name: &Name) -> Message {
        let mut message = update_message::delete_rrset(
            Record::update0(name.clone(), 0, RecordType::A),
            self.origin.clone(),
            false,
        );
        for other in [RecordType::AAAA, RecordType::CNAME] {
            let mut r = Record::update0(name.clone(), 0, other);
            // Delete an RRset (RFC 2136 §2.5.2): class ANY, TTL 0, empty data.
            r.dns_class = hickory_proto::rr::DNSClass::ANY;
            message.add_update(r);
        }
        message
    }

    async fn exchange(&self, mut message: Message) -> Result<(), UpdateError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut verifier = message
            .finalize(&self.signer, now)
            .map_err(|e| UpdateError::Invalid(e.to_string()))?;
        let request = message
            .to_vec()
            .map_err(|e| UpdateError::Invalid(e.to_string()))?;
        let server = self.server;
        let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, send(server, &request))
            .await
            .map_err(|_| UpdateError::Timeout { server })??;
        let response =
            Message::from_vec(&answer).map_err(|e| UpdateError::Unreadable(e.to_string()))?;
        if response.metadata.id != message.metadata.id {
            return Err(UpdateError::Unreadable(
                "an answer to another message".into(),
            ));
        }
        let code = response.metadata.response_code;
        if code != ResponseCode::NoError {
            // A refused update is not signed when the key itself was the problem.
            return Err(UpdateError::Refused(format!("{code:?} ({code})")));
        }
        if let Some(verifier) = verifier.as_mut() {
            verifier
                .verify(&answer)
                .map_err(|e| UpdateError::Unsigned(e.to_string()))?;
        }
        Ok(())
    }
}

/// One TCP exchange: a length-prefixed message out, one back (at most 64 KiB by the framing).
async fn send(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, UpdateError> {
    let unreachable = |e: std::io::Error| UpdateError::Unreachable {
        server,
        message: e.to_string(),
    };
    let mut stream = tokio::net::TcpStream::connect(server)
        .await
        .map_err(unreachable)?;
    let len = u16::try_from(request.len())
        .map_err(|_| UpdateError::Invalid("the update is larger than 64 KiB".into()))?;
    stream
        .write_all(&len.to_be_bytes())
        .await
        .map_err(unreachable)?;
    stream.write_all(request).await.map_err(unreachable)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(unreachable)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.map_err(unreachable)?;
    Ok(answer)
}

/// A fully qualified name from text.
pub fn fqdn(text: &str) -> Result<Name, UpdateError> {
    let mut name = Name::from_ascii(text.trim_end_matches('.'))
        .map_err(|e| UpdateError::Invalid(format!("{text:?} is not a DNS name: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}
