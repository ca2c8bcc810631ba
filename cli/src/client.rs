//! The HTTPS client of the control plane's public API: TLS 1.3 to a pinned CA, the stored
//! credential on every request, the API's errors turned into messages that name the fix, and
//! the server-sent event streams the live views read.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use sensei_certs::{Fingerprint, PinnedCaVerifier};
use serde_json::Value;

use crate::config::{Credentials, Secret};
use crate::error::{CliError, Result};

/// Longest any one request (not a live stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest answer read into memory (the API's pages are far smaller).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Longest a live stream may stay silent (the control plane sends a keep-alive every 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(60);
/// Longest single server-sent event accepted: a log line is a few KiB, but a rollout's event
/// carries every target inline (about 150 bytes each, 100,000 at most).
const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    streaming: reqwest::Client,
    base: String,
    secret: Option<Secret>,
    verifier: Arc<PinnedCaVerifier>,
}

impl Api {
    /// A client for `url` that trusts only the CA with `fingerprint` and sends `secret`.
    pub fn new(url: &str, fingerprint: &str, secret: Option<Secret>) -> Result<Self> {
        let pin: Fingerprint = fingerprint.trim().parse().map_err(|_| {
            CliError::usage(format!(
                "{fingerprint} is not a CA fingerprint (SHA256: and 64 hex digits)"
            ))
        })?;
        let verifier = PinnedCaVerifier::new(pin);
        let build = |timeout: Option<Duration>| -> Result<reqwest::Client> {
            // A live stream sends at least a keep-alive every 15 s; one silent for a minute is
            // dead, and a CI job must not hang on it (the caller reconnects).
            let tls = sensei_certs::tls::agent_client_config(verifier.clone(), None, b"http/1.1")
                .map_err(|e| CliError::local(format!("TLS setup: {e}")))?;
            let mut builder = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("sensei-cli/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none());
            builder = match timeout {
                Some(t) => builder.timeout(t),
                None => builder.read_timeout(STREAM_SILENCE),
            };
            builder
                .build()
                .map_err(|e| CliError::local(format!("HTTP client: {e}")))
        };
        Ok(Self {
            http: build(Some(REQUEST_TIMEOUT))?,
            streaming: build(None)?,
            base: url.trim_end_matches('/').to_owned(),
            secret,
            verifier,
        })
    }

    pub fn from_credentials(c: &Credentials) -> Result<Self> {
        Self::new(&c.url, &c.ca_fingerprint, Some(c.secret.clone()))
    }

    /// The CA fingerprints the control plane presented in the last handshake.
    pub fn presented_cas(&self) -> Vec<Fingerprint> {
        self.verifier.presented()
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut req = client.request(method, format!("{}{path}", self.base));
        match &self.secret {
            Some(Secret::ApiKey(key)) => req = req.bearer_auth(key),
            Some(Secret::Session(cookie)) => {
                // A browser marks its own pages' requests this way, and no page can forge
                // the header; a command-line client is not a page another site can drive,
                // so it says the same (the control plane refuses a cookie-authenticated change
                // without it: the cross-site defence).
                req = req
                    .header(reqwest::header::COOKIE, format!("sensei_session={cookie}"))
                    .header("sec-fetch-site", "same-origin");
            }
            None => {}
        }
        req
    }

    /// Sends a request and answers the response, or the error it carried.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let mut req = self.request(&self.http, method, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = read_limited(response)
            .await
            .map_err(|e| self.transport_error(e))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                CliError::Unreachable(format!(
                    "{}{path} answered HTTP {status} with a body that is not JSON: is {} a Sensei control plane?",
                    self.base, self.base
                ))
            })?
        };
        if status.is_success() {
            Ok((status, headers, value))
        } else {
            Err(self.api_error(status, &value))
        }
    }

    /// [`Api::send`] for a request that carries an `Idempotency-Key`: a transport failure or
    /// an unavailable database is retried (three tries in all, 1 s and 2 s apart), which the
    /// key makes safe: a request that did land is answered, not done again.
    pub async fn send_idempotent(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        key: &str,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let mut pause = Duration::from_secs(1);
        for _ in 0..2 {
            match self
                .send(
                    method.clone(),
                    path,
                    Some(body),
                    &[("idempotency-key", key)],
                )
                .await
            {
                Err(CliError::Unreachable(_)) if self.verifier.last_failure().is_none() => {}
                Err(CliError::Api { status: 503, .. }) => {}
                other => return other,
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        self.send(method, path, Some(body), &[("idempotency-key", key)])
            .await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.send(Method::GET, path, None, &[]).await?.2)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        Ok(self.send(Method::POST, path, Some(body), &[]).await?.2)
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        Ok(self.send(Method::PATCH, path, Some(body), &[]).await?.2)
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        Ok(self.send(Method::DELETE, path, None, &[]).await?.2)
    }

    /// Every item of a paged list (`{"<field>": [...], "next_cursor": ...}`), following the
    /// cursors. `query` is the list's own filter, without `limit` and `cursor`.
    pub async fn list_all(&self, path: &str, query: &str, field: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        // A bound on pages: 10,000 × 500 is beyond any fleet the API allows.
        for _ in 0..10_000 {
            let mut url = format!("{path}?limit=500");
            if !query.is_empty() {
                url.push('&');
                url.push_str(query);
            }
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={}", encode(c)));
            }
            let page = self.get(&url).await?;
            if let Some(list) = page[field].as_array() {
                items.extend(list.iter().cloned());
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
        Err(CliError::local(format!("{path}: too many pages")))
    }

    /// Opens a server-sent event stream (`Accept: text/event-stream`).
    pub async fn events(&self, path: &str, last_event_id: Option<&str>) -> Result<EventStream> {
        let mut req = self
            .request(&self.streaming, Method::GET, path)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = read_limited(response).await.unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(self.api_error(status, &value));
        }
        Ok(EventStream {
            response,
            buffer: Vec::new(),
            scanned: 0,
        })
    }

    /// A transport failure in words: an untrusted CA names both fingerprints.
    pub fn transport_error(&self, e: reqwest::Error) -> CliError {
        if let Some(reason) = self.verifier.last_failure() {
            return CliError::Unreachable(format!(
                "refusing to talk to {}: {reason}. If its operator changed the CA, check the new \
                 fingerprint with them and run `sensei login {} --ca-fingerprint SHA256:…`",
                self.base, self.base
            ));
        }
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        CliError::Unreachable(format!("cannot reach {}: {message}", self.base))
    }

    fn api_error(&self, status: StatusCode, body: &Value) -> CliError {
        let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}"));
        match (status, code.as_str(), &self.secret) {
            (StatusCode::UNAUTHORIZED, "unauthenticated", Some(Secret::Session(_))) => {
                CliError::Auth(
                    "your session has expired or was signed out: run `sensei login`".into(),
                )
            }
            (StatusCode::UNAUTHORIZED, "unauthenticated", Some(Secret::ApiKey(_))) => {
                CliError::Auth(
                    "the API key is unknown or revoked: check SENSEI_API_KEY, or create a new key"
                        .into(),
                )
            }
            (StatusCode::UNAUTHORIZED, "api_key_expired", _) => CliError::Auth(format!(
                "the API key has expired ({message}): create a new one (`POST /v1/api-keys`) and \
                 update SENSEI_API_KEY"
            )),
            (StatusCode::UNAUTHORIZED, "unauthenticated", None) => CliError::NotSignedIn,
            (StatusCode::FORBIDDEN, "session_required", _) => CliError::Auth(format!(
                "{message}: this needs a signed-in user, not an API key (`sensei login URL`)"
            )),
            (StatusCode::FORBIDDEN, "insufficient_scope", _) => CliError::Api {
                status: status.as_u16(),
                code,
                message: format!("{message}: your role or the API key's scopes do not allow this"),
            },
            _ => CliError::Api {
                status: status.as_u16(),
                code,
                message,
            },
        }
    }
}

