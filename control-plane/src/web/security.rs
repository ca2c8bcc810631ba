//! Settings → Security: the signed-in person's second factor. Setting up TOTP shows the
//! secret once and asks for a code from it before it is on; the recovery codes are shown
//! once at that moment. Turning it off takes a current code or a recovery code.
//!
//! This is also where someone lands whose account requires a second factor they have not set
//! up: every other page is refused to them, as every other API route is.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup, PreEscaped};
use serde::Deserialize;

use super::guard::{Signed, TokenForm};
use super::layout::{self, Section};
use super::settings::{tabs, Done};
use super::WebError;
use crate::api::auth_routes;
use crate::api::extract::JsonBody;
use crate::api::mfa::{self, TotpCode};
use crate::api::AppState;

/// Longest code accepted (a recovery code is longer than a TOTP code).
const MAX_CODE: usize = 64;

/// `GET /ui/settings/security`
pub async fn page(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/auth/me")?;
    let me = auth_routes::me(State(state.clone()), Extension(signed.principal.clone()))
        .await?
        .0;
    let keys = super::webauthn::section(&state, &signed).await?;
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/security"))
        (layout::notice(done.done.as_deref()))
        h2 { "Second factor" }
        @if me.mfa_setup_required {
            p.error role="alert" { "Your account requires a second factor: set one up to use the dashboard." }
        }
        @if me.totp_enabled {
            p id="totp-state" { "Sign-in asks for a code from your authenticator app (TOTP)." }
            form.stack method="post" action="/ui/settings/security/totp/disable" {
                (layout::csrf(&signed))
                label for="code" { "A current code, or a recovery code, to turn it off" }
                input id="code" name="code" type="text" autocomplete="one-time-code" required maxlength=(MAX_CODE);
                button.danger type="submit" id="disable-totp" { "Turn off the second factor" }
            }
        } @else {
            p id="totp-state" { "Sign-in asks only for your password." }
            form method="post" action="/ui/settings/security/totp" {
                (layout::csrf(&signed))
                button type="submit" id="enroll-totp" { "Set up an authenticator app" }
            }
        }
        (keys)
    };
    Ok(layout::page("Security", &signed, Section::Settings, body))
}

fn confirm_form(signed: &Signed, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.stack method="post" action="/ui/settings/security/totp/confirm" {
            (layout::csrf(signed))
            label for="code" { "The 6-digit code the app shows now" }
            input id="code" name="code" type="text" inputmode="numeric" autocomplete="one-time-code"
                required maxlength=(MAX_CODE);
            button type="submit" id="confirm-totp" { "Turn on" }
        }
    }
}

/// `POST /ui/settings/security/totp`: a new secret, shown once, pending until confirmed.
pub async fn enroll(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp",
    )?;
    let (_, enrolled) = mfa::enroll(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
    )
    .await?;
    let enrolled = enrolled.0;
    let qr = qr_svg(&enrolled.otpauth_uri);
    let body = html! {
        h1 { "Set up an authenticator app" }
        p { "Scan this code with your authenticator app, or type the secret in (or open the otpauth link on a device that has one). "
            "It is shown only this once." }
        @if let Some(svg) = qr {
            figure.qr { (PreEscaped(svg)) }
        }
        dl.facts {
            dt { "Secret" } dd { code id="totp-secret" { (enrolled.secret) } }
            dt { "Link" } dd { code.wrap id="totp-uri" { (enrolled.otpauth_uri) } }
        }
        (confirm_form(&signed, None))
    };
    Ok((
        StatusCode::CREATED,
        layout::page("Authenticator", &signed, Section::Settings, body),
    )
        .into_response())
}

