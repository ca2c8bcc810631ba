//! The Sensei control plane, in rooms by what each part is for:
//!
//! - [`app`]: the running process: the command line, start-up and wiring ([`app::server`]),
//!   the quickstart, the HTTPS listener, metrics and the maintenance loop. The only room that
//!   knows the HTTP layer exists.
//! - [`api`]: HTTP only: routes, who may call them, request and response shapes. It calls the
//!   rooms below and maps their errors to answers.
//! - [`web`]: the dashboard: HTML pages on the API's listener, an edge like [`api`] whose
//!   handlers and access table it calls (`docs/dashboard.md`).
//! - [`jobs`]: the life of a job, from queueing to its recorded end, in travel order.
//! - [`runners`]: what carries jobs to servers: the agent gateway ([`runners::agent`]) and the
//!   SSH fallback runner ([`runners::ssh`]).
//! - [`rollouts`]: the scheduler applying `sensei_shared::rollout`'s decisions.
//! - [`dns`]: the per-deploy DNS records written to a project's zone (RFC 2136 with TSIG).
//! - [`identity`]: who is calling: passwords, tokens, sessions, TOTP, throttles, signup, mail.
//! - [`secrets`]: field encryption and its rotation, the CA store, the job-signing key, SSH
//!   keys.
//! - [`store`]: the database pool, migrations and the embedded PostgreSQL cluster.
//! - [`audit`]: the append-only, keyed audit log every state change writes to, and its
//!   delivery to each account's SIEM sinks ([`audit::sinks`]).
//! - [`egress`]: where a tenant's configuration may make the control plane connect (SSH
//!   targets, audit sinks).

pub mod api;
pub mod app;
pub mod audit;
pub mod dns;
pub mod egress;
pub mod identity;
pub mod jobs;
pub mod rollouts;
pub mod runners;
pub mod secrets;
pub mod store;
pub mod web;

pub use app::server::{ControlPlane, DatabaseSource, ServeOptions, StartError};

#[cfg(test)]
mod rooms {
    //! The rules the rooms keep, checked over the source so that a shortcut fails the build's
    //! tests instead of eroding the layout.

    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// (file relative to `src/`, its text) for every source file.
    fn every_source() -> Vec<(String, String)> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("readable source");
                let rel = p
                    .strip_prefix(&src)
                    .expect("under src")
                    .display()
                    .to_string();
                (rel, text)
            })
            .collect()
    }

    #[test]
    fn only_the_app_room_knows_the_http_layer() {
        let offenders: Vec<String> = every_source()
            .into_iter()
            .filter(|(rel, _)| {
                // web/ is an edge like api/: it serves the dashboard by calling the API's
                // handlers and its access table.
                !rel.starts_with("api/")
                    && !rel.starts_with("app/")
                    && !rel.starts_with("web/")
                    && rel != "lib.rs"
            })
            .filter(|(_, text)| text.contains("crate::api"))
            .map(|(rel, _)| rel)
            .collect();
        assert!(
            offenders.is_empty(),
            "import crate::api outside app/ and web/: {offenders:?}"
        );
    }

    #[test]
    fn only_the_jobs_room_touches_the_deployments_table() {
        let touches = |text: &str| {
            ["FROM", "JOIN", "UPDATE", "INTO", "USING"]
                .iter()
                .any(|verb| {
                    text.contains(&format!("{verb} deployments "))
                        || text.contains(&format!("{verb} deployments\""))
                })
        };
        let offenders: Vec<String> = every_source()
            .into_iter()
            .filter(|(rel, _)| !rel.starts_with("jobs/") && rel != "lib.rs")
            .filter(|(_, text)| touches(text))
            .map(|(rel, _)| rel)
            .collect();
        assert!(
            offenders.is_empty(),
            "SQL on deployments outside jobs/: {offenders:?}"
        );
    }
}
