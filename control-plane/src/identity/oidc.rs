//! Single sign-on with OpenID Connect: the authorization-code flow with PKCE, `state` and
//! `nonce`, for an account's own provider.
//!
//! The protocol (the authorization URL, the token request, the ID token's signature, issuer,
//! audience, expiry and nonce) is the `openidconnect` crate's; this module gives it an HTTP
//! client that goes only where the egress policy allows, bounded in time and size, trusting
//! the account's CA or the public web PKI, and keeps each provider's discovery document and
//! keys (JWKS) cached, fetching the keys again when a token names a key it does not know (at
//! most once a minute per provider, so a stream of forged key ids cannot make us hammer it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreIdTokenVerifier, CoreJsonWebKeySet,
    CoreProviderMetadata,
};
use openidconnect::{
    AsyncHttpClient, AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken,
    HttpRequest, HttpResponse, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    Scope, SignatureVerificationError, TokenResponse,
};

use crate::egress::TargetPolicy;

/// Longest a provider may take to answer one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from a provider (discovery documents and key sets are a few KiB).
const MAX_ANSWER_BYTES: usize = 512 * 1024;
/// How long a discovery document (and the keys fetched with it) is used before it is fetched
/// again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// The least time between two fetches of a provider's keys prompted by an unknown key id (the
/// first is made at once: a rotation is noticed at the first token signed with the new key).
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Providers kept in the cache (the least recently fetched goes first).
const MAX_CACHED_PROVIDERS: usize = 1024;

/// An account's provider, as stored (the secret opened).
#[derive(Clone)]
pub struct ProviderConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
    /// The only CA trusted for the provider's HTTPS; the public web PKI when absent.
    pub ca_pem: Option<String>,
}

/// Why a provider could not be used, or a sign-in not finished. The text is for the person
/// signing in and the audit log; it never holds a token or secret.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider could not be reached: {0}")]
    Unreachable(String),
    #[error("the identity provider's configuration is not usable: {0}")]
    Discovery(String),
    #[error("the identity provider refused the sign-in: {0}")]
    Token(String),
    #[error("the identity provider returned no ID token")]
    NoIdToken,
    #[error("the ID token is not valid: {0}")]
    InvalidIdToken(String),
}

/// Where the control plane may fetch from, and with which trust.
struct Egress<'a> {
    policy: &'a TargetPolicy,
    ca_pem: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

impl<'c> AsyncHttpClient<'c> for Egress<'_> {
    type Error = FetchError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, FetchError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        let policy = self.policy.clone();
        let ca_pem = self.ca_pem.map(str::to_owned);
        Box::pin(async move { fetch(&policy, ca_pem.as_deref(), request).await })
    }
}

