//! Request extractors whose failures speak the API's error format.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::Json;
use http::request::Parts;
use http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// The TCP peer of the connection, inserted by the HTTPS accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Longest user agent kept (sessions list, audit rows).
const MAX_USER_AGENT: usize = 512;

/// Where a request came from: address and user agent.
#[derive(Debug, Clone)]
pub struct ClientMeta {
    pub ip: IpAddr,
    pub user_agent: String,
}

impl ClientMeta {
    pub fn from_parts(parts: &Parts) -> Self {
        // The client address as `edge::request_context` found it (through trusted proxies
        // only); the TCP peer where that middleware did not run.
        let ip = parts
            .extensions
            .get::<super::edge::ClientAddr>()
            .map(|c| c.0)
            .or_else(|| parts.extensions.get::<PeerAddr>().map(|p| p.0.ip()))
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let user_agent = parts
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(MAX_USER_AGENT)
            .collect();
        Self { ip, user_agent }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::from_parts(parts))
    }
}

/// A JSON body, with errors in the API's format (the body size limit is a router layer).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

/// A JSON body that may be left out: an empty body is `None`; anything else must be JSON
/// like [`JsonBody`]'s.
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        // The router's body limit still applies: this reads at most MAX_BODY_BYTES.
        let bytes =
            axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state)
                .await
                .map_err(|r| {
                    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        body_too_large()
                    } else {
                        ApiError::bad_request(ErrorCode::UnreadableBody, r.body_text())
                    }
                })?;
        if bytes.is_empty() {
            return Ok(Self(None));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        JsonBody::<T>::from_request(req, state)
            .await
            .map(|JsonBody(v)| Self(Some(v)))
    }
}

/// The answer to a body over the router's limit, whichever extractor met it.
fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::BodyTooLarge,
        format!("request body exceeds {} bytes", super::MAX_BODY_BYTES),
    )
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            ApiError::unprocessable(ErrorCode::InvalidField, e.body_text())
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request(ErrorCode::MalformedJson, "request body is not valid JSON")
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => body_too_large(),
        other => ApiError::bad_request(ErrorCode::UnreadableBody, other.body_text()),
    }
}

/// Query-string parameters, with errors in the API's format (400 `invalid_filter`, naming
/// the parameter) instead of axum's plain-text answer.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(
                ErrorCode::InvalidFilter,
                rejection.body_text(),
            )),
        }
    }
}

/// Path parameters (ids), with errors in the API's format (400 `invalid_id`) instead of
/// axum's plain-text answer.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(
                ErrorCode::InvalidId,
                format!("{}: ids are UUIDs", rejection.body_text()),
            )),
        }
    }
}
