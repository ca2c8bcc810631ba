//! Per-deploy DNS records. A project may name a DNS zone it controls; every server the project
//! has been deployed to successfully then gets `<server name>.<zone>`, pointing at the server
//! (its address, or an alias of an SSH server's host name), written to the zone's primary with
//! RFC 2136 dynamic updates signed with TSIG ([`update`]). The record goes when the server is
//! deleted, when the project is, and when the project's DNS settings change or are removed.
//!
//! One record per (project, server) rather than per release: a release is a directory on the
//! server, not something with an address of its own, and a name per server is what an operator
//! reaches a deploy by. Each record row keeps a copy of the settings (and the sealed key) it
//! was written with, so it can be removed from the zone it is in even after the project's
//! settings moved elsewhere.
//!
//! Records are reconciled, not fired and forgotten: every few seconds one replica compares
//! what should exist with what Sensei wrote, and writes the difference; an unreachable or
//! refusing DNS server is retried on the next pass and its error shown on the project.

pub mod update;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use self::update::{Target, UpdateError, Zone};
use crate::egress::TargetPolicy;
use crate::secrets::field_crypto::FieldKeys;

/// How often the records are reconciled.
const PASS: Duration = Duration::from_secs(2);
/// The longest one pass spends talking to DNS servers; what is left waits for the next pass,
/// so a zone that never answers delays the others by this much at most.
const BUDGET: Duration = Duration::from_secs(10);
/// The longest a failing zone waits before it is tried again.
const MAX_RETRY_SECS: f64 = 300.0;
/// Error text kept on a project, at most.
const MAX_ERROR: usize = 500;

/// A project's DNS settings as stored (the TSIG secret apart, sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    /// The zone, e.g. `apps.example.com`.
    pub zone: String,
    /// The zone's primary server, `IP:PORT`.
    pub server: SocketAddr,
    /// The TSIG key's name, as the DNS server knows it.
    pub key_name: String,
    /// `hmac-sha256`, `hmac-sha384` or `hmac-sha512`.
    pub algorithm: String,
    /// Seconds.
    pub ttl: u32,
}

/// Why settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDns {
    #[error("{0}")]
    Field(String),
    #[error("the TSIG secret must be base64 of 16 to 128 bytes")]
    Secret,
    #[error("the DNS server {0} is in a network Sensei does not send to")]
    Denied(SocketAddr),
}

impl DnsSettings {
    /// Checks settings and a base64 TSIG secret as a person gave them; answers the secret's
    /// bytes.
    pub fn check(&self, secret_b64: &str, policy: &TargetPolicy) -> Result<Vec<u8>, InvalidDns> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret_b64.trim())
            .ok()
            .filter(|s| (16..=128).contains(&s.len()))
            .ok_or(InvalidDns::Secret)?;
        if !(1..=86_400).contains(&self.ttl) {
            return Err(InvalidDns::Field("ttl must be 1 to 86400 seconds".into()));
        }
        if self.zone.len() > 200 || self.key_name.len() > 200 {
            return Err(InvalidDns::Field(
                "zone and key_name must be at most 200 characters".into(),
            ));
        }
        // The same rules the updates will use: a zone that does not parse never gets stored.
        Zone::new(
            &self.zone,
            self.server,
            &self.key_name,
            &self.algorithm,
            secret.clone(),
            self.ttl,
        )
        .map_err(|e| InvalidDns::Field(e.to_string()))?;
        if !policy.allows(self.server) {
            return Err(InvalidDns::Denied(self.server));
        }
        Ok(secret)
    }

    fn zone(&self, keys: &FieldKeys, sealed: &str) -> Result<Zone, String> {
        let secret = keys
            .decrypt(sealed)
            .map_err(|_| "the TSIG secret cannot be decrypted with the field keys".to_owned())?;
        Zone::new(
            &self.zone,
            self.server,
            &self.key_name,
            &self.algorithm,
            secret,
            self.ttl,
        )
        .map_err(|e| e.to_string())
    }
}

