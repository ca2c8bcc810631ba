//! `sensei login`, `logout`, `whoami`: the credentials and the pinned CA.

use std::io::{BufRead, Read};

use reqwest::Method;
use serde_json::{json, Value};

use crate::args::LoginArgs;
use crate::client::Api;
use crate::config::{self, Credentials, Secret, Store};
use crate::error::{CliError, Result};
use crate::output;

/// A pin no CA has: a first handshake with it only shows which CA the control plane presents.
const NO_PIN: &str = "SHA256:0000000000000000000000000000000000000000000000000000000000000000";

pub async fn login(args: LoginArgs, store: &Store, json_out: bool) -> Result<()> {
    let stored = store.load().ok().flatten();
    let url = match args.url.as_deref() {
        Some(u) => config::normalize_url(u)?,
        None => stored.as_ref().map(|c| c.url.clone()).ok_or_else(|| {
            CliError::usage("give the control plane's address: sensei login https://HOST:PORT")
        })?,
    };
    let fingerprint = match args.ca_fingerprint {
        Some(f) => f.trim().to_owned(),
        // Signing in again to the same control plane keeps the CA pinned the first time.
        None => match stored.as_ref().filter(|c| c.url == url) {
            Some(c) => c.ca_fingerprint.clone(),
            None => confirm_presented_ca(&url).await?,
        },
    };
    let (secret, email) = if args.api_key {
        let key = if output::interactive() {
            ask_secret("API key")?
        } else {
            read_secret_line("API key")?
        };
        (Secret::ApiKey(key), None)
    } else {
        let email = match args.email {
            Some(e) => e,
            None => ask("Email")?,
        };
        let password = if args.password_stdin {
            read_secret_line("password")?
        } else {
            ask_password()?
        };
        let cookie = sign_in(&url, &fingerprint, &email, &password, args.totp).await?;
        (Secret::Session(cookie), Some(email))
    };
    // Whatever was given must work before it is stored.
    let api = Api::new(&url, &fingerprint, Some(secret.clone()))?;
    let me = api.get("/v1/auth/me").await?;
    store.save(&Credentials {
        url: url.clone(),
        ca_fingerprint: fingerprint.clone(),
        secret,
        email: email.or_else(|| me["user"]["email"].as_str().map(str::to_owned)),
    })?;
    if json_out {
        output::json(&me);
    } else {
        eprintln!(
            "Signed in to {url} as {} ({}). Credentials stored in {}.",
            output::text(&me["user"]["email"]),
            output::text(&me["user"]["role"]),
            store.path().display()
        );
    }
    Ok(())
}

/// Shows the CA the control plane presents and asks the person to confirm it against the
/// fingerprint its operator gave them. Never trusted silently.
async fn confirm_presented_ca(url: &str) -> Result<String> {
    let probe = Api::new(url, NO_PIN, None)?;
    let _ = probe.get("/healthz").await;
    let presented = probe.presented_cas();
    let Some(ca) = presented.last() else {
        return Err(CliError::Unreachable(format!(
            "{url} presented no CA certificate (or could not be reached); pass the fingerprint \
             with --ca-fingerprint SHA256:…"
        )));
    };
    if !output::interactive() {
        return Err(CliError::usage(format!(
            "not a terminal, so the CA cannot be confirmed: pass --ca-fingerprint with the \
             fingerprint the control plane's operator gives you (it presented {ca})"
        )));
    }
    eprintln!(
        "The control plane at {url} presents this CA:\n\n  {ca}\n\nCompare it with the \
         fingerprint its operator gave you (`sensei-control-plane` prints it when it starts)."
    );
    let trusted = dialoguer::Confirm::new()
        .with_prompt("Is it the same?")
        .default(false)
        .interact()
        .map_err(|e| CliError::local(format!("prompt: {e}")))?;
    if !trusted {
        return Err(CliError::usage("not signed in: the CA was not confirmed"));
    }
    Ok(ca.to_string())
}

