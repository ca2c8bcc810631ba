//! Field encryption at rest: the CA key is sealed, survives restarts, and rotates.

use std::sync::Arc;

use sensei_control_plane::secrets::field_crypto::FieldKeys;
use sensei_control_plane::secrets::rotate::{rotate, RotationReport};
use sensei_control_plane::{ControlPlane, DatabaseSource, ServeOptions, StartError};
use sensei_e2e::{fresh_database, open_tempdir, TestPlane};

#[tokio::test]
async fn ca_key_is_stored_encrypted_and_reused_after_restart() {
    let t = TestPlane::start().await;
    let fingerprint = t.plane.ca_fingerprint();
    let rows = t
        .db()
        .await
        .query("SELECT name, key_ciphertext FROM pki_material", &[])
        .await
        .expect("rows");
    assert!(rows.len() >= 2, "CA and API certificate are stored");
    for row in rows {
        let sealed: String = row.get(1);
        assert!(sealed.starts_with("gAAAAA"), "not a Fernet token");
        assert!(!sealed.contains("PRIVATE KEY"));
    }
    let conninfo = t.conninfo.clone();
    let keys = t.keys.clone();
    t.plane.shutdown().await;
    let again = TestPlane::start_on(conninfo, keys).await;
    assert_eq!(
        again.plane.ca_fingerprint(),
        fingerprint,
        "a restart made a new CA"
    );
}

async fn start_with(conninfo: &str, keys: FieldKeys) -> Result<ControlPlane, StartError> {
    let dir = open_tempdir();
    ControlPlane::start(ServeOptions {
        api_names: vec!["localhost".into()],
        pool_size: 2,
        dispatch_timeout: std::time::Duration::from_secs(60),
        database_owner_url: Some(conninfo.to_owned()),
        ..ServeOptions::new(
            dir.path().to_owned(),
            DatabaseSource::Url(sensei_e2e::app_conninfo(conninfo)),
            Arc::new(keys),
        )
    })
    .await
}

#[tokio::test]
async fn rotation_rewrites_every_field_once_and_retires_the_old_key() {
    sensei_certs::tls::install_default_provider();
    let old = FieldKeys::generate_key();
    let new = FieldKeys::generate_key();
    let conninfo = fresh_database().await;
    let plane = start_with(&conninfo, FieldKeys::parse(&old).expect("old"))
        .await
        .expect("start");
    let fingerprint = plane.ca_fingerprint();
    let pool = plane.pool().clone();

    let both = FieldKeys::parse(&format!("{new},{old}")).expect("both");
    let first = rotate(&pool, &both).await.expect("rotate");
    assert_eq!(
        first,
        // The CA, the API certificate, the job-signing key and the audit chain key.
        RotationReport {
            rewritten: 4,
            already_current: 0
        }
    );
    // Idempotent: a second run finds nothing to do.
    let second = rotate(&pool, &both).await.expect("rotate again");
    assert_eq!(
        second,
        RotationReport {
            rewritten: 0,
            already_current: 4
        }
    );
    plane.shutdown().await;

    // The new key alone now opens everything; the old key alone opens nothing.
    let plane = start_with(&conninfo, FieldKeys::parse(&new).expect("new"))
        .await
        .expect("start with the new key only");
    assert_eq!(plane.ca_fingerprint(), fingerprint);
    plane.shutdown().await;
    let err = start_with(&conninfo, FieldKeys::parse(&old).expect("old"))
        .await
        .err()
        .expect("the old key must no longer work");
    assert!(err.to_string().contains("cannot be decrypted"), "{err}");

    let actions: Vec<String> = sensei_e2e::connect(&conninfo)
        .await
        .query("SELECT action FROM audit_log", &[])
        .await
        .expect("audit")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        actions.iter().filter(|a| *a == "field_key.rotated").count(),
        2
    );
}

#[tokio::test]
async fn wrong_field_key_stops_start_with_a_clear_message() {
    sensei_certs::tls::install_default_provider();
    let conninfo = fresh_database().await;
    let plane = start_with(
        &conninfo,
        FieldKeys::parse(&FieldKeys::generate_key()).expect("k"),
    )
    .await
    .expect("start");
    plane.shutdown().await;
    let err = start_with(
        &conninfo,
        FieldKeys::parse(&FieldKeys::generate_key()).expect("k"),
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("CODESENSEI_FIELD_KEY"), "{err}");
}
