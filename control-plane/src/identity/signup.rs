//! Who may create an account. A control plane run for one organisation must not let a
//! stranger who finds its address make an account on it, so `serve` takes no signups unless
//! its operator says otherwise:
//!
//! - `closed` (the default): `POST /v1/auth/signup` is refused; the first owner of an account
//!   is made by the operator with `sensei-control-plane create-owner`. Members join existing
//!   accounts by invitation, in every mode: that is the account's business, not a stranger's.
//! - `invite-only`: signup needs a single-use signup invitation the operator issues with
//!   `sensei-control-plane invite-signup` (for a hosted plane that grows by hand).
//! - `open`: anyone may sign up (a hosted service), throttled per client address.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::json;
use uuid::Uuid;

use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::tokens::{Token, TokenKind};
use crate::secrets::field_crypto::FieldKeys;

/// Who may create an account through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SignupPolicy {
    /// Anyone (throttled per address).
    Open,
    /// Whoever holds a signup invitation from `invite-signup`.
    InviteOnly,
    /// Nobody: owners come from `create-owner`.
    #[default]
    Closed,
}

impl SignupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::InviteOnly => "invite-only",
            Self::Closed => "closed",
        }
    }
}

/// How long an owner's password-setting link from `create-owner` works.
pub const OWNER_LINK_HOURS: i32 = 24;
/// The longest a signup invitation may be valid.
pub const MAX_INVITATION_DAYS: u64 = 30;

/// A new account and its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewAccount {
    pub account_id: Uuid,
    pub user_id: Uuid,
}

/// Creates an account named `account_name` owned by `email` (already normalised) with
/// `password_hash`; `None` when the email already belongs to a user (nothing is written).
pub async fn insert_account_with_owner(
    tx: &mut tokio_postgres::Transaction<'_>,
    email: &str,
    account_name: &str,
    password_hash: &str,
) -> Result<Option<NewAccount>, tokio_postgres::Error> {
    let new = NewAccount {
        account_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
    };
    let savepoint = tx.savepoint("new_account").await?;
    savepoint
        .execute(
            "INSERT INTO accounts (id, name) VALUES ($1, $2)",
            &[&new.account_id, &account_name],
        )
        .await?;
    let inserted = savepoint
        .execute(
            "INSERT INTO users (id, account_id, email, password_hash, role) \
             VALUES ($1, $2, $3, $4, 'owner') ON CONFLICT DO NOTHING",
            &[&new.user_id, &new.account_id, &email, &password_hash],
        )
        .await?;
    if inserted == 0 {
        savepoint.rollback().await?;
        return Ok(None);
    }
    savepoint.commit().await?;
    Ok(Some(new))
}

/// A signup invitation was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidInvitation;

/// Checks a signup invitation without spending it (before any password is hashed).
pub async fn check_invitation(
    client: &impl tokio_postgres::GenericClient,
    text: &str,
) -> Result<(), InvalidInvitation> {
    find_invitation(client, text, false).await.map(|_| ())
}

/// Spends a signup invitation for `account_id`, under its row lock.
pub async fn redeem_invitation(
    tx: &tokio_postgres::Transaction<'_>,
    text: &str,
    account_id: Uuid,
) -> Result<(), InvalidInvitation> {
    let id = find_invitation(tx, text, true).await?;
    tx.execute(
        "UPDATE signup_invitations SET used_at = now(), account_id = $2 \
         WHERE id = $1 AND used_at IS NULL",
        &[&id, &account_id],
    )
    .await
    .map_err(|_| InvalidInvitation)
    .and_then(|n| {
        if n == 1 {
            Ok(())
        } else {
            Err(InvalidInvitation)
        }
    })
}

