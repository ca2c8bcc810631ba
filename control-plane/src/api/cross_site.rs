//! Cross-site request refusal. A browser attaches the session cookie to requests any page
//! makes, and `SameSite=Lax` alone still lets a page on a sibling subdomain (same site, other
//! origin) send simple POSTs: a form, or `fetch` with `no-cors` and a `text/plain` body. So
//! an unsafe request that a cookie authenticates must show that it comes from the control
//! plane's own origin: `Sec-Fetch-Site: same-origin` (which page scripts cannot set) or an
//! `Origin` equal to the public URL's, and a body, if any, must be `application/json` (which
//! a cross-origin page cannot send without a CORS preflight the API never grants).
//!
//! API keys are unaffected: a page cannot make the browser attach an `Authorization` header.
//! Public routes (login, signup, reset) refuse a request that names a foreign origin, which
//! keeps another site from signing a visitor in to an account of its choosing; a client that
//! sends no `Origin` at all (curl, the CLI) is not a browser and passes.

use http::{HeaderMap, Method, StatusCode};

use super::error::{ApiError, ErrorCode};

/// A web origin: scheme, host and port (the default port filled in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebOrigin {
    scheme: String,
    host: String,
    port: u16,
}

impl WebOrigin {
    /// The origin of a URL (`https://host[:port][/path]`); `None` unless http or https.
    pub fn of_url(text: &str) -> Option<Self> {
        let uri: http::Uri = text.trim().parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return None,
        };
        let authority = uri.authority()?;
        if authority.as_str().contains('@') {
            return None;
        }
        Some(Self {
            host: authority.host().trim_end_matches('.').to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
            scheme,
        })
    }

    pub fn render(&self) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("https", 443) | ("http", 80)
        );
        if default {
            format!("{}://{}", self.scheme, self.host)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// How the request would be authenticated, as far as this check cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No credential the browser adds by itself (a public route, or an API key).
    Public,
    /// The session cookie (and no `Authorization` header, which would win).
    Cookie,
    /// An `Authorization` header: a page cannot make a browser send one.
    Bearer,
}

impl Credential {
    pub fn of(headers: &HeaderMap, public_route: bool) -> Self {
        if public_route {
            Self::Public
        } else if crate::identity::auth::bearer(headers).is_some() {
            Self::Bearer
        } else if crate::identity::auth::session_cookie(headers).is_some() {
            Self::Cookie
        } else {
            // Will be refused as unauthenticated: nothing for this check to protect.
            Self::Bearer
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Whether the browser says the request comes from the control plane's own origin:
/// `Sec-Fetch-Site: same-origin` (which page scripts cannot set) or an `Origin` equal to the
/// public URL's. The API and the dashboard's forms ask the same question.
pub fn from_own_origin(headers: &HeaderMap, public: &WebOrigin) -> bool {
    let fetch_site = header(headers, "sec-fetch-site").map(str::to_ascii_lowercase);
    fetch_site.as_deref() == Some("same-origin")
        || header(headers, "origin")
            .and_then(WebOrigin::of_url)
            .as_ref()
            == Some(public)
}

/// Refuses a request a foreign page could have made a browser send.
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    credential: Credential,
    public: &WebOrigin,
) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let fetch_site = header(headers, "sec-fetch-site").map(str::to_ascii_lowercase);
    let origin = header(headers, "origin");
    let same_origin = from_own_origin(headers, public);
    let refused = |why: &str| {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::CrossSiteRequest,
            format!(
                "{why}: a signed-in browser may change things only from {}",
                public.render()
            ),
        ))
    };
    match credential {
        Credential::Bearer => Ok(()),
        Credential::Public => {
            // A browser says where the request came from; a foreign answer is refused.
            let foreign = !same_origin
                && (origin.is_some()
                    || matches!(fetch_site.as_deref(), Some("cross-site" | "same-site")));
            if foreign {
                refused("this request comes from another site")
            } else {
                Ok(())
            }
        }
        Credential::Cookie => {
            if !same_origin {
                return match origin {
                    None => refused("the request has no Origin header"),
                    Some(_) => refused("the request's Origin is another site"),
                };
            }
            json_or_empty(headers)
        }
    }
}