/// A server's name as one DNS label: lowercase letters, digits and hyphens, at most 63.
pub fn label(server_name: &str) -> Option<String> {
    let mut label: String = server_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    label.truncate(63);
    let label = label.trim_matches('-').to_owned();
    (!label.is_empty()).then_some(label)
}

/// Where a server's record points: its agent's address, or its SSH host.
fn target_of(transport: &str, host: Option<&str>, agent_address: Option<&str>) -> Option<Target> {
    let text = match transport {
        "agent" => agent_address?,
        _ => host?,
    };
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(Target::Address(ip)),
        Err(_) => update::fqdn(text).ok().map(Target::Alias),
    }
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Address(ip) => ip.to_string(),
        Target::Alias(name) => name.to_string(),
    }
}

/// A record that should exist.
struct Wanted {
    project: Uuid,
    server: Uuid,
    label: String,
    target: Target,
    settings: DnsSettings,
    sealed: String,
}

/// A record Sensei wrote, with the settings it was written with.
struct Written {
    project: Uuid,
    server: Uuid,
    name: String,
    target: String,
    settings: DnsSettings,
    sealed: String,
}

/// Reconciles until `shutdown`: one replica at a time (an advisory lock), every [`PASS`].
pub async fn run(
    pool: Pool,
    keys: Arc<FieldKeys>,
    policy: TargetPolicy,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PASS);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = reconcile(&pool, &keys, &policy).await {
                    tracing::warn!(error = %e, "reconciling DNS records");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass, in one transaction: its lock keeps other replicas out and goes with it however
/// the pass ends, and the pass lasts at most about [`BUDGET`]. Without any DNS settings or
/// record there is nothing to reconcile, and the pass is one statement instead of seven (an
/// idle plane's database cost: docs/benchmarks.md).
pub async fn reconcile(pool: &Pool, keys: &FieldKeys, policy: &TargetPolicy) -> Result<(), String> {
    let db = |e: tokio_postgres::Error| crate::store::db::describe(&e);
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let in_use: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM projects WHERE dns IS NOT NULL AND deleted_at IS NULL) \
                 OR EXISTS (SELECT 1 FROM dns_records) AS in_use",
            &[],
        )
        .await
        .map_err(db)?
        .get("in_use");
    if !in_use {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(db)?;
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('sensei-dns-records', 0)) AS locked",
            &[],
        )
        .await
        .map_err(db)?
        .get("locked");
    if !locked {
        return Ok(());
    }
    reconcile_locked(&tx, keys, policy).await?;
    tx.commit().await.map_err(db)
}

