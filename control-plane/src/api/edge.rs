//! What every request gets before it reaches a route: its client address (through trusted
//! proxies only), a request id, and the span that the access log line is written in.
//!
//! The request id is taken from `x-request-id` only when the TCP peer is a trusted proxy
//! (which already assigned one); otherwise it is generated, so that a client cannot make its
//! requests look like someone else's in the logs. It is answered on every response, and every
//! error body carries it (`error.request_id`).

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use ipnet::IpNet;
use uuid::Uuid;

use super::extract::PeerAddr;
use super::AppState;

/// The header carrying the request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id taken from a proxy.
const MAX_REQUEST_ID: usize = 128;
/// At most this many `X-Forwarded-For` entries are looked at: a longer chain is cut, not
/// walked (the header is attacker-controlled beyond the first trusted hop).
const MAX_FORWARDED_HOPS: usize = 32;

/// The request's id.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The address of the client, after trusted proxies.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

tokio::task_local! {
    /// The id of the request being served, for error bodies built deep inside a handler.
    static CURRENT_REQUEST_ID: String;
}

/// The id of the request this task is serving, if any.
pub fn current_request_id() -> Option<String> {
    CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
}

/// The client's address: the TCP peer, or, when that peer is a trusted proxy, the nearest
/// address in its forwarding header that is not itself a trusted proxy.
pub fn client_address(peer: IpAddr, headers: &http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_hops(headers);
    // From the nearest hop outwards: each trusted proxy vouches for the one before it.
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = *hop;
        if !is_trusted(hop) {
            break;
        }
    }
    client
}

/// The addresses a request passed through, client first, from `X-Forwarded-For`. The
/// standard `Forwarded` header is not read: the common load balancers (nginx, HAProxy, cloud
/// ones) set only `X-Forwarded-For` and pass a client's own `Forwarded` through untouched, so
/// believing it would let any client name its address. An entry that is not an address
/// (`unknown`, an obfuscated name) ends the chain there: nothing before it can be attributed.
fn forwarded_hops(headers: &http::HeaderMap) -> Vec<IpAddr> {
    let entries: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .collect();
    let start = entries.len().saturating_sub(MAX_FORWARDED_HOPS);
    let mut hops = Vec::new();
    for entry in &entries[start..] {
        match parse_hop(entry) {
            Some(ip) => hops.push(ip),
            // Everything before an unparseable entry is unattributable.
            None => hops.clear(),
        }
    }
    hops
}

/// `192.0.2.1`, `192.0.2.1:8080`, `[2001:db8::1]:443` or `2001:db8::1`.
fn parse_hop(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    text.rsplit_once(':')?.0.parse().ok()
}

fn acceptable_request_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    (!text.is_empty()
        && text.len() <= MAX_REQUEST_ID
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| text.to_owned())
}

/// The outermost middleware: client address, request id, the access-log span.
pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let from_proxy = state.trusted_proxies.iter().any(|net| net.contains(&peer));
    let client = client_address(peer, req.headers(), &state.trusted_proxies);
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|_| from_proxy)
        .and_then(acceptable_request_id)
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    req.extensions_mut().insert(ClientAddr(client));
    req.extensions_mut().insert(RequestId(id.clone()));
    if let Ok(value) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let mut response = CURRENT_REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The span each request's access-log line is written in. The path's template (never the
/// path itself, which may hold ids, nor the query) and the account are filled in once known.
pub fn request_span(req: &Request) -> tracing::Span {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.as_str())
        .unwrap_or("");
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %req.method(),
        route = tracing::field::Empty,
        request_id = %id,
        client = %client,
        account_id = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn an_untrusted_peer_cannot_claim_another_address() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        let peer: IpAddr = "198.51.100.7".parse().expect("ip");
        assert_eq!(client_address(peer, &h, &nets(&["10.0.0.0/8"])), peer);
        assert_eq!(client_address(peer, &h, &[]), peer);
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_spoofed_hops_before_it_are_ignored() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.2".parse().expect("ip");
        // The client itself wrote "1.2.3.4"; the proxy appended the real address.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")]);
        assert_eq!(
            client_address(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        // Two trusted hops: the nearest untrusted one is the client.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 10.0.0.5")]);
        assert_eq!(
            client_address(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        // A client's own Forwarded header, passed through by a proxy that sets only
        // X-Forwarded-For, is not believed.
        let h = headers(&[
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            client_address(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        let h = headers(&[("forwarded", "for=1.2.3.4")]);
        assert_eq!(client_address(peer, &h, &trusted), peer);
        // Ports and IPv6 brackets.
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:4711")]);
        assert_eq!(
            client_address(peer, &h, &trusted),
            "2001:db8::7".parse::<IpAddr>().expect("ip")
        );
        // No header, or garbage: the proxy itself.
        assert_eq!(client_address(peer, &headers(&[]), &trusted), peer);
        let h = headers(&[("x-forwarded-for", "not-an-address")]);
        assert_eq!(client_address(peer, &h, &trusted), peer);
    }

    #[test]
    fn request_ids_from_proxies_are_bounded_and_plain() {
        assert!(acceptable_request_id(&HeaderValue::from_static("abc-123_x.y:z")).is_some());
        assert!(acceptable_request_id(&HeaderValue::from_static("has space")).is_none());
        let long = "a".repeat(MAX_REQUEST_ID + 1);
        assert!(acceptable_request_id(&HeaderValue::from_str(&long).expect("v")).is_none());
    }
}
