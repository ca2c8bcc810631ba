//! HTTPS JSON lines in the shape of Splunk's HTTP Event Collector: one
//! `{"time", "host", "source", "sourcetype", "event"}` object per line, POSTed as a batch. A
//! batch is accepted when the receiver answers 2xx.

use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{event_json, HttpAuth};
use crate::audit::AuditRecord;

/// The header carrying the Unix time (seconds) an HMAC-signed batch was signed at.
pub const TIMESTAMP_HEADER: &str = "x-sensei-timestamp";
/// The header carrying hex HMAC-SHA256(key, "<timestamp>.<body>").
pub const SIGNATURE_HEADER: &str = "x-sensei-signature";
/// How much of a refusal's body goes into the sink's status.
const BODY_EXCERPT: usize = 200;

/// The request body for `records`: HEC events, one per line.
pub fn body(records: &[AuditRecord], host: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let line = json!({
            "time": record.at.timestamp_micros() as f64 / 1_000_000.0,
            "host": host,
            "source": "sensei",
            "sourcetype": "sensei:audit",
            "event": event_json(record),
        });
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// hex HMAC-SHA256 of `"<timestamp>.<body>"` under `key`: what a receiver recomputes.
pub fn signature(key: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Why a batch was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Request(String),
    #[error("the receiver answered {status}: {excerpt}")]
    Refused { status: u16, excerpt: String },
}

/// What to send and where.
pub struct Batch<'a> {
    pub url: &'a str,
    /// The URL's host, pinned to `addrs` (checked by the egress policy).
    pub host: &'a str,
    pub addrs: &'a [SocketAddr],
    pub ca_pem: &'a str,
    pub auth: HttpAuth,
    pub secret: &'a [u8],
    /// The `host` field of each event: this control plane's public name.
    pub origin: &'a str,
    pub timeout: Duration,
}

/// POSTs `records` and answers once the receiver accepted them.
pub async fn deliver(batch: &Batch<'_>, records: &[AuditRecord]) -> Result<(), HttpsError> {
    let mut tls = sensei_certs::tls::sink_client_config(batch.ca_pem)
        .map_err(|e| HttpsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // The checked addresses only: no second lookup, no proxy from the environment, no
        // redirect to somewhere the policy never saw.
        .resolve_to_addrs(batch.host, batch.addrs)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(batch.timeout)
        .user_agent(concat!("sensei-control-plane/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HttpsError::Config(e.to_string()))?;
    let body = body(records, batch.origin);
    let mut request = client
        .post(batch.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    let secret = String::from_utf8_lossy(batch.secret);
    request = match batch.auth {
        HttpAuth::Splunk => {
            request.header(reqwest::header::AUTHORIZATION, format!("Splunk {secret}"))
        }
        HttpAuth::Bearer => {
            request.header(reqwest::header::AUTHORIZATION, format!("Bearer {secret}"))
        }
        HttpAuth::Hmac => {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            let signature = signature(batch.secret, &timestamp, &body);
            request
                .header(TIMESTAMP_HEADER, timestamp)
                .header(SIGNATURE_HEADER, signature)
        }
    };
    let response = request
        .body(body)
        .send()
        .await
        // Without the URL: reqwest's errors name it, and the status already does.
        .map_err(|e| HttpsError::Request(describe(&e.without_url())))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // Only the start of the body: the receiver is the tenant's, and may answer without end.
    let mut response = response;
    let mut start = Vec::new();
    while start.len() < BODY_EXCERPT {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            _ => break,
        }
    }
    Err(HttpsError::Refused {
        status: status.as_u16(),
        excerpt: String::from_utf8_lossy(&start)
            .chars()
            .take(BODY_EXCERPT)
            .collect(),
    })
}

/// A reqwest error with its causes, which hold the useful part ("connection refused").
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature(b"key", "1700000000", b"{}\n");
        assert_eq!(a.len(), 64);
        assert_ne!(a, signature(b"key", "1700000001", b"{}\n"));
        assert_ne!(a, signature(b"key", "1700000000", b"{} \n"));
        assert_ne!(a, signature(b"other", "1700000000", b"{}\n"));
    }
}