/// Reads a response body, refusing one larger than [`MAX_RESPONSE_BYTES`].
async fn read_limited(
    mut response: reqwest::Response,
) -> std::result::Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            // Truncated: the JSON parse that follows fails and says so.
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no event end: a large event arriving in many
    /// chunks is scanned once, not once per chunk.
    scanned: usize,
}

impl EventStream {
    /// The next event; `None` when the server ended the stream. Comments (keep-alives) are
    /// skipped.
    pub async fn next(&mut self) -> std::result::Result<Option<Event>, String> {
        loop {
            if let Some(event) = take_event(&mut self.buffer, &mut self.scanned) {
                if event.event.is_empty() && event.data.is_empty() {
                    continue;
                }
                return Ok(Some(event));
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err("the control plane sent an event larger than 64 MiB".into());
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Takes one complete event (up to a blank line) off the front of `buffer`; `scanned` is
/// where the search for its end resumes (the bytes before hold none).
fn take_event(buffer: &mut Vec<u8>, scanned: &mut usize) -> Option<Event> {
    let from = scanned.saturating_sub(1);
    let Some(end) = buffer[from..]
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + from)
    else {
        *scanned = buffer.len();
        return None;
    };
    *scanned = 0;
    let block: Vec<u8> = buffer.drain(..end + 2).collect();
    let text = String::from_utf8_lossy(&block);
    let mut event = Event::default();
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    event.data = data.join("\n");
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_at_blank_lines_and_comments_are_skipped() {
        let mut buffer =
            b": keep-alive\n\nid: 7\nevent: line\ndata: {\"a\":1}\n\nevent: status\ndata: x\ndata: y\n\npartial"
                .to_vec();
        let mut scanned = 0;
        assert_eq!(
            take_event(&mut buffer, &mut scanned),
            Some(Event::default())
        );
        assert_eq!(
            take_event(&mut buffer, &mut scanned),
            Some(Event {
                id: Some("7".into()),
                event: "line".into(),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(
            take_event(&mut buffer, &mut scanned).map(|e| (e.event, e.data)),
            Some(("status".into(), "x\ny".into()))
        );
        assert_eq!(take_event(&mut buffer, &mut scanned), None);
        assert_eq!(buffer, b"partial");
    }

    #[test]
    fn an_event_split_across_chunks_and_at_its_blank_line_is_found_once_whole() {
        let mut buffer = b"event: line\ndata: a".to_vec();
        let mut scanned = 0;
        assert_eq!(take_event(&mut buffer, &mut scanned), None);
        buffer.extend_from_slice(b"bc\n");
        assert_eq!(take_event(&mut buffer, &mut scanned), None);
        // The blank line's two newlines straddle the chunk boundary.
        buffer.extend_from_slice(b"\nevent: status\ndata: x\n\n");
        assert_eq!(
            take_event(&mut buffer, &mut scanned).map(|e| e.data),
            Some("abc".into())
        );
        assert_eq!(
            take_event(&mut buffer, &mut scanned).map(|e| e.event),
            Some("status".into())
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("role=web tier"), "role%3Dweb%20tier");
        assert_eq!(encode("a-b_c.d~"), "a-b_c.d~");
    }
}