/// `text` (the `otpauth://` link) as a QR code: an SVG drawn here, inline in the page, so the
/// secret goes to no image service and the page needs nothing its policy forbids (the
/// colours are attributes, not styles). One unit of the drawing is one module; the style
/// sheet sizes it. `None` when the text is too long for a QR code (it never is).
fn qr_svg(text: &str) -> Option<String> {
    let code =
        qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::M).ok()?;
    let svg = code
        .render::<qrcode::render::svg::Color>()
        .module_dimensions(1, 1)
        .quiet_zone(true)
        .build();
    // Inline in HTML: without the XML declaration, and named for assistive technology.
    let svg = &svg[svg.find("<svg ")?..];
    Some(svg.replacen(
        "<svg ",
        "<svg id=\"totp-qr\" role=\"img\" aria-label=\"QR code of the otpauth link below\" ",
        1,
    ))
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

/// `POST /ui/settings/security/totp/confirm`: on with a right code; the recovery codes,
/// once.
pub async fn confirm(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp/confirm",
    )?;
    let code = form.code.trim().chars().take(MAX_CODE).collect();
    let answer = mfa::confirm(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(TotpCode { code }),
    )
    .await;
    let codes = match answer {
        Ok(codes) => codes.0,
        // A wrong code: the same secret stays pending; ask again.
        Err(e) if e.code() == "invalid_mfa_code" => {
            let body = html! {
                h1 { "Set up an authenticator app" }
                (confirm_form(&signed, Some(e.message())))
            };
            return Ok((
                e.status(),
                layout::page("Authenticator", &signed, Section::Settings, body),
            )
                .into_response());
        }
        Err(e) => return Err(e.into()),
    };
    let body = html! {
        h1 { "The second factor is on" }
        p { "Keep these recovery codes somewhere safe: each signs you in once if you lose the app. "
            "They are shown only this once." }
        ul.codes id="recovery-codes" {
            @for c in &codes.recovery_codes { li { code { (c) } } }
        }
        p { a href="/ui/settings/security" { "Done" } }
    };
    Ok(layout::page("Recovery codes", &signed, Section::Settings, body).into_response())
}

/// `POST /ui/settings/security/totp/disable`
pub async fn disable(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Redirect, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp/disable",
    )?;
    let code = form.code.trim().chars().take(MAX_CODE).collect();
    mfa::disable(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(TotpCode { code }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/security?done=totp-off"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws the SVG's dark rectangles (`M{x} {y}h{w}v{h}H{x}V{y}`, in modules) into a
    /// bitmap, `scale` pixels a module.
    fn rasterize(svg: &str, scale: usize) -> (usize, Vec<bool>) {
        let size: usize = svg
            .split("viewBox=\"0 0 ")
            .nth(1)
            .and_then(|v| v.split(' ').next())
            .and_then(|w| w.parse().ok())
            .expect("a viewBox");
        let path = svg
            .split(" d=\"")
            .nth(1)
            .and_then(|d| d.split('"').next())
            .expect("a path");
        let numbers = |text: &str| -> Vec<usize> {
            text.split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .map(|n| n.parse().expect("number"))
                .collect()
        };
        let side = size * scale;
        let mut pixels = vec![false; side * side];
        for rect in path.split('M').filter(|r| !r.is_empty()) {
            let n = numbers(rect);
            let (x, y, w, h) = (n[0], n[1], n[2], n[3]);
            for row in y * scale..(y + h) * scale {
                for col in x * scale..(x + w) * scale {
                    pixels[row * side + col] = true;
                }
            }
        }
        (side, pixels)
    }

    #[test]
    fn the_qr_code_decodes_to_the_otpauth_link() {
        let secret = crate::identity::totp::generate_secret();
        let uri = crate::identity::totp::otpauth_uri(&secret, "Sensei", "ops@example.com");
        let svg = qr_svg(&uri).expect("an svg");
        assert!(svg.starts_with("<svg id=\"totp-qr\" role=\"img\""), "{svg}");
        assert!(!svg.contains("<?xml") && !svg.contains("style"), "{svg}");
        let (side, pixels) = rasterize(&svg, 4);
        let mut image =
            rqrr::PreparedImage::prepare_from_bitmap(side, side, |x, y| pixels[y * side + x]);
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().expect("decodes");
        assert_eq!(content, uri);
    }
}
