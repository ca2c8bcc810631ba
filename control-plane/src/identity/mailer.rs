//! Outgoing email (password resets, invitations) through SMTP with lettre.
//!
//! The SMTP URL may carry a password, so it is never logged. Without SMTP, messages are
//! written to the log only in development mode (quickstart), where nobody else reads it;
//! a production control plane without SMTP says a message could not be sent and keeps the
//! link out of the log.

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// How mail leaves, from the command line.
#[derive(Debug, Clone, Default)]
pub struct MailSettings {
    /// `smtp://host:port`, `smtp://user:pass@host:587?tls=required`, or `smtps://host:465`.
    pub smtp_url: Option<String>,
    /// The sender address; default `Sensei <sensei@localhost>`.
    pub from: Option<String>,
    /// Development mode: with no SMTP, write messages (links included) to the log.
    pub log_when_unset: bool,
}

/// Why mail settings are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailConfigError {
    #[error("SENSEI_SMTP_URL is not a usable SMTP URL ({0}); expected smtp://host:port, smtp://user:pass@host:587?tls=required or smtps://host:465")]
    Url(String),
    #[error("SENSEI_SMTP_FROM is not an email address: {0}")]
    From(String),
}

enum Route {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Log,
    Nowhere,
}

/// Sends the control plane's messages.
pub struct Mailer {
    route: Route,
    from: Mailbox,
}

impl Mailer {
    pub fn new(settings: &MailSettings) -> Result<Self, MailConfigError> {
        let from = settings
            .from
            .as_deref()
            .unwrap_or("Sensei <sensei@localhost>")
            .parse::<Mailbox>()
            .map_err(|e| MailConfigError::From(e.to_string()))?;
        let route = match settings
            .smtp_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            Some(url) => Route::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.trim())
                    // The error text can quote the URL, password included: keep only its kind.
                    .map_err(|e| MailConfigError::Url(kind_of(&e)))?
                    .timeout(Some(std::time::Duration::from_secs(20)))
                    .build(),
            ),
            None if settings.log_when_unset => Route::Log,
            None => Route::Nowhere,
        };
        Ok(Self { route, from })
    }

    /// Whether messages actually reach anyone (SMTP configured).
    pub fn delivers(&self) -> bool {
        matches!(self.route, Route::Smtp(_))
    }

    /// Sends one plain-text message. Failures are logged, not returned: callers answer the
    /// same whether or not a message went out, so that responses reveal nothing.
    pub async fn send(&self, to: &str, subject: &str, body: &str) {
        match &self.route {
            Route::Smtp(transport) => {
                let message = to
                    .parse::<Mailbox>()
                    .map_err(|e| e.to_string())
                    .and_then(|to| {
                        Message::builder()
                            .from(self.from.clone())
                            .to(to)
                            .subject(subject)
                            .body(body.to_owned())
                            .map_err(|e| e.to_string())
                    });
                let result = match message {
                    Ok(message) => transport.send(message).await.map_err(|e| kind_of(&e)),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(_) => tracing::info!(subject, "email sent"),
                    Err(error) => tracing::warn!(subject, %error, "email could not be sent"),
                }
            }
            Route::Log => tracing::info!(
                to,
                subject,
                body,
                "development mode, no SMTP configured: this email was not sent"
            ),
            Route::Nowhere => tracing::warn!(
                subject,
                "no SMTP configured (SENSEI_SMTP_URL): an email could not be sent"
            ),
        }
    }
}

fn kind_of(e: &dyn std::fmt::Display) -> String {
    // lettre's messages name the failing step; strip anything after a URL scheme to be safe.
    let text = e.to_string();
    match text.find("://") {
        Some(at) => format!("{}…", &text[..at]),
        None => text,
    }
}
