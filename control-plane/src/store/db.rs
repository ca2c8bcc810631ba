//! The PostgreSQL connection pool and the schema migrations.
//!
//! `DATABASE_URL` is a libpq-style URL (`postgres://…`) or key/value string. tokio-postgres
//! does not know libpq's `sslrootcert` nor the `verify-*` modes, so those two settings are taken
//! out here and turned into a rustls connector. Only `disable` (no TLS: the embedded socket)
//! and `verify-full` (TLS 1.3, CA and host name checked) are accepted: a mode that encrypts
//! without verifying the server gives a false sense of safety, so it is refused.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Why the database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    #[error("DATABASE_URL is invalid: {0}")]
    BadUrl(String),
    #[error(
        "DATABASE_URL asks for sslmode={0}; Sensei accepts sslmode=disable (a local socket) or \
         sslmode=verify-full with sslrootcert=<CA file>, so that the server is always verified"
    )]
    UnsupportedSslMode(String),
    #[error("sslmode=verify-full needs sslrootcert=<path to the CA certificate (PEM)>")]
    MissingRootCert,
    #[error("cannot read sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("database migration failed: {0}")]
    Migrate(String),
    #[error(
        "refusing to serve: {0}, so the application could rewrite the audit log. Run with two \
         roles: an owner that runs migrations (DATABASE_OWNER_URL, or `sensei-control-plane \
         migrate`) and an application role for DATABASE_URL that owns nothing \
         (docs/operations.md, \"Two database roles\")"
    )]
    AuditOwner(String),
    #[error(
        "the database schema is at migration {applied}, this binary needs {latest}: run \
         `sensei-control-plane migrate` with DATABASE_OWNER_URL (the owner role), or set \
         DATABASE_OWNER_URL for serve"
    )]
    SchemaBehind { applied: i32, latest: i32 },
}

/// Connection settings split into what tokio-postgres understands and the TLS choice.
struct ParsedUrl {
    config: tokio_postgres::Config,
    root_cert: Option<String>,
}

