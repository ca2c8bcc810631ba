//! The words of a job: its kind, its status and the steps the control plane itself fails a
//! job at. Stored as text in `deployments`; parsed once where a row is read, so that a value
//! the code does not know is an error at that edge, never a silent default.

use std::fmt;

use tokio_postgres::types::{accepts, to_sql_checked, FromSql, IsNull, ToSql, Type};

/// A stored value no variant matches: the database holds something this version does not
/// know (a newer version wrote it, or a hand did).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?} in the database")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

macro_rules! stored_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database and shown by the API.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { what: $what, value: other.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut bytes::BytesMut,
            ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            accepts!(TEXT, VARCHAR);
            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(
                ty: &Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                Ok($name::parse(<&str as FromSql>::from_sql(ty, raw)?)?)
            }

            accepts!(TEXT, VARCHAR);
        }
    };
}

stored_enum!(
    /// What a job does on its server.
    JobKind, "job kind" {
        /// Fetch, build and switch to a new release.
        Deploy => "deploy",
        /// Switch back to an earlier release.
        Rollback => "rollback",
        /// Remove the environment file of a deleted project.
        ForgetEnv => "forget_env",
        /// Upgrade the agent's package to an exact version (an upgrade rollout's job).
        UpgradeAgent => "upgrade_agent",
    }
);

stored_enum!(
    /// Where a job stands. `Queued` → `Running` (claimed by an agent's poll or by the SSH
    /// runner) → `Succeeded` | `Failed`; a queued job can also fail without running (nobody
    /// collected it, its server was revoked, its project deleted). An end is final.
    JobStatus, "job status" {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
    }
);

impl JobStatus {
    /// Whether the job has ended (nothing changes it any more).
    pub const fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

stored_enum!(
    /// The steps at which the control plane fails a job itself, before or around the release
    /// engine (whose own steps, `preflight` to `prune`, come from `sensei_shared::release`).
    Step, "job step" {
        /// The job never reached its server: not collected in time, revoked, deleted, or it
        /// could not be built and signed.
        Dispatch => "dispatch",
        /// The server refused the job it received.
        Verify => "verify",
        /// The job was handed out but its result never came back.
        Run => "run",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stored_value_reads_back_and_nothing_else_does() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Ok(*k));
        }
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Ok(*s));
        }
        for s in Step::ALL {
            assert_eq!(Step::parse(s.as_str()), Ok(*s));
        }
        for garbage in ["", "Running", "running ", "cancelled"] {
            let e = JobStatus::parse(garbage).expect_err(garbage);
            assert_eq!(e.value, garbage);
            assert_eq!(
                e.to_string(),
                format!("unknown job status {garbage:?} in the database")
            );
        }
        assert!(JobKind::parse("deploy;").is_err());
        assert!(JobStatus::Failed.is_final() && !JobStatus::Running.is_final());
    }
}
