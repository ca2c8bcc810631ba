//! What this server accepts to run, whatever the control plane signs: the deploy roots and
//! repositories its `agent.toml` allows, and the unprivileged user deploys run as. Even a
//! compromised control plane (or a stolen job-signing key) is held to it.

use std::path::{Component, Path, PathBuf};

/// A deploy user: hooks and the release script run as this user, which cannot read the
/// agent's key or write its trust material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Why a deploy user cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployUserError {
    #[error("deploy user {0:?} does not exist on this server (the sensei-agent package creates sensei-deploy)")]
    Unknown(String),
    #[error("deploy user {0:?} is root (or in group root): deploys never run as root")]
    Root(String),
    #[error("deploy user {0:?} is the agent's own user, which can read its key: choose another (the package's sensei-deploy)")]
    SameAsAgent(String),
    #[error(
        "the agent cannot switch to deploy user {0:?}: it needs CAP_SETUID and CAP_SETGID \
         (the packaged unit grants them) or to run as root"
    )]
    CannotSwitch(String),
}

impl DeployUser {
    /// Looks `name` up in the user database (`getent passwd`, so NSS sources count too).
    pub fn lookup(name: &str) -> Result<Self, DeployUserError> {
        let out = std::process::Command::new("getent")
            .args(["passwd", name])
            .output()
            .map_err(|_| DeployUserError::Unknown(name.to_owned()))?;
        let line = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = line.trim().split(':').collect();
        let (Some(uid), Some(gid), Some(home)) = (
            fields.get(2).and_then(|v| v.parse().ok()),
            fields.get(3).and_then(|v| v.parse().ok()),
            fields.get(5),
        ) else {
            return Err(DeployUserError::Unknown(name.to_owned()));
        };
        if uid == 0 || gid == 0 {
            return Err(DeployUserError::Root(name.to_owned()));
        }
        // SAFETY: geteuid cannot fail.
        #[allow(unsafe_code)]
        let me = unsafe { libc::geteuid() };
        if uid == me && me != 0 {
            return Err(DeployUserError::SameAsAgent(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            uid,
            gid,
            home: PathBuf::from(home),
        })
    }

    /// Checks that this process may become the user: root, or CAP_SETUID and CAP_SETGID in
    /// its effective set.
    pub fn check_switchable(&self) -> Result<(), DeployUserError> {
        // SAFETY: geteuid cannot fail.
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        if root || has_setuid_caps() {
            Ok(())
        } else {
            Err(DeployUserError::CannotSwitch(self.name.clone()))
        }
    }
}

/// Whether CAP_SETUID (7) and CAP_SETGID (6) are effective, from /proc/self/status.
fn has_setuid_caps() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 7) != 0 && caps & (1 << 6) != 0)
}

/// What this agent accepts to do.
#[derive(Debug, Clone, Default)]
pub struct JobPolicy {
    /// Deploy paths must lie below one of these (compared after resolving symlinks);
    /// empty: anywhere the deploy user may write.
    pub allowed_roots: Vec<PathBuf>,
    /// Repository URLs must match one of these patterns (`*` matches any run of
    /// characters); empty: any repository.
    pub allowed_repositories: Vec<String>,
    /// Who deploys run as; `None`: as the agent's own user.
    pub deploy_user: Option<DeployUser>,
    /// How an upgrade job starts the upgrade (`{unit}` and `{version}` arguments replaced);
    /// `None`: `systemctl start --no-block {unit}` ([`crate::upgrade::DEFAULT_UPGRADE_COMMAND`]).
    pub upgrade_command: Option<Vec<String>>,
}

