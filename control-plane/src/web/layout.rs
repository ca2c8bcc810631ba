//! The frame every page shares, and the small pieces pages repeat. Everything here is maud:
//! a value spliced into the markup is escaped; nothing builds HTML from strings.

use chrono::{DateTime, Utc};
use http::Method;
use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::guard::{Signed, CSRF_FIELD};

/// Where the navigation points, to mark the current section.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Fleet,
    Deployments,
    Projects,
    Rollouts,
    Settings,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Sensei" }
            link rel="stylesheet" href=(assets::css_url());
            script src=(assets::js_url()) defer {}
        }
    }
}

/// A page for a signed-in person: navigation by what they may read, and their sign-out.
pub fn page(title: &str, signed: &Signed, section: Section, body: Markup) -> Markup {
    let nav: [(Section, &str, &str, &str); 5] = [
        (Section::Fleet, "/ui/servers", "Fleet", "/v1/servers"),
        (
            Section::Deployments,
            "/ui/deployments",
            "Deployments",
            "/v1/deployments",
        ),
        (
            Section::Projects,
            "/ui/projects",
            "Projects",
            "/v1/projects",
        ),
        (
            Section::Rollouts,
            "/ui/rollouts",
            "Rollouts",
            "/v1/rollouts",
        ),
        (
            Section::Settings,
            "/ui/settings/sessions",
            "Settings",
            "/v1/auth/sessions",
        ),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/servers" { "Sensei" }
                    nav aria-label="Main" {
                        ul {
                            @for (s, href, label, api) in nav {
                                @if signed.may(Method::GET, api) {
                                    li {
                                        @if s == section {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span { (signed.principal.email) " (" (signed.principal.role_name()) ")" }
                        form method="post" action="/ui/sign-out" {
                            (csrf(signed))
                            button type="submit" id="sign-out" { "Sign out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    (body)
                }
            }
        }
    }
}

/// A page without a signed-in person (sign-in, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top { span.brand { "Sensei" } }
                main id="main" tabindex="-1" { (body) }
            }
        }
    }
}

/// The hidden form-token field every state-changing form carries.
pub fn csrf(signed: &Signed) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(signed.csrf); }
}

/// The form of a confirmation page: the one button that does it, and a way back.
pub fn confirm_form(
    signed: &Signed,
    action: &str,
    button_id: &str,
    button: &str,
    cancel: &str,
) -> Markup {
    html! {
        form method="post" action=(action) {
            (csrf(signed))
            button.danger type="submit" id=(button_id) { (button) }
            " "
            a href=(cancel) { "Cancel" }
        }
    }
}

/// Non-empty trimmed lines of a text area (labels, hooks, shared paths: one per line).
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// A time, machine-readable and as people read it (UTC).
pub fn time(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) }
    }
}

pub fn maybe_time(at: Option<DateTime<Utc>>) -> Markup {
    match at {
        Some(at) => time(at),
        None => html! { "—" },
    }
}

/// A status word with a class the style sheet colours.
pub fn status(word: &str) -> Markup {
    let class = match word {
        "succeeded" | "connected" => "status ok",
        "failed" | "halted" | "aborted" | "rolled_back" | "offline" => "status bad",
        "running" | "queued" | "waiting_approval" | "paused" => "status busy",
        _ => "status",
    };
    html! { span class=(class) data-status=(word) { (word) } }
}

/// Text to copy (a command, a key, a secret) with a button that copies it, for the script to
/// bring to life (hidden without it), and the live region that says it was copied. `what`
/// completes the button's name for assistive technology ("Copy the enroll command").
pub fn copyable(id: &str, what: &str, text: &str) -> Markup {
    html! {
        div.copyable {
            pre.command id=(id) { code { (text) } }
            div.copy-row {
                button.secondary type="button" data-copy=(id) hidden {
                    "Copy" span.visually-hidden { " " (what) }
                }
                span.copy-status role="status" aria-live="polite" {}
            }
        }
    }
}

/// A short prefix of an id or a commit, for tables.
pub fn short(text: &str) -> &str {
    text.get(..12).unwrap_or(text)
}

/// A one-line notice after an action, chosen from fixed texts (nothing from the URL is
/// shown as is).
pub fn notice(done: Option<&str>) -> Markup {
    let text = match done {
        Some("revoked") => "The agent certificate is revoked; the agent was disconnected.",
        Some("signed-out") => "The session is signed out.",
        Some("key-revoked") => "The API key is revoked.",
        Some("totp-off") => "The second factor is off.",
        Some("key-registered") => "The security key is registered.",
        Some("key-renamed") => "The security key is renamed.",
        Some("key-removed") => "The security key is removed.",
        Some("role-changed") => "The role is changed.",
        Some("member-removed") => "The member is removed.",
        Some("role-deleted") => "The role is deleted.",
        Some("invitation-revoked") => "The invitation is revoked.",
        Some("saved") => "Saved.",
        Some("rolled-back") => "A rollback is queued.",
        Some("created") => "Created.",
        Some("steered") => "Done.",
        Some("password-set") => "The password is set: sign in with it.",
        Some("server-deleted") => "The server is deleted; its credentials are erased.",
        Some("project-deleted") => "The project is deleted; its environment is erased.",
        Some("env-set") => "The variable is set.",
        Some("env-unset") => "The variable is removed.",
        _ => return html! {},
    };
    html! { p.notice role="status" { (text) } }
}