/// A cookie-authenticated body must be JSON; a request without one must say so.
fn json_or_empty(headers: &HeaderMap) -> Result<(), ApiError> {
    let unsupported = || {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ))
    };
    match header(headers, "content-type") {
        Some(kind) => {
            let essence = kind.split(';').next().unwrap_or("").trim();
            if essence.eq_ignore_ascii_case("application/json") {
                Ok(())
            } else {
                unsupported()
            }
        }
        None => {
            let has_body = headers.contains_key(http::header::TRANSFER_ENCODING)
                || header(headers, "content-length").is_some_and(|n| n != "0");
            if has_body {
                unsupported()
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("header value"));
        }
        map
    }

    fn public() -> WebOrigin {
        WebOrigin::of_url("https://Sensei.Example/some/path").expect("origin")
    }

    fn code(result: Result<(), ApiError>) -> Option<&'static str> {
        result.err().map(|e| e.code())
    }

    #[test]
    fn origins_compare_by_scheme_host_and_port() {
        let p = public();
        assert_eq!(
            WebOrigin::of_url("https://sensei.example:443"),
            Some(p.clone())
        );
        assert_eq!(
            WebOrigin::of_url("https://sensei.example."),
            Some(p.clone())
        );
        assert_ne!(
            WebOrigin::of_url("https://sensei.example:8443"),
            Some(p.clone())
        );
        assert_ne!(WebOrigin::of_url("http://sensei.example"), Some(p.clone()));
        assert_ne!(
            WebOrigin::of_url("https://evil.sensei.example"),
            Some(p.clone())
        );
        assert_eq!(WebOrigin::of_url("null"), None);
        assert_eq!(WebOrigin::of_url("https://user@sensei.example"), None);
        assert_eq!(p.render(), "https://sensei.example");
    }

    #[test]
    fn a_cookie_request_needs_the_public_origin_and_a_json_body() {
        let post = Method::POST;
        let check = |h: &[(&'static str, &str)]| {
            code(check(&post, &headers(h), Credential::Cookie, &public()))
        };
        assert_eq!(check(&[]), Some("cross_site_request"));
        assert_eq!(
            check(&[("origin", "https://evil.example")]),
            Some("cross_site_request")
        );
        assert_eq!(check(&[("origin", "null")]), Some("cross_site_request"));
        assert_eq!(
            check(&[("sec-fetch-site", "same-site")]),
            Some("cross_site_request")
        );
        assert_eq!(check(&[("origin", "https://sensei.example")]), None);
        assert_eq!(check(&[("sec-fetch-site", "same-origin")]), None);
        assert_eq!(
            check(&[
                ("origin", "https://sensei.example"),
                ("content-type", "text/plain")
            ]),
            Some("unsupported_media_type")
        );
        assert_eq!(
            check(&[
                ("origin", "https://sensei.example"),
                ("content-length", "12")
            ]),
            Some("unsupported_media_type")
        );
        assert_eq!(
            check(&[
                ("origin", "https://sensei.example"),
                ("content-type", "Application/JSON; charset=utf-8")
            ]),
            None
        );
        // Reading is not changing anything.
        assert_eq!(
            code(super::check(
                &Method::GET,
                &headers(&[]),
                Credential::Cookie,
                &public()
            )),
            None
        );
    }

    #[test]
    fn bearer_requests_pass_and_public_routes_refuse_only_a_foreign_origin() {
        let post = Method::POST;
        let foreign = headers(&[
            ("origin", "https://evil.example"),
            ("content-type", "text/plain"),
        ]);
        assert_eq!(
            code(check(&post, &foreign, Credential::Bearer, &public())),
            None
        );
        assert_eq!(
            code(check(&post, &foreign, Credential::Public, &public())),
            Some("cross_site_request")
        );
        assert_eq!(
            code(check(
                &post,
                &headers(&[("sec-fetch-site", "cross-site")]),
                Credential::Public,
                &public()
            )),
            Some("cross_site_request")
        );
        assert_eq!(
            code(check(&post, &headers(&[]), Credential::Public, &public())),
            None
        );
        assert_eq!(
            code(check(
                &post,
                &headers(&[("origin", "https://sensei.example")]),
                Credential::Public,
                &public()
            )),
            None
        );
    }

    #[test]
    fn a_cookie_beside_an_authorization_header_is_not_what_authenticates() {
        let h = headers(&[
            ("authorization", "Bearer sk_x"),
            ("cookie", "sensei_session=s"),
        ]);
        assert_eq!(Credential::of(&h, false), Credential::Bearer);
        let h = headers(&[("cookie", "a=b; sensei_session=s")]);
        assert_eq!(Credential::of(&h, false), Credential::Cookie);
        assert_eq!(Credential::of(&h, true), Credential::Public);
    }
}
