//! Syslog over TLS: RFC 5424 messages, framed by octet counting (`LEN SP MSG`) over a TLS
//! connection as RFC 5425 describes.
//!
//! RFC 5425 has no acknowledgment. A batch counts as accepted when the receiver read all of
//! it: we send the frames, close our side (TLS close_notify, then the TCP write half), and wait
//! for the receiver to close in turn. A receiver that was killed with frames unread resets the
//! connection instead, and the batch is sent again. What the receiver does with frames it read
//! is beyond this protocol: one that dies after reading but before writing loses them (RELP
//! would close that gap; it is not offered).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use chrono::SecondsFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::event_json;
use crate::audit::AuditRecord;

/// `log audit`, RFC 5424's facility 13.
const FACILITY_LOG_AUDIT: u8 = 13;
/// Longest MSGID RFC 5424 allows.
const MAX_MSGID: usize = 32;
/// The structured-data id: `name@<private enterprise number>`. Sensei has no enterprise
/// number of its own, so it uses 32473, the one RFC 5612 reserves for documentation.
const SD_ID: &str = "sensei@32473";

/// Severity from the outcome: a success is a normal but significant event (notice), a refusal
/// or failure a warning.
fn severity(result: &str) -> u8 {
    match result {
        "success" => 5,
        _ => 4,
    }
}

/// MSGID: the action, printable US-ASCII without spaces, at most 32 characters (RFC 5424
/// §6.2.7), `-` when nothing is left.
pub fn msgid(action: &str) -> String {
    let id: String = action
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_MSGID)
        .collect();
    if id.is_empty() {
        "-".into()
    } else {
        id
    }
}

/// HOSTNAME: printable US-ASCII, at most 255 characters, `-` when unknown.
fn hostname(host: &str) -> String {
    let h: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() {
        "-".into()
    } else {
        h
    }
}

/// A structured-data parameter value, escaped as RFC 5424 §6.3.3 requires.
fn sd_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message for `record`: `<PRI>1 TIMESTAMP HOSTNAME sensei - MSGID [SD] JSON`.
pub fn message(record: &AuditRecord, host: &str) -> String {
    let pri = u16::from(FACILITY_LOG_AUDIT) * 8 + u16::from(severity(&record.result));
    let mut out = String::new();
    let account = record
        .account_id
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    let _ = write!(
        out,
        "<{pri}>1 {} {} sensei - {} [{SD_ID} id=\"{}\" account=\"{}\" seq=\"{}\"] ",
        record.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        hostname(host),
        msgid(&record.action),
        record.id,
        sd_value(&account),
        record.seq,
    );
    out.push_str(&event_json(record).to_string());
    out
}

/// The frames of a batch: `LEN SP MSG` each (RFC 5425 §4.3).
pub fn frames(records: &[AuditRecord], host: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let msg = message(record, host);
        out.extend_from_slice(format!("{} ", msg.len()).as_bytes());
        out.extend_from_slice(msg.as_bytes());
    }
    out
}

/// Why a batch was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("connecting to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("TLS handshake with {server_name}: {detail}")]
    Handshake { server_name: String, detail: String },
    #[error("sending: {0}")]
    Send(String),
    #[error("the receiver did not close cleanly after the batch: {0}")]
    Close(String),
}

/// Sends `records` to the first of `addrs` that answers and waits until the receiver has read
/// them all (see the module's comment). The caller bounds the whole with a timeout.
pub async fn deliver(
    addrs: &[SocketAddr],
    server_name: &str,
    ca_pem: &str,
    host: &str,
    records: &[AuditRecord],
) -> Result<(), SyslogError> {
    let config = sensei_certs::tls::sink_client_config(ca_pem)
        .map_err(|e| SyslogError::Config(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| SyslogError::Config(e.to_string()))?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => {
                last = Some(SyslogError::Connect {
                    addr: *addr,
                    detail: e.to_string(),
                })
            }
        }
    }
    let Some(tcp) = tcp else {
        return Err(last.unwrap_or(SyslogError::Send("no address to connect to".into())));
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| SyslogError::Handshake {
            server_name: server_name.to_owned(),
            detail: e.to_string(),
        })?;
    tracing::debug!(
        version = ?tls.get_ref().1.protocol_version(),
        "audit sink: syslog TLS session"
    );
    tls.write_all(&frames(records, host))
        .await
        .map_err(|e| SyslogError::Send(e.to_string()))?;
    tls.flush()
        .await
        .map_err(|e| SyslogError::Send(e.to_string()))?;
    // close_notify, then our TCP write half: the receiver reads to the end and closes.
    tls.shutdown()
        .await
        .map_err(|e| SyslogError::Send(e.to_string()))?;
    let mut scratch = [0u8; 1024];
    loop {
        match tls.read(&mut scratch).await {
            Ok(0) => return Ok(()),
            // RFC 5425 receivers send nothing; whatever comes is ignored until the close.
            Ok(_) => {}
            // Many receivers (rsyslog among them) close the TCP connection without a
            // close_notify of their own once they have read ours: an orderly close all the
            // same. A receiver killed with our frames unread resets the connection instead.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(SyslogError::Close(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(action: &str, result: &str) -> AuditRecord {
        AuditRecord {
            id: 42,
            chain_id: uuid::Uuid::nil(),
            seq: 7,
            account_id: Some(uuid::Uuid::nil()),
            at: chrono::DateTime::from_timestamp(1_700_000_000, 5_000).expect("time"),
            actor_type: "user".into(),
            actor_id: None,
            actor_email: Some("a@example.com".into()),
            client_ip: None,
            user_agent: None,
            action: action.into(),
            target_type: None,
            target_id: None,
            result: result.into(),
            metadata: json!({}),
            prev_hash: vec![0; 32],
            hash: vec![1; 32],
            key_id: None,
        }
    }

    #[test]
    fn an_rfc_5424_message_with_octet_counting() {
        let r = record("server.created", "success");
        let msg = message(&r, "deploy.example.com");
        assert!(
            msg.starts_with(
                "<109>1 2023-11-14T22:13:20.000005Z deploy.example.com sensei - server.created \
                 [sensei@32473 id=\"42\" account=\"00000000-0000-0000-0000-000000000000\" seq=\"7\"] {"
            ),
            "{msg}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&msg[msg.find("] ").expect("sd end") + 2..]).expect("json");
        assert_eq!(json["id"], 42);
        assert_eq!(json["event"], "server.created");
        let framed = frames(&[r], "h");
        let text = String::from_utf8(framed).expect("utf8");
        let (len, rest) = text.split_once(' ').expect("frame");
        assert_eq!(len.parse::<usize>().expect("len"), rest.len());
        assert!(message(&record("user.login_failed", "failure"), "h").starts_with("<108>1 "));
    }

    #[test]
    fn msgid_is_printable_ascii_of_at_most_32() {
        assert_eq!(msgid("a b\u{7}c\u{e9}d"), "abcd");
        assert_eq!(msgid(&"x".repeat(40)).len(), 32);
        assert_eq!(msgid(" "), "-");
        assert_eq!(sd_value("a\"b]c\\"), "a\\\"b\\]c\\\\");
    }
}