async fn find_invitation(
    client: &impl tokio_postgres::GenericClient,
    text: &str,
    lock: bool,
) -> Result<Uuid, InvalidInvitation> {
    let token = Token::parse(TokenKind::SignupInvitation, text.trim()).ok_or(InvalidInvitation)?;
    let row = client
        .query_opt(
            &format!(
                "SELECT secret_hash FROM signup_invitations \
                 WHERE id = $1 AND used_at IS NULL AND expires_at > now(){}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &[&token.id],
        )
        .await
        .map_err(|_| InvalidInvitation)?
        .ok_or(InvalidInvitation)?;
    if token.matches(row.get::<_, &[u8]>(0)) {
        Ok(token.id)
    } else {
        Err(InvalidInvitation)
    }
}

/// Issues a signup invitation valid for `valid_for`; returns the token, shown once.
pub async fn issue_invitation(
    pool: &Pool,
    keys: &FieldKeys,
    valid_for: Duration,
    note: &str,
) -> anyhow::Result<String> {
    let token = Token::generate();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO signup_invitations (id, secret_hash, note, expires_at) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        &[
            &token.id,
            &token.secret_hash(),
            &note,
            &valid_for.as_secs_f64(),
        ],
    )
    .await?;
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "signup_invitation.issued",
            target: Some(("signup_invitation", token.id)),
            outcome: Outcome::Success,
            metadata: json!({ "note": note, "valid_secs": valid_for.as_secs() }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(token.render(TokenKind::SignupInvitation))
}

/// What `create-owner` made.
pub struct CreatedOwner {
    pub account: NewAccount,
    /// The password-reset token that sets the owner's first password, when none was given.
    pub password_link: Option<String>,
}

/// Why `create-owner` made nothing.
#[derive(Debug, thiserror::Error)]
pub enum CreateOwnerError {
    #[error("{0}")]
    Invalid(String),
    #[error("a user with the email {0} already exists")]
    EmailTaken(String),
    #[error(transparent)]
    Database(#[from] anyhow::Error),
}

/// Creates an account and its owner, as the operator (`create-owner`, the quickstart's demo
/// account). With `password`, the owner can sign in at once; without, the answer holds a
/// single-use token, valid for [`OWNER_LINK_HOURS`], that sets it.
pub async fn create_owner(
    pool: &Pool,
    keys: &FieldKeys,
    email: &str,
    account_name: &str,
    password: Option<String>,
) -> Result<CreatedOwner, CreateOwnerError> {
    let email = super::names::normalise_email(email)
        .map_err(|e| CreateOwnerError::Invalid(e.to_string()))?;
    let account_name = super::names::account_name(account_name)
        .map_err(|e| CreateOwnerError::Invalid(e.to_string()))?;
    let chosen = password.is_some();
    let password = match password {
        Some(p) => {
            crate::identity::passwords::check_policy(&p)
                .map_err(|e| CreateOwnerError::Invalid(e.to_string()))?;
            p
        }
        // Nobody knows this one: the owner sets a password with the link.
        None => Token::generate().render(TokenKind::PasswordReset),
    };
    let hash = tokio::task::spawn_blocking(move || crate::identity::passwords::hash(&password))
        .await
        .map_err(|e| CreateOwnerError::Database(e.into()))?;
    let db = |e: tokio_postgres::Error| CreateOwnerError::Database(e.into());
    let mut client = pool
        .get()
        .await
        .map_err(|e| CreateOwnerError::Database(e.into()))?;
    let mut tx = client.transaction().await.map_err(db)?;
    let account = insert_account_with_owner(&mut tx, &email, &account_name, &hash)
        .await
        .map_err(db)?
        .ok_or_else(|| CreateOwnerError::EmailTaken(email.clone()))?;
    let password_link = if chosen {
        None
    } else {
        let token = Token::generate();
        tx.execute(
            "INSERT INTO password_resets (id, user_id, secret_hash, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(hours => $4))",
            &[
                &token.id,
                &account.user_id,
                &token.secret_hash(),
                &OWNER_LINK_HOURS,
            ],
        )
        .await
        .map_err(db)?;
        Some(token.render(TokenKind::PasswordReset))
    };
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account.account_id),
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "account.created",
            target: Some(("account", account.account_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "owner_id": account.user_id.to_string(),
                "by": "create-owner",
                "password_set": chosen,
            }),
        },
    )
    .await
    .map_err(|e| CreateOwnerError::Database(e.into()))?;
    tx.commit().await.map_err(db)?;
    Ok(CreatedOwner {
        account,
        password_link,
    })
}