/// `POST /v1/auth/login`, asking for the TOTP code when the account has a second factor.
async fn sign_in(
    url: &str,
    fingerprint: &str,
    email: &str,
    password: &str,
    totp: Option<String>,
) -> Result<String> {
    let api = Api::new(url, fingerprint, None)?;
    let mut body = json!({"email": email, "password": password});
    if let Some(code) = &totp {
        body["totp_code"] = json!(code.trim());
    }
    let answer = match api
        .send(Method::POST, "/v1/auth/login", Some(&body), &[])
        .await
    {
        Err(CliError::Api { code, .. }) if code == "mfa_required" && totp.is_none() => {
            if !output::interactive() {
                return Err(CliError::usage(
                    "this account has a second factor: pass --totp CODE",
                ));
            }
            body["totp_code"] = json!(ask("TOTP code")?.trim());
            api.send(Method::POST, "/v1/auth/login", Some(&body), &[])
                .await
        }
        other => other,
    };
    let (_, headers, _) = answer.map_err(|e| match e {
        CliError::Api { code, message, .. } if code == "invalid_credentials" => {
            CliError::Auth(format!("{message}: check the email and password"))
        }
        CliError::Api { code, message, .. } if code == "invalid_mfa_code" => CliError::Auth(
            format!("{message}: use the current code from your authenticator"),
        ),
        CliError::NotSignedIn => CliError::Auth("the control plane refused the sign-in".into()),
        other => other,
    })?;
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            v.split(';')
                .next()
                .and_then(|kv| kv.strip_prefix("sensei_session="))
                .map(str::to_owned)
        })
        .ok_or_else(|| CliError::Unreachable("the sign-in answer carried no session".into()))
}

pub async fn logout(store: &Store) -> Result<()> {
    let Some(credentials) = store.load()? else {
        eprintln!("Not signed in.");
        return Ok(());
    };
    if let Secret::Session(_) = credentials.secret {
        let api = Api::from_credentials(&credentials)?;
        match api.post("/v1/auth/logout", &json!({})).await {
            // Already ended on the control plane: forgetting it here is all that is left.
            Ok(_) | Err(CliError::Auth(_)) => {}
            Err(e) => {
                return Err(CliError::Unreachable(format!(
                    "the session could not be ended on the control plane ({e}); it is still \
                     stored: try again, or remove {}",
                    store.path().display()
                )))
            }
        }
    }
    store.remove()?;
    eprintln!("Signed out of {}.", credentials.url);
    Ok(())
}

pub async fn whoami(api: &Api, credentials: &Credentials, json_out: bool) -> Result<()> {
    let me: Value = api.get("/v1/auth/me").await?;
    if json_out {
        output::json(&me);
        return Ok(());
    }
    let how = match &me["api_key"] {
        Value::Null => "signed in".to_owned(),
        key => format!(
            "API key {} ({}), created by",
            output::text(&key["id"]),
            key["scopes"]
                .as_array()
                .map(|s| s.iter().map(output::text).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        ),
    };
    println!(
        "{how} {} ({}) on {}",
        output::text(&me["user"]["email"]),
        output::text(&me["user"]["role"]),
        credentials.url
    );
    println!("CA pinned: {}", credentials.ca_fingerprint);
    Ok(())
}

fn ask(prompt: &str) -> Result<String> {
    if !output::interactive() {
        return Err(CliError::usage(format!(
            "not a terminal: pass the {} as an option",
            prompt.to_lowercase()
        )));
    }
    dialoguer::Input::<String>::new()
        .with_prompt(prompt)
        .interact_text()
        .map_err(|e| CliError::local(format!("prompt: {e}")))
}

fn ask_password() -> Result<String> {
    if !output::interactive() {
        return Err(CliError::usage(
            "not a terminal: pass --password-stdin and the password on standard input",
        ));
    }
    ask_secret("Password")
}

/// Asks on the terminal without echo.
fn ask_secret(prompt: &str) -> Result<String> {
    dialoguer::Password::new()
        .with_prompt(prompt)
        .interact()
        .map_err(|e| CliError::local(format!("prompt: {e}")))
}

/// One line of standard input (at most 64 KiB), without its line end.
pub fn read_secret_line(what: &str) -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(64 * 1024)
        .read_line(&mut line)
        .map_err(|e| CliError::local(format!("reading the {what}: {e}")))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        return Err(CliError::usage(format!("no {what} on standard input")));
    }
    Ok(line)
}
