//! DATABASE_URL with `sslmode=verify-full`: TLS to PostgreSQL with the server verified.

use sensei_certs::CertificateAuthority;
use sensei_control_plane::store::db;
use sensei_control_plane::store::postgres_cluster::{ClusterOptions, PostgresCluster};
use sensei_e2e::{free_port, open_tempdir};

#[tokio::test]
async fn verify_full_connects_over_tls_and_refuses_an_unknown_server() {
    let ca = CertificateAuthority::generate("db test CA").expect("ca");
    let server = ca
        .issue_server_certificate(
            &["localhost".into(), "127.0.0.1".into()],
            time::Duration::days(1),
        )
        .expect("cert");
    let dir = open_tempdir();
    let port = free_port();
    let root = dir.path().join("pg");
    let cluster = tokio::task::spawn_blocking(move || {
        PostgresCluster::start(
            &root,
            &ClusterOptions {
                tcp_port: Some(port),
                tls: Some((server.cert_pem, server.key_pem)),
                throwaway: true,
                ..ClusterOptions::default()
            },
        )
    })
    .await
    .expect("join")
    .expect("TLS cluster starts");

    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).expect("write ca");
    let url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        ca_path.display()
    );
    let pool = db::connect(&url, 1).await.expect("verified TLS connection");
    let client = pool.get().await.expect("client");
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "connection is not encrypted");
    assert_eq!(row.get::<_, String>(1), "TLSv1.3");
    drop(client);
    pool.close();

    // A server whose certificate our CA file does not vouch for is refused.
    let other = CertificateAuthority::generate("someone else").expect("ca");
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, other.cert_pem()).expect("write");
    let url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        other_path.display()
    );
    let err = db::connect(&url, 1)
        .await
        .expect_err("unknown server refused");
    assert!(matches!(err, db::DbError::Connect(_)), "{err}");

    // A CA file that is missing is named in the error.
    let url = format!("postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    let err = db::connect(&url, 1).await.expect_err("missing file");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop");
}