async fn reconcile_locked(
    client: &tokio_postgres::Transaction<'_>,
    keys: &FieldKeys,
    policy: &TargetPolicy,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + BUDGET;
    let out_of_time = || tokio::time::Instant::now() >= deadline;
    let waiting: std::collections::HashSet<Uuid> = client
        .query("SELECT id FROM projects WHERE dns_retry_at > now()", &[])
        .await
        .map_err(|e| crate::store::db::describe(&e))?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    let db = |e: tokio_postgres::Error| crate::store::db::describe(&e);
    let deployed = crate::jobs::history::deployed_pairs(client)
        .await
        .map_err(db)?;
    let rows = client
        .query(
            "SELECT p.id AS project_id, p.dns, p.dns_secret_ciphertext, s.id AS server_id, \
                    s.name AS server_name, s.transport, s.host, s.agent_address \
             FROM projects p JOIN servers s ON s.account_id = p.account_id \
             WHERE p.deleted_at IS NULL AND p.dns IS NOT NULL AND s.deleted_at IS NULL \
               AND (p.id, s.id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))",
            &[
                &deployed.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
                &deployed.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(db)?;
    let mut wanted: HashMap<(Uuid, Uuid), Wanted> = HashMap::new();
    for r in &rows {
        let settings: Option<DnsSettings> = serde_json::from_value(r.get("dns")).ok();
        let sealed: Option<String> = r.get("dns_secret_ciphertext");
        let (Some(settings), Some(sealed)) = (settings, sealed) else {
            continue;
        };
        let (Some(label), Some(target)) = (
            label(r.get("server_name")),
            target_of(r.get("transport"), r.get("host"), r.get("agent_address")),
        ) else {
            continue;
        };
        let key = (r.get("project_id"), r.get("server_id"));
        wanted.insert(
            key,
            Wanted {
                project: key.0,
                server: key.1,
                label,
                target,
                settings,
                sealed,
            },
        );
    }
    let written: Vec<Written> = client
        .query(
            "SELECT project_id, server_id, name, target, settings, secret_ciphertext FROM dns_records",
            &[],
        )
        .await
        .map_err(db)?
        .iter()
        .filter_map(|r| {
            Some(Written {
                project: r.get("project_id"),
                server: r.get("server_id"),
                name: r.get("name"),
                target: r.get("target"),
                settings: serde_json::from_value(r.get("settings")).ok()?,
                sealed: r.get("secret_ciphertext"),
            })
        })
        .collect();
    let mut errors: HashMap<Uuid, Option<String>> = HashMap::new();
    // Records no longer wanted, or wanted differently: removed from the zone they are in.
    for w in &written {
        if waiting.contains(&w.project) {
            wanted.remove(&(w.project, w.server));
            continue;
        }
        let still = wanted.get(&(w.project, w.server)).is_some_and(|want| {
            want.settings == w.settings
                && target_text(&want.target) == w.target
                && want_name(want).as_deref() == Some(w.name.as_str())
        });
        if still {
            // The record stands; its copy of the key follows the project's (a new secret, or
            // the same one sealed again by a field-key rotation).
            if let Some(want) = wanted.remove(&(w.project, w.server)) {
                if want.sealed != w.sealed {
                    client
                        .execute(
                            "UPDATE dns_records SET secret_ciphertext = $3 WHERE project_id = $1 AND server_id = $2",
                            &[&w.project, &w.server, &want.sealed],
                        )
                        .await
                        .map_err(db)?;
                }
            }
            errors.entry(w.project).or_insert(None);
            continue;
        }
        if out_of_time() {
            wanted.remove(&(w.project, w.server));
            continue;
        }
        let removed = async {
            if !policy.allows(w.settings.server) {
                return Err(InvalidDns::Denied(w.settings.server).to_string());
            }
            let zone = w.settings.zone(keys, &w.sealed)?;
            let name = update::fqdn(&w.name).map_err(|e| e.to_string())?;
            zone.remove(&name).await.map_err(|e| e.to_string())
        }
        .await;
        match removed {
            Ok(()) => {
                client
                    .execute(
                        "DELETE FROM dns_records WHERE project_id = $1 AND server_id = $2",
                        &[&w.project, &w.server],
                    )
                    .await
                    .map_err(db)?;
                tracing::info!(project = %w.project, server = %w.server, name = %w.name, "DNS record removed");
            }
            Err(e) => {
                errors.insert(w.project, Some(format!("removing {}: {e}", w.name)));
                // Not written again until the old one is gone: one name, one owner.
                wanted.remove(&(w.project, w.server));
            }
        }
    }
    for want in wanted.values() {
        if waiting.contains(&want.project) || out_of_time() {
            continue;
        }
        if !policy.allows(want.settings.server) {
            errors.insert(
                want.project,
                Some(InvalidDns::Denied(want.settings.server).to_string()),
            );
            continue;
        }
        let written = async {
            let zone = want.settings.zone(keys, &want.sealed)?;
            let name = zone.name(&want.label).map_err(|e| e.to_string())?;
            zone.replace(&name, &want.target)
                .await
                .map_err(|e: UpdateError| e.to_string())?;
            Ok::<_, String>(name.to_string())
        }
        .await;
        match written {
            Ok(name) => {
                client
                    .execute(
                        "INSERT INTO dns_records (project_id, server_id, name, target, settings, secret_ciphertext) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (project_id, server_id) DO UPDATE SET name = $3, target = $4, \
                           settings = $5, secret_ciphertext = $6, written_at = now()",
                        &[&want.project, &want.server, &name, &target_text(&want.target),
                          &serde_json::json!(want.settings), &want.sealed],
                    )
                    .await
                    .map_err(db)?;
                errors.entry(want.project).or_insert(None);
                tracing::info!(project = %want.project, server = %want.server, %name, "DNS record written");
            }
            Err(e) => {
                errors.insert(want.project, Some(e));
            }
        }
    }
    for (project, error) in errors {
        let error = error.map(|e| e.chars().take(MAX_ERROR).collect::<String>());
        // A failure doubles the wait before the zone is tried again (1 s, 2 s, … 5 min); a
        // success clears it.
        client
            .execute(
                "UPDATE projects SET dns_error = $2, \
                   dns_error_at = CASE WHEN $2::text IS NULL THEN NULL ELSE now() END, \
                   dns_failures = CASE WHEN $2::text IS NULL THEN 0 ELSE dns_failures + 1 END, \
                   dns_retry_at = CASE WHEN $2::text IS NULL THEN NULL \
                     ELSE now() + make_interval(secs => least(power(2, least(dns_failures, 16)), $3)) END \
                 WHERE id = $1",
                &[&project, &error, &MAX_RETRY_SECS],
            )
            .await
            .map_err(db)?;
    }
    Ok(())
}

fn want_name(want: &Wanted) -> Option<String> {
    update::fqdn(&want.settings.zone)
        .ok()
        .and_then(|zone| {
            hickory_proto::rr::Name::from_ascii(&want.label)
                .ok()?
                .append_domain(&zone)
                .ok()
        })
        .map(|n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_become_labels() {
        assert_eq!(label("web-1").as_deref(), Some("web-1"));
        assert_eq!(label("Web_1.Prod").as_deref(), Some("web-1-prod"));
        assert_eq!(label("--x--").as_deref(), Some("x"));
        assert_eq!(label("***"), None);
        assert_eq!(label(&"a".repeat(80)).map(|l| l.len()), Some(63));
    }

    #[test]
    fn targets_are_addresses_or_aliases() {
        assert_eq!(
            target_of("agent", Some("ignored"), Some("192.0.2.7")),
            Some(Target::Address("192.0.2.7".parse().expect("ip")))
        );
        assert_eq!(target_of("agent", None, None), None);
        assert!(matches!(
            target_of("ssh", Some("db.example.com"), None),
            Some(Target::Alias(_))
        ));
    }

    #[test]
    fn settings_are_checked_before_they_are_stored() {
        let policy = TargetPolicy {
            denied_networks: crate::egress::default_denied_networks(),
            own: vec!["127.0.0.1:8443".parse().expect("addr")],
        };
        let good = DnsSettings {
            zone: "apps.example.com".into(),
            server: "127.0.0.1:5353".parse().expect("addr"),
            key_name: "sensei".into(),
            algorithm: "hmac-sha256".into(),
            ttl: 60,
        };
        let secret = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(good.check(&secret, &policy).map(|s| s.len()), Ok(32));
        assert_eq!(good.check("c2hvcnQ=", &policy), Err(InvalidDns::Secret));
        let md5 = DnsSettings {
            algorithm: "hmac-md5".into(),
            ..good.clone()
        };
        assert!(matches!(
            md5.check(&secret, &policy),
            Err(InvalidDns::Field(_))
        ));
        let metadata = DnsSettings {
            server: "169.254.169.254:53".parse().expect("addr"),
            ..good.clone()
        };
        assert!(matches!(
            metadata.check(&secret, &policy),
            Err(InvalidDns::Denied(_))
        ));
        let ourselves = DnsSettings {
            server: "127.0.0.1:8443".parse().expect("addr"),
            ..good
        };
        assert!(matches!(
            ourselves.check(&secret, &policy),
            Err(InvalidDns::Denied(_))
        ));
    }
}