fn parse_url(url: &str) -> Result<ParsedUrl, DbError> {
    let mut sslmode = None;
    let mut rootcert = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| match kv.split_once('=') {
                        Some(("sslmode", v)) => {
                            sslmode = Some(v.to_owned());
                            false
                        }
                        Some(("sslrootcert", v)) => {
                            rootcert = Some(percent_decode(v));
                            false
                        }
                        _ => true,
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| match kv.split_once('=') {
                Some(("sslmode", v)) => {
                    sslmode = Some(v.to_owned());
                    false
                }
                Some(("sslrootcert", v)) => {
                    rootcert = Some(v.to_owned());
                    false
                }
                _ => true,
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let config =
        tokio_postgres::Config::from_str(&rest).map_err(|e| DbError::BadUrl(e.to_string()))?;
    match sslmode.as_deref() {
        None | Some("disable") => Ok(ParsedUrl {
            config,
            root_cert: None,
        }),
        Some("verify-full") => Ok(ParsedUrl {
            config,
            root_cert: Some(rootcert.ok_or(DbError::MissingRootCert)?),
        }),
        Some(other) => Err(DbError::UnsupportedSslMode(other.to_owned())),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The channel live-follow streams listen on: the triggers of migration V12 notify it of
/// deployments and rollouts, the agent gateway of agents' presence.
pub const LIVE_CHANNEL: &str = "sensei_live";

/// How long a request waits for a pooled connection (or for a new one to open).
pub const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens a pool for `url` (at most `max_size` connections) and checks one connection works.
pub async fn connect(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let ParsedUrl {
        mut config,
        root_cert,
    } = parse_url(url)?;
    if config.get_application_name().is_none() {
        config.application_name("sensei-control-plane");
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match root_cert {
        None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
        Some(path) => {
            let pem = std::fs::read_to_string(&path).map_err(|e| DbError::RootCert {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let tls =
                sensei_certs::tls::client_config_trusting(&pem).map_err(|e| DbError::RootCert {
                    path,
                    message: e.to_string(),
                })?;
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            )
        }
    };
    // A request waits at most POOL_WAIT for a connection and then answers 503
    // `database_unavailable`, instead of queueing without end behind slow work.
    let pool = Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .build()
        .map_err(|e| DbError::Connect(e.to_string()))?;
    let client = pool
        .get()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    Ok(pool)
}

/// Notifications received on a LISTEN connection, as (channel, payload), until the connection
/// ends.
pub type Notifications = futures_util::stream::BoxStream<'static, (String, String)>;

/// Listens on `channels` until `shutdown`, reconnecting a second after the connection fails
/// or drops. `connected` runs each time the listener is (re)established: notifications sent
/// while it was down were lost, so that is where a caller re-reads the truth from the tables.
/// `notified` gets each (channel, payload). `what` names the listener in the log.
pub async fn listen_until_shutdown<C, F>(
    url: &str,
    channels: &[&str],
    what: &str,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut connected: C,
    mut notified: impl FnMut(&str, &str),
) where
    C: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    use futures_util::StreamExt;
    loop {
        match listen(url, channels).await {
            Ok((_client, mut messages)) => {
                connected().await;
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        message = messages.next() => match message {
                            Some((channel, payload)) => notified(&channel, &payload),
                            None => break,
                        },
                    }
                }
                tracing::warn!(listener = what, "notifications interrupted; reconnecting");
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "cannot open the notification connection")
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Opens a dedicated (unpooled) connection that LISTENs on `channels`. The client must be kept
/// alive as long as the stream is read.
pub async fn listen(
    url: &str,
    channels: &[&str],
) -> Result<(tokio_postgres::Client, Notifications), DbError> {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;

    fn payloads<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> Notifications
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx))
            .take_while(|m| std::future::ready(m.is_ok()))
            .filter_map(|m| {
                std::future::ready(match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        Some((n.channel().to_owned(), n.payload().to_owned()))
                    }
                    _ => None,
                })
            })
            .boxed()
    }

    let ParsedUrl { config, root_cert } = parse_url(url)?;
    let connect_err = |e: tokio_postgres::Error| DbError::Connect(describe(&e));
    let (client, stream) = match root_cert {
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(connect_err)?;
            (client, payloads(connection))
        }
        Some(path) => {
            let pem = std::fs::read_to_string(&path).map_err(|e| DbError::RootCert {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let tls =
                sensei_certs::tls::client_config_trusting(&pem).map_err(|e| DbError::RootCert {
                    path,
                    message: e.to_string(),
                })?;
            let mut config = config;
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, connection) = config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(connect_err)?;
            (client, payloads(connection))
        }
    };
    // The stream drives the connection, so it must be polled for LISTEN to complete.
    let statement: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    let listen = client.batch_execute(&statement);
    let mut stream = stream;
    let listen = {
        let mut listen = std::pin::pin!(listen);
        loop {
            tokio::select! {
                done = &mut listen => break done,
                early = stream.next() => if early.is_none() {
                    return Err(DbError::Connect("notification connection closed".into()));
                },
            }
        }
    };
    listen.map_err(connect_err)?;
    Ok((client, stream))
}

/// The role the embedded cluster's application connects as (its owner is `postgres`).
pub const EMBEDDED_APP_ROLE: &str = "sensei_app";

/// Applies pending migrations as the owner role, then grants `app_role` what the application
/// needs (when given). Replicas starting together serialise on an advisory lock, which also
/// keeps their GRANTs from colliding.
pub async fn migrate(owner: &Pool, app_role: Option<&str>) -> Result<(), DbError> {
    const MIGRATION_LOCK: i64 = 0x5e45_e100;
    let mut client = owner
        .get()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| DbError::Migrate(e.to_string()))?;
    let mut result = embedded::migrations::runner()
        .run_async(&mut **client)
        .await
        .map(|_| ())
        .map_err(|e| DbError::Migrate(e.to_string()));
    if let (Ok(()), Some(role)) = (&result, app_role) {
        result = grant_application(&client, role).await;
    }
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlock.map_err(|e| DbError::Migrate(e.to_string()))?;
    Ok(())
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What the application role may do: read and write the product's tables, but on the audit
/// tables only read and append; expiry only through `audit_expire_through`; the migration
/// history only read. Idempotent: it runs after every migration.
async fn grant_application(owner: &tokio_postgres::Client, role: &str) -> Result<(), DbError> {
    let exists = owner
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .map_err(|e| DbError::Migrate(describe(&e)))?;
    if exists.is_none() {
        return Err(DbError::Migrate(format!(
            "the application role {role} (the user of DATABASE_URL) does not exist; create it \
             with CREATE ROLE {role} LOGIN PASSWORD '…' (docs/operations.md, \"Two database \
             roles\")"
        )));
    }
    let r = ident(role);
    let statements = format!(
        "GRANT USAGE ON SCHEMA public TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {r};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {r};
         REVOKE ALL ON audit_log, audit_checkpoints, refinery_schema_history FROM {r};
         GRANT SELECT, INSERT ON audit_log TO {r};
         GRANT SELECT ON audit_checkpoints, refinery_schema_history TO {r};
         GRANT EXECUTE ON FUNCTION audit_expire_through(uuid, bigint) TO {r};"
    );
    owner
        .batch_execute(&statements)
        .await
        .map_err(|e| DbError::Migrate(format!("granting the application role: {}", describe(&e))))
}

/// Refuses to serve as a role that could rewrite the audit log: a superuser, the owner of the
/// audit table or a member of the owner's role.
pub async fn check_application_role(pool: &Pool) -> Result<(), DbError> {
    let client = pool
        .get()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, \
                    pg_has_role(current_user, c.relowner, 'USAGE'), pg_get_userbyid(c.relowner)::text \
             FROM pg_roles r, pg_class c \
             WHERE r.rolname = current_user AND c.oid = 'public.audit_log'::regclass",
            &[],
        )
        .await
        .map_err(|e| DbError::Connect(describe(&e)))?;
    let (me, superuser, owns, owner): (String, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if superuser || owns {
        let why = if superuser {
            format!("{me} is a superuser")
        } else {
            format!("{me} owns the audit log (or acts as its owner {owner})")
        };
        return Err(DbError::AuditOwner(why));
    }
    Ok(())
}

/// Refuses a schema older than this binary when there is no owner to migrate it.
pub async fn ensure_current(pool: &Pool) -> Result<(), DbError> {
    let applied = applied_migration(pool).await.unwrap_or(0);
    let latest = latest_migration();
    if applied < latest {
        return Err(DbError::SchemaBehind { applied, latest });
    }
    Ok(())
}

/// The role a connection string connects as.
pub fn role_of(url: &str) -> Result<String, DbError> {
    let parsed = parse_url(url)?;
    parsed
        .config
        .get_user()
        .map(str::to_owned)
        .ok_or_else(|| DbError::BadUrl("no user in the connection string".into()))
}

/// The result of asking the database to answer a query now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A query ran.
    Answered,
    /// No connection could run one within the probe's deadline.
    Unreachable,
}