impl JobPolicy {
    /// Whether `deploy_path` is below an allowed root. The path must be absolute without
    /// `.` or `..`, and is resolved through every symlink that exists on it, so that neither
    /// a string trick nor a planted link can leave the root.
    pub fn permits_path(&self, deploy_path: &str) -> Result<(), String> {
        let path = Path::new(deploy_path);
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(format!(
                "deploy path {deploy_path} must be absolute, without . or .."
            ));
        }
        if self.allowed_roots.is_empty() {
            return Ok(());
        }
        let resolved = resolve_existing(path);
        let inside = self.allowed_roots.iter().any(|root| {
            let root = root.canonicalize().unwrap_or_else(|_| root.clone());
            resolved.starts_with(&root)
        });
        if inside {
            Ok(())
        } else {
            Err(format!(
                "deploy path {deploy_path} (resolved: {}) is outside the deploy roots this agent allows",
                resolved.display()
            ))
        }
    }

    /// Whether this server accepts to fetch `repo_url`. With patterns, a URL with `.` or
    /// `..` path segments (or their percent-encodings) is refused outright: the server would
    /// resolve them after the pattern matched (`…/acme/../evil/x` is `…/evil/x`).
    pub fn permits_repository(&self, repo_url: &str) -> Result<(), String> {
        let lowered = repo_url.to_ascii_lowercase();
        let dotted = lowered.contains("%2e")
            || lowered
                .split(['/', ':'])
                .any(|segment| segment == "." || segment == "..");
        if !self.allowed_repositories.is_empty() && dotted {
            return Err(format!(
                "repository {repo_url} has . or .. in its path, which this agent's allowed_repositories cannot vouch for"
            ));
        }
        if self.allowed_repositories.is_empty()
            || self
                .allowed_repositories
                .iter()
                .any(|pattern| glob_match(pattern, repo_url))
        {
            Ok(())
        } else {
            Err(format!(
                "repository {repo_url} is not one this agent allows (allowed_repositories in agent.toml)"
            ))
        }
    }
}

/// `path` with its longest existing ancestor resolved through symlinks and the rest (which
/// does not exist yet, so cannot be a link) appended.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(ToOwned::to_owned),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_roots_are_checked_on_the_resolved_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("srv");
        let elsewhere = tmp.path().join("etc");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        // A link inside the root that leads out of it.
        std::os::unix::fs::symlink(&elsewhere, root.join("escape")).expect("link");
        let policy = JobPolicy {
            allowed_roots: vec![root.clone()],
            ..JobPolicy::default()
        };
        let at = |p: &Path| p.display().to_string();
        assert!(policy.permits_path(&at(&root.join("app"))).is_ok());
        assert!(policy
            .permits_path(&at(&root.join("new/deeper/app")))
            .is_ok());
        let escaped = policy
            .permits_path(&at(&root.join("escape/app")))
            .expect_err("out through a link");
        assert!(escaped.contains("outside the deploy roots"), "{escaped}");
        assert!(policy
            .permits_path(&format!("{}/../etc", at(&root)))
            .is_err());
        assert!(policy.permits_path(&format!("{}x/app", at(&root))).is_err());
        assert!(policy.permits_path("relative/app").is_err());
        assert!(JobPolicy::default().permits_path("/anywhere").is_ok());
        assert!(JobPolicy::default().permits_path("/srv/../etc").is_err());
    }

    #[test]
    fn repository_patterns() {
        let policy = JobPolicy {
            allowed_repositories: vec![
                "https://git.example.com/acme/*".into(),
                "git@git.example.com:acme/*.git".into(),
            ],
            ..JobPolicy::default()
        };
        assert!(policy
            .permits_repository("https://git.example.com/acme/site")
            .is_ok());
        assert!(policy
            .permits_repository("git@git.example.com:acme/site.git")
            .is_ok());
        assert!(policy
            .permits_repository("https://git.example.com/evil/site")
            .is_err());
        assert!(policy
            .permits_repository("git@git.example.com:acme/site")
            .is_err());
        assert!(policy
            .permits_repository("https://evil.example/https://git.example.com/acme/x")
            .is_err());
        assert!(JobPolicy::default().permits_repository("anything").is_ok());
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXcYYb"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn root_is_never_a_deploy_user() {
        assert!(matches!(
            DeployUser::lookup("root"),
            Err(DeployUserError::Root(_))
        ));
        assert!(matches!(
            DeployUser::lookup("no-such-user-here"),
            Err(DeployUserError::Unknown(_))
        ));
    }
}
