//! What can go wrong, in words that name the fix, and the exit code each maps to.

use std::process::ExitCode;

/// The documented exit codes (`sensei --help`, docs/cli.md).
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const UNREACHABLE: u8 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A deploy or rollout the command waited for did not succeed (the details are printed).
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
    #[error("not signed in: run `sensei login URL` (or set SENSEI_URL and SENSEI_API_KEY)")]
    NotSignedIn,
    #[error("{0}")]
    Auth(String),
    /// The control plane answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Local(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Failed(_) => exit::FAILED,
            Self::Usage(_) => exit::USAGE,
            Self::NotSignedIn | Self::Auth(_) => exit::AUTH,
            Self::Api { status, .. } if *status >= 500 => exit::UNREACHABLE,
            Self::Api { .. } => exit::REFUSED,
            Self::Unreachable(_) => exit::UNREACHABLE,
            Self::Local(_) => exit::FAILED,
        })
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    pub fn local(message: impl Into<String>) -> Self {
        Self::Local(message.into())
    }
}

pub type Result<T> = std::result::Result<T, CliError>;
