//! `sensei-control-plane quickstart`: the whole product on one machine with nothing
//! configured. It uses the embedded database (unless DATABASE_URL is set) and a development
//! field key kept in the data directory, and says loudly that this is not the production
//! setup.
//!
//! With `--once` it proves the API works end to end, through the real HTTPS listener: health,
//! signup, an authenticated call, the audit log and its chain. Then it exits.

use std::path::PathBuf;

use crate::cli::{announce, serve_options, ServeArgs};
use crate::field_crypto::{FieldKeys, FIELD_KEY_ENV};
use crate::server::{prepare_data_dir, ControlPlane};

pub async fn run(args: &ServeArgs, data_dir: PathBuf, once: bool) -> anyhow::Result<i32> {
    prepare_data_dir(&data_dir)?;
    let keys = match FieldKeys::from_env() {
        Ok(keys) => keys,
        Err(crate::field_crypto::FieldKeyError::Missing) => {
            let (keys, path, created) = FieldKeys::load_or_create_dev_key(&data_dir)?;
            eprintln!(
                "WARNING: {FIELD_KEY_ENV} is not set; quickstart {} a DEVELOPMENT field key at {} \
                 (mode 0600). Never run production this way: set {FIELD_KEY_ENV} from your \
                 secret store and keep it out of the data directory.",
                if created { "created" } else { "is using" },
                path.display()
            );
            keys
        }
        Err(e) => return Err(e.into()),
    };
    let plane = ControlPlane::start(serve_options(args, data_dir.clone(), keys, once)).await?;
    let ca_path = data_dir.join("ca.pem");
    announce(&plane, &data_dir);
    let base = format!("https://{}", plane.api_addr());
    if !once {
        println!();
        println!("Create an account:");
        println!(
            "  curl --cacert {} -c cookies.txt -H 'content-type: application/json' \\\n    \
             -d '{{\"email\":\"you@example.com\",\"password\":\"a long passphrase\",\"account_name\":\"Acme\"}}' \\\n    \
             {base}/v1/auth/signup",
            ca_path.display()
        );
        println!("API reference: {base}/openapi.json  ·  Ctrl-C stops the control plane and its database.");
        let _ = tokio::signal::ctrl_c().await;
        plane.shutdown().await;
        return Ok(0);
    }
    let result = self_check(&plane, &base).await;
    plane.shutdown().await;
    result?;
    println!("quickstart: OK");
    Ok(0)
}

/// Signs up a throwaway account and walks the main routes through real HTTPS.
async fn self_check(plane: &ControlPlane, base: &str) -> anyhow::Result<()> {
    let tls = sensei_certs::tls::client_config_trusting(plane.ca_pem())?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()?;
    let health: serde_json::Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(health["database"] == "ok", "health check: {health}");
    println!("health: {health}");

    let email = format!("quickstart-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().to_string();
    let signup = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&serde_json::json!({"email": email, "password": password, "account_name": "Quickstart"}))
        .send()
        .await?
        .error_for_status()?;
    let cookie = signup
        .headers()
        .get(http::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("signup set no session cookie"))?;
    println!("signed up {email}");

    let sessions: serde_json::Value = http
        .get(format!("{base}/v1/auth/sessions"))
        .header(http::header::COOKIE, &cookie)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        sessions["sessions"]
            .as_array()
            .is_some_and(|s| s.len() == 1),
        "expected one session: {sessions}"
    );
    let audit: serde_json::Value = http
        .get(format!("{base}/v1/audit"))
        .header(http::header::COOKIE, &cookie)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        audit["events"][0]["event"] == "account.created",
        "audit log: {audit}"
    );
    let client = plane.pool().get().await?;
    let report = crate::audit::verify(&**client).await?;
    anyhow::ensure!(
        report.problems.is_empty(),
        "audit chain: {:?}",
        report.problems
    );
    println!(
        "audit chain verified: {} chain(s), {} row(s)",
        report.chains, report.rows
    );
    Ok(())
}
