//! The control plane's CA and the API's TLS certificate, kept in PostgreSQL so that every
//! replica shares them. Private keys are stored as Fernet tokens under the field key.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sensei_certs::CertificateAuthority;

use crate::secrets::field_crypto::FieldKeys;

/// Why the certificate material could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("database: {0}")]
    Db(String),
    #[error(
        "the stored {0} key cannot be decrypted with CODESENSEI_FIELD_KEY: is this the key the \
         control plane was started with? (a rotated-out key must stay in the list until \
         rotate-field-key has run)"
    )]
    WrongFieldKey(&'static str),
    #[error(transparent)]
    Cert(#[from] sensei_certs::CertError),
}

impl From<tokio_postgres::Error> for PkiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(crate::store::db::describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for PkiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(e.to_string())
    }
}

const CA_NAME: &str = "ca";
/// The API certificate is renewed at start once fewer than this many days remain.
const RENEW_BEFORE_DAYS: i64 = 30;
const API_CERT_DAYS: i64 = 397;

/// The API's certificate chain and key, PEM.
pub struct ApiCertificate {
    pub chain_pem: String,
    pub key_pem: String,
}

pub(crate) async fn load(
    pool: &Pool,
    keys: &FieldKeys,
    name: &str,
    what: &'static str,
) -> Result<Option<(String, String, DateTime<Utc>)>, PkiError> {
    let client = pool.get().await?;
    let Some(row) = client
        .query_opt(
            "SELECT cert_pem, key_ciphertext, not_after FROM pki_material WHERE name = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let key = keys
        .decrypt(row.get::<_, &str>(1))
        .map_err(|_| PkiError::WrongFieldKey(what))?;
    let key = String::from_utf8(key).map_err(|_| PkiError::WrongFieldKey(what))?;
    Ok(Some((row.get(0), key, row.get(2))))
}

async fn store(
    pool: &Pool,
    keys: &FieldKeys,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
    not_after: DateTime<Utc>,
    replace: bool,
) -> Result<(), PkiError> {
    let client = pool.get().await?;
    let sealed = keys.encrypt(key_pem.as_bytes());
    let sql = if replace {
        "INSERT INTO pki_material (name, cert_pem, key_ciphertext, not_after) VALUES ($1,$2,$3,$4) \
         ON CONFLICT (name) DO UPDATE SET cert_pem = EXCLUDED.cert_pem, \
         key_ciphertext = EXCLUDED.key_ciphertext, not_after = EXCLUDED.not_after, created_at = now()"
    } else {
        // Two replicas starting together: the first insert wins, the other reads it back.
        "INSERT INTO pki_material (name, cert_pem, key_ciphertext, not_after) VALUES ($1,$2,$3,$4) \
         ON CONFLICT (name) DO NOTHING"
    };
    client
        .execute(sql, &[&name, &cert_pem, &sealed, &not_after])
        .await?;
    Ok(())
}

pub(crate) fn to_chrono(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), 0).unwrap_or_else(Utc::now)
}

/// Loads the CA, creating it on the very first start.
pub async fn certificate_authority(
    pool: &Pool,
    keys: &FieldKeys,
) -> Result<CertificateAuthority, PkiError> {
    if load(pool, keys, CA_NAME, "CA").await?.is_none() {
        let ca = CertificateAuthority::generate("Sensei control plane CA")?;
        let not_after = to_chrono(sensei_certs::not_after(ca.cert_pem())?);
        store(
            pool,
            keys,
            CA_NAME,
            ca.cert_pem(),
            &ca.key_pem(),
            not_after,
            false,
        )
        .await?;
        tracing::info!(fingerprint = %ca.fingerprint(), "created the control plane's certificate authority");
    }
    let (cert, key, _) = load(pool, keys, CA_NAME, "CA")
        .await?
        .ok_or_else(|| PkiError::Db("CA row vanished".into()))?;
    Ok(CertificateAuthority::from_pem(&cert, &key)?)
}

/// The API's server certificate for `names`, reused while it is valid for long enough.
pub async fn api_certificate(
    pool: &Pool,
    keys: &FieldKeys,
    ca: &CertificateAuthority,
    names: &[String],
) -> Result<ApiCertificate, PkiError> {
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.dedup();
    let name = format!("api:{}", sorted.join(","));
    let fresh_enough = |not_after: &DateTime<Utc>| {
        *not_after > Utc::now() + chrono::Duration::days(RENEW_BEFORE_DAYS)
    };
    let (cert, key) = match load(pool, keys, &name, "API certificate").await? {
        // Reused only if this CA issued it: after a CA rotation is retired, the stored one
        // comes from the retired CA.
        Some((cert, key, not_after))
            if fresh_enough(&not_after)
                && sensei_certs::tls::first_cert_der(&cert)
                    .is_ok_and(|der| sensei_certs::issued_by(&der, ca.cert_der())) =>
        {
            (cert, key)
        }
        _ => {
            let issued =
                ca.issue_server_certificate(&sorted, time::Duration::days(API_CERT_DAYS))?;
            let not_after = to_chrono(issued.not_after);
            store(
                pool,
                keys,
                &name,
                &issued.cert_pem,
                &issued.key_pem,
                not_after,
                true,
            )
            .await?;
            (issued.cert_pem, issued.key_pem)
        }
    };
    Ok(ApiCertificate {
        chain_pem: format!("{cert}{}", ca.cert_pem()),
        key_pem: key,
    })
}
