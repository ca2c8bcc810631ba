//! The dashboard's script and style sheet, embedded in the binary and served under names
//! that carry a hash of their content: a new build's file has a new name, so browsers may
//! cache each name forever and never run an old script against a new page.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

const SCRIPT: &[u8] = include_bytes!("static/app.js");
const STYLE: &[u8] = include_bytes!("static/app.css");

struct Asset {
    name: String,
    body: &'static [u8],
    content_type: &'static str,
}

fn named(stem: &str, ext: &str, body: &'static [u8], content_type: &'static str) -> Asset {
    let digest = Sha256::digest(body);
    Asset {
        name: format!("{stem}.{}.{ext}", hex::encode(&digest[..8])),
        body,
        content_type,
    }
}

fn assets() -> &'static [Asset; 2] {
    static ASSETS: OnceLock<[Asset; 2]> = OnceLock::new();
    ASSETS.get_or_init(|| {
        [
            named("app", "js", SCRIPT, "text/javascript; charset=utf-8"),
            named("app", "css", STYLE, "text/css; charset=utf-8"),
        ]
    })
}

pub fn js_url() -> String {
    format!("/ui/static/{}", assets()[0].name)
}

pub fn css_url() -> String {
    format!("/ui/static/{}", assets()[1].name)
}

/// `GET /ui/static/{file}`: only the current names exist.
pub async fn serve(Path(file): Path<String>) -> Response {
    match assets().iter().find(|a| a.name == file) {
        Some(asset) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(asset.content_type),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=31536000, immutable"),
                ),
            ],
            asset.body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_content_hash() {
        assert!(js_url().starts_with("/ui/static/app."));
        assert!(js_url().ends_with(".js"));
        assert_ne!(js_url(), css_url());
        let hex = &assets()[0].name["app.".len().."app.".len() + 16];
        assert_eq!(hex, &hex::encode(&Sha256::digest(SCRIPT)[..8]));
    }
}
