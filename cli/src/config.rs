//! The stored credentials: one control plane, its pinned CA, and a session or an API key.
//! Written with mode 0600 in a 0700 directory, replaced atomically; the environment
//! (`SENSEI_URL`, `SENSEI_API_KEY`, `SENSEI_CA_FINGERPRINT`) wins over the file, for CI.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Secret {
    /// The `sensei_session` cookie's value.
    Session(String),
    /// An `sk_…` API key.
    ApiKey(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// `https://host:port`, no path.
    pub url: String,
    /// `SHA256:…` of the control plane's CA.
    pub ca_fingerprint: String,
    pub secret: Secret,
    /// Who signed in (for `whoami` when offline, and the prompts).
    #[serde(default)]
    pub email: Option<String>,
}

/// Where things were found: the file, or the environment.
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// `$XDG_CONFIG_HOME/sensei/credentials.json`, or `~/.config/sensei/credentials.json`.
    pub fn default_location() -> Result<Self> {
        let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| CliError::local("neither XDG_CONFIG_HOME nor HOME is set"))?;
                PathBuf::from(home).join(".config")
            }
        };
        Ok(Self {
            path: base.join("sensei").join("credentials.json"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored credentials, if any. A file others can read is refused (it holds a
    /// secret), with the fix.
    pub fn load(&self) -> Result<Option<Credentials>> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CliError::local(format!("{}: {e}", self.path.display()))),
        };
        if !meta.is_file() {
            return Err(CliError::local(format!(
                "{} is not a regular file",
                self.path.display()
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CliError::local(format!(
                "{} can be read by other users; run `chmod 600 {}` (and consider `sensei logout`)",
                self.path.display(),
                self.path.display()
            )));
        }
        let text = std::fs::read(&self.path)
            .map_err(|e| CliError::local(format!("{}: {e}", self.path.display())))?;
        serde_json::from_slice(&text).map(Some).map_err(|e| {
            CliError::local(format!(
                "{} is not readable ({e}); run `sensei login` again",
                self.path.display()
            ))
        })
    }

    /// Replaces the stored credentials: written to a new 0600 file, synced, renamed over.
    pub fn save(&self, credentials: &Credentials) -> Result<()> {
        let dir = self
            .path
            .parent()
            .ok_or_else(|| CliError::local("the credentials path has no directory"))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CliError::local(format!("{}: {e}", dir.display())))?;
        let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(
                &serde_json::to_vec_pretty(credentials).map_err(std::io::Error::other)?,
            )?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            CliError::local(format!("cannot store {}: {e}", self.path.display()))
        })
    }

    /// Forgets the stored credentials. Returns whether there were any.
    pub fn remove(&self) -> Result<bool> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CliError::local(format!("{}: {e}", self.path.display()))),
        }
    }
}

/// The credentials a command runs with: the environment's (CI) if `SENSEI_API_KEY` is set,
/// else the file's.
pub fn current(store: &Store) -> Result<Credentials> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let stored = store.load()?;
    if let Some(key) = env("SENSEI_API_KEY") {
        let url = env("SENSEI_URL")
            .or_else(|| stored.as_ref().map(|c| c.url.clone()))
            .ok_or_else(|| CliError::usage("SENSEI_API_KEY is set but SENSEI_URL is not"))?;
        let url = normalize_url(&url)?;
        let ca_fingerprint = env("SENSEI_CA_FINGERPRINT")
            .or_else(|| {
                stored
                    .as_ref()
                    .filter(|c| c.url == url)
                    .map(|c| c.ca_fingerprint.clone())
            })
            .ok_or_else(|| {
                CliError::usage(
                    "SENSEI_CA_FINGERPRINT is not set: give the control plane's CA fingerprint \
                     (SHA256:…), which its operator has; the CLI never trusts a CA unseen",
                )
            })?;
        return Ok(Credentials {
            url,
            ca_fingerprint,
            secret: Secret::ApiKey(key),
            email: None,
        });
    }
    // Without a key, SENSEI_URL or a pin must not be silently ignored in favour of another
    // control plane signed in to earlier (that one may be production).
    let stored = stored.ok_or(CliError::NotSignedIn)?;
    if let Some(url) = env("SENSEI_URL") {
        if normalize_url(&url)? != stored.url {
            return Err(CliError::usage(format!(
                "SENSEI_URL is {url} but SENSEI_API_KEY is not set, and the stored login is for {}: \
                 set the key, or `sensei login {url}`",
                stored.url
            )));
        }
    }
    if let Some(pin) = env("SENSEI_CA_FINGERPRINT") {
        if !pin.trim().eq_ignore_ascii_case(&stored.ca_fingerprint) {
            return Err(CliError::usage(
                "SENSEI_CA_FINGERPRINT differs from the CA pinned at login: set SENSEI_API_KEY \
                 to use it, or `sensei login --ca-fingerprint …` again",
            ));
        }
    }
    Ok(stored)
}

/// `https://host[:port]`: the scheme is required to be https, a trailing slash is dropped,
/// and nothing else (a path, a query) is accepted.
pub fn normalize_url(raw: &str) -> Result<String> {
    let raw = raw.trim();
    let url = reqwest::Url::parse(raw).map_err(|e| {
        CliError::usage(format!(
            "{raw} is not a URL ({e}); e.g. https://sensei.example:8443"
        ))
    })?;
    if url.scheme() != "https" {
        return Err(CliError::usage(format!(
            "{raw}: the control plane is only spoken to over https"
        )));
    }
    if url.host_str().is_none()
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(CliError::usage(format!(
            "{raw}: give the control plane's address only, e.g. https://sensei.example:8443"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CliError::usage(format!(
            "{raw}: no user or password in the URL"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        Credentials {
            url: "https://cp.example:8443".into(),
            ca_fingerprint: format!("SHA256:{}", "ab".repeat(32)),
            secret: Secret::Session("s3cret".into()),
            email: Some("a@example.com".into()),
        }
    }

    #[test]
    fn saved_credentials_are_private_and_round_trip() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store {
            path: dir.path().join("sensei").join("credentials.json"),
        };
        assert!(store.load().expect("load").is_none());
        store.save(&credentials()).expect("save");
        let mode = std::fs::metadata(store.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(store.path().parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let back = store.load().expect("load").expect("stored");
        assert_eq!(back.secret, Secret::Session("s3cret".into()));
        assert!(store.remove().expect("remove"));
        assert!(!store.remove().expect("remove again"));
    }

    #[test]
    fn a_credentials_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store {
            path: dir.path().join("credentials.json"),
        };
        store.save(&credentials()).expect("save");
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err = store.load().expect_err("refused").to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn only_a_bare_https_address_is_a_control_plane_url() {
        assert_eq!(
            normalize_url("https://cp.example:8443/").expect("ok"),
            "https://cp.example:8443"
        );
        for bad in [
            "http://cp.example",
            "cp.example",
            "https://cp.example/v1",
            "https://u:p@cp.example",
            "https://cp.example/?x=1",
            "https://cp.example/#x",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad} accepted");
        }
    }
}