/// Runs `SELECT 1` on a pooled connection, within `deadline`.
///
/// The pool recycles connections without checking them (`RecyclingMethod::Fast`), so it may
/// hand out one that PostgreSQL has already closed. Such a connection says nothing about the
/// database: it is detached from the pool (so no request gets it later) and the next one is
/// tried, at most once per pool slot plus one fresh connection.
pub async fn probe(pool: &Pool, deadline: std::time::Duration) -> Probe {
    let attempts = pool.status().max_size + 1;
    let run = async {
        for _ in 0..attempts {
            let Ok(client) = pool.get().await else {
                return Probe::Unreachable;
            };
            match client.simple_query("SELECT 1").await {
                Ok(_) => return Probe::Answered,
                Err(e) if e.is_closed() || client.is_closed() => {
                    drop(deadpool_postgres::Object::take(client));
                }
                Err(_) => return Probe::Unreachable,
            }
        }
        Probe::Unreachable
    };
    tokio::time::timeout(deadline, run)
        .await
        .unwrap_or(Probe::Unreachable)
}

/// The newest migration this binary carries.
pub fn latest_migration() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i32::try_from(m.version()).expect("migration versions are small"))
        .max()
        .unwrap_or(0)
}

/// The newest migration applied to the database (0 before the first).
pub async fn applied_migration(pool: &Pool) -> Result<i32, DbError> {
    let client = pool
        .get()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) AS version FROM refinery_schema_history",
            &[],
        )
        .await
        .map_err(|e| DbError::Connect(describe(&e)))?;
    Ok(row.get("version"))
}

/// Maps any database error into a short message for logs (never with parameters).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_without_ssl_is_plain() {
        let p = parse_url("postgres://u@localhost:5433/db").expect("parse");
        assert!(p.root_cert.is_none());
        assert_eq!(p.config.get_dbname(), Some("db"));
    }

    #[test]
    fn verify_full_takes_root_cert_out_of_the_url() {
        let p = parse_url(
            "postgresql://u:p@db.example:5432/sensei?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .expect("parse");
        assert_eq!(p.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(p.config.get_dbname(), Some("sensei"));
    }

    #[test]
    fn key_value_form_is_accepted() {
        let p = parse_url("host=/tmp/s port=5432 user=postgres dbname=x sslmode=disable")
            .expect("parse");
        assert!(p.root_cert.is_none());
    }

    #[test]
    fn unverified_tls_modes_are_refused() {
        for mode in ["require", "prefer", "allow", "verify-ca"] {
            let err = parse_url(&format!("postgres://u@h/db?sslmode={mode}"))
                .err()
                .expect("refused");
            assert!(matches!(err, DbError::UnsupportedSslMode(ref m) if m == mode));
        }
        assert!(matches!(
            parse_url("postgres://u@h/db?sslmode=verify-full").err(),
            Some(DbError::MissingRootCert)
        ));
    }

    #[test]
    fn garbage_url_is_refused() {
        assert!(matches!(
            parse_url("postgres://u@h:notaport/db"),
            Err(DbError::BadUrl(_))
        ));
    }
}
