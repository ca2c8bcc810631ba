//! `/etc/sensei/agent.toml`: what the package's configuration file may set. Command-line
//! flags (and their environment variables) win over the file; the file wins over defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the package installs the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/sensei/agent.toml";
/// Largest configuration file read: it is small by nature, and a bounded read is cheap
/// insurance against a wrong path.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// The settings the file may hold; every one optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The control plane's agent gateway, `HOST:PORT` (used by `enroll`).
    pub control_plane: Option<String>,
    /// The control plane's CA fingerprint, `SHA256:…` (used by `enroll`).
    pub ca_fingerprint: Option<String>,
    /// Where the identity lives.
    pub state_dir: Option<PathBuf>,
    /// Directories deploys may target; empty: anywhere the deploy user can write.
    #[serde(default)]
    pub allowed_deploy_roots: Vec<PathBuf>,
    /// Repository URL patterns this server deploys from (`*` matches anything); empty: any.
    #[serde(default)]
    pub allowed_repositories: Vec<String>,
    /// The unprivileged user deploys and hooks run as (the package: `sensei-deploy`).
    pub deploy_user: Option<String>,
    /// How an upgrade job starts the agent's upgrade, as an argument list (no shell); the
    /// arguments `{unit}` and `{version}` are replaced. Default:
    /// `["systemctl", "start", "--no-block", "{unit}"]`.
    pub upgrade_command: Option<Vec<String>>,
}

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl AgentConfig {
    /// Parses the text of a configuration file.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.message().to_owned(),
        })
    }

    /// Reads `path`. A missing file is an empty configuration when `required` is false (the
    /// default path on a machine without the package), an error otherwise.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        use std::io::Read;
        let shown = || path.display().to_string();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default())
            }
            Err(e) => {
                return Err(ConfigError::Read {
                    path: shown(),
                    message: e.to_string(),
                })
            }
        };
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| ConfigError::Read {
                path: shown(),
                message: e.to_string(),
            })?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: shown() });
        }
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_packaged_file() {
        let text = include_str!("../../packaging/agent/agent.toml");
        let config = AgentConfig::parse(text, Path::new("agent.toml")).expect("parses");
        assert_eq!(
            config.state_dir.as_deref(),
            Some(Path::new("/var/lib/sensei-agent"))
        );
        assert_eq!(config.allowed_deploy_roots, vec![PathBuf::from("/srv")]);
    }

    #[test]
    fn refuses_unknown_keys_and_wrong_types() {
        for bad in [
            "control_plan = \"x:1\"",
            "allowed_deploy_roots = \"/srv\"",
            "state_dir = 7",
            "[section]",
        ] {
            let err = AgentConfig::parse(bad, Path::new("a.toml")).expect_err(bad);
            assert!(err.to_string().starts_with("a.toml: "), "{err}");
        }
    }

    #[test]
    fn a_missing_default_file_is_empty_but_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("agent.toml");
        assert_eq!(
            AgentConfig::load(&missing, false).expect("empty"),
            AgentConfig::default()
        );
        assert!(AgentConfig::load(&missing, true).is_err());
        std::fs::write(&missing, "x".repeat(70 * 1024)).expect("write");
        assert!(matches!(
            AgentConfig::load(&missing, false),
            Err(ConfigError::TooLarge { .. })
        ));
    }
}
