//! Who is calling, and whether they may come in: [`auth`] turns a session cookie or an API
//! key into a principal; [`passwords`] hashes and checks them; [`tokens`] are the secrets
//! handed out (sessions, keys, invitations, resets); [`totp`] and [`webauthn`] are the second
//! factors;
//! [`names`] checks emails and account names; [`login_throttle`] and [`admission`] bound
//! guessing and floods; [`signup`] decides who may
//! create an account; [`mailer`] sends the emails.

pub mod admission;
pub mod allowlist;
pub mod auth;
pub mod login_throttle;
pub mod mailer;
pub mod names;
pub mod oidc;
pub mod passwords;
pub mod reach;
pub mod signup;
pub mod tokens;
pub mod totp;
pub mod webauthn;