/// The TLS configuration for a provider: its own CA only when given, else the public roots.
fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, FetchError> {
    let mut config = match ca_pem {
        Some(pem) => sensei_certs::tls::sink_client_config(pem)
            .map_err(|e| FetchError(format!("the provider's CA: {e}")))?,
        None => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            rustls::ClientConfig::builder_with_provider(sensei_certs::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| FetchError(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One request to a provider: HTTPS only, to addresses the egress policy allows (resolved once
/// and pinned), no redirects, no proxy, bounded in time and size.
async fn fetch(
    policy: &TargetPolicy,
    ca_pem: Option<&str>,
    request: HttpRequest,
) -> Result<HttpResponse, FetchError> {
    let url = reqwest::Url::parse(&request.uri().to_string())
        .map_err(|_| FetchError("not a URL".into()))?;
    if url.scheme() != "https" {
        return Err(FetchError(format!("{url} is not https://")));
    }
    let host = url
        .host_str()
        .ok_or_else(|| FetchError("a URL without a host".into()))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = policy
        .resolve(&host, port, REQUEST_TIMEOUT)
        .await
        .map_err(|e| FetchError(e.to_string()))?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca_pem)?)
        .resolve_to_addrs(host.trim_start_matches('[').trim_end_matches(']'), &addrs)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("sensei-control-plane/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FetchError(e.to_string()))?;
    let (parts, body) = request.into_parts();
    let mut outgoing = client.request(parts.method, url).body(body);
    for (name, value) in &parts.headers {
        outgoing = outgoing.header(name, value);
    }
    let mut response = outgoing
        .send()
        .await
        .map_err(|e| FetchError(describe(&e.without_url())))?;
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(FetchError("the answer is too large".into()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| FetchError(describe(&e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(FetchError("the answer is too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    let mut answer = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    answer.body(body).map_err(|e| FetchError(e.to_string()))
}

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

/// A provider's discovery document with its keys, and when they were fetched.
struct Cached {
    metadata: CoreProviderMetadata,
    fetched: Instant,
    /// When an unknown key id last made us fetch the keys again.
    keys_refetched: Option<Instant>,
}

/// Providers' discovery documents and keys, shared by every request of this replica.
#[derive(Default)]
pub struct ProviderCache {
    entries: Mutex<HashMap<String, Cached>>,
}

/// The cache key: the issuer and the trust it was fetched under (a changed CA fetches anew).
fn cache_key(config: &ProviderConfig) -> String {
    format!(
        "{}\u{0}{}",
        config.issuer,
        config.ca_pem.as_deref().unwrap_or("")
    )
}

impl ProviderCache {
    fn get(&self, key: &str) -> Option<CoreProviderMetadata> {
        let entries = self.entries.lock().ok()?;
        let cached = entries.get(key)?;
        (cached.fetched.elapsed() < DISCOVERY_TTL).then(|| cached.metadata.clone())
    }

    fn put(&self, key: String, metadata: CoreProviderMetadata) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED_PROVIDERS && !entries.contains_key(&key) {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, c)| c.fetched)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
            entries.insert(
                key,
                Cached {
                    metadata,
                    fetched: Instant::now(),
                    keys_refetched: None,
                },
            );
        }
    }

    /// Claims the right to fetch `key`'s keys again: true at most once per interval.
    fn may_refetch_keys(&self, key: &str) -> bool {
        let Ok(mut entries) = self.entries.lock() else {
            return false;
        };
        match entries.get_mut(key) {
            Some(c)
                if c.keys_refetched
                    .is_none_or(|at| at.elapsed() >= JWKS_REFETCH_INTERVAL) =>
            {
                c.keys_refetched = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    fn replace_keys(&self, key: &str, jwks: CoreJsonWebKeySet) {
        if let Ok(mut entries) = self.entries.lock() {
            if let Some(c) = entries.get_mut(key) {
                c.metadata = c.metadata.clone().set_jwks(jwks);
            }
        }
    }

    /// The provider's metadata and keys: cached, or discovered now.
    async fn metadata(
        &self,
        config: &ProviderConfig,
        policy: &TargetPolicy,
    ) -> Result<CoreProviderMetadata, OidcError> {
        let key = cache_key(config);
        if let Some(metadata) = self.get(&key) {
            return Ok(metadata);
        }
        let metadata = discover(config, policy).await?;
        self.put(key, metadata.clone());
        Ok(metadata)
    }
}

/// Fetches `.well-known/openid-configuration` and the keys it names.
pub async fn discover(
    config: &ProviderConfig,
    policy: &TargetPolicy,
) -> Result<CoreProviderMetadata, OidcError> {
    let issuer =
        IssuerUrl::new(config.issuer.clone()).map_err(|e| OidcError::Discovery(e.to_string()))?;
    let http = Egress {
        policy,
        ca_pem: config.ca_pem.as_deref(),
    };
    CoreProviderMetadata::discover_async(issuer, &http)
        .await
        .map_err(|e| match e {
            openidconnect::DiscoveryError::Request(e) => OidcError::Unreachable(e.to_string()),
            other => OidcError::Discovery(describe(&other)),
        })
}

/// What a started sign-in must remember until the provider sends the browser back: kept in
/// the browser's sealed cookie, never in the clear.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
}

/// Where to send the browser, and what to remember.
pub struct Started {
    pub authorize_url: String,
    pub pending: Pending,
}

/// Who the provider says signed in, its ID token checked.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    /// Every claim of the (verified) ID token, for the role mapping.
    pub claims: serde_json::Value,
}

fn client(
    metadata: CoreProviderMetadata,
    config: &ProviderConfig,
    redirect_url: &str,
) -> Result<
    CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    >,
    OidcError,
> {
    let redirect = RedirectUrl::new(redirect_url.to_owned())
        .map_err(|e| OidcError::Discovery(e.to_string()))?;
    Ok(CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(config.client_id.clone()),
        Some(ClientSecret::new(config.client_secret.clone())),
    )
    .set_redirect_uri(redirect))
}

impl ProviderCache {
    /// Starts a sign-in: the provider's authorization URL with a fresh `state`, `nonce` and
    /// PKCE challenge (S256).
    pub async fn start(
        &self,
        config: &ProviderConfig,
        policy: &TargetPolicy,
        redirect_url: &str,
    ) -> Result<Started, OidcError> {
        let metadata = self.metadata(config, policy).await?;
        let client = client(metadata, config, redirect_url)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in &config.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok(Started {
            authorize_url: url.to_string(),
            pending: Pending {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                pkce_verifier: verifier.secret().clone(),
            },
        })
    }

    /// Finishes a sign-in: exchanges the code (with the PKCE verifier) and checks the ID
    /// token's signature, issuer, audience, expiry and nonce. The caller has already checked
    /// `state` against the browser's cookie.
    pub async fn finish(
        &self,
        config: &ProviderConfig,
        policy: &TargetPolicy,
        redirect_url: &str,
        pending: &Pending,
        code: &str,
    ) -> Result<Identity, OidcError> {
        let key = cache_key(config);
        let metadata = self.metadata(config, policy).await?;
        let http = Egress {
            policy,
            ca_pem: config.ca_pem.as_deref(),
        };
        let client = client(metadata.clone(), config, redirect_url)?;
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Discovery(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&http)
            .await
            .map_err(|e| OidcError::Token(token_error(&e)))?;
        let id_token = tokens.id_token().ok_or(OidcError::NoIdToken)?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verify = |verifier: &CoreIdTokenVerifier<'_>| {
            id_token
                .claims(verifier, &nonce)
                .map(|claims| {
                    (
                        claims.issuer().to_string(),
                        claims.subject().to_string(),
                        claims.email().map(|e| e.to_string()),
                        claims.email_verified().unwrap_or(false),
                    )
                })
                .map_err(|e| e.clone())
        };
        let verified = match verify(&client.id_token_verifier()) {
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) if self.may_refetch_keys(&key) => {
                // The provider may have rotated its keys since they were cached.
                let jwks = CoreJsonWebKeySet::fetch_async(metadata.jwks_uri(), &http)
                    .await
                    .map_err(|e| OidcError::Unreachable(describe(&e)))?;
                self.replace_keys(&key, jwks.clone());
                let client = client_with_keys(metadata, jwks, config, redirect_url)?;
                let again = verify(&client.id_token_verifier());
                again
            }
            other => other,
        };
        let (issuer, subject, email, email_verified) =
            verified.map_err(|e| OidcError::InvalidIdToken(describe(&e)))?;
        Ok(Identity {
            issuer,
            subject,
            email,
            email_verified,
            claims: payload_of(&id_token.to_string()).unwrap_or(serde_json::Value::Null),
        })
    }
}

fn client_with_keys(
    metadata: CoreProviderMetadata,
    jwks: CoreJsonWebKeySet,
    config: &ProviderConfig,
    redirect_url: &str,
) -> Result<
    CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    >,
    OidcError,
> {
    client(metadata.set_jwks(jwks), config, redirect_url)
}

/// The token endpoint's refusal, without anything secret (the crate's error holds no token).
fn token_error<E: std::error::Error + 'static>(
    e: &openidconnect::RequestTokenError<
        E,
        openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    >,
) -> String {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => r.to_string(),
        other => describe(other),
    }
}

/// The JSON payload of a compact JWS (only ever called on a token whose signature was
/// verified), for claims the crate does not type (a role claim such as `groups`).
fn payload_of(jwt: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The provider cache as the application state holds it.
pub type SharedProviders = Arc<ProviderCache>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_of_a_compact_token_is_its_middle_part() {
        // {"alg":"none"}.{"sub":"a","groups":["x"]}.
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIiwiZ3JvdXBzIjpbIngiXX0.";
        let payload = payload_of(jwt).expect("payload");
        assert_eq!(payload["groups"][0], "x");
        assert!(payload_of("not a token").is_none());
    }
}
