//! `sensei deploy`, `rollback`, `logs`, `history`: queue jobs and follow them to the end.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};

use super::{id_of, Ctx, Kind};
use crate::args::{DeployArgs, RollbackArgs};
use crate::client::Api;
use crate::error::{CliError, Result};
use crate::output;

/// Deploys followed line by line; past this many (each holds one of the user's eight live
/// streams), their states are polled instead and only failures' logs are pointed at.
const MAX_STREAMED: usize = 6;
/// Reconnects of one log stream before giving up on it (each after a pause).
const MAX_RECONNECTS: u32 = 30;

/// A queued job and the server it runs on.
struct Followed {
    server: String,
    deployment: Value,
}

pub async fn deploy(ctx: &Ctx, args: DeployArgs) -> Result<()> {
    let project = ctx.reference(&args.project, Kind::Project).await?;
    let servers = if args.label.is_empty() {
        let mut v = Vec::new();
        for s in &args.server {
            v.push(ctx.reference(s, Kind::Server).await?);
        }
        v
    } else {
        ctx.servers_labelled(&args.label).await?
    };
    if servers.is_empty() {
        return Err(CliError::usage(format!(
            "no server has the labels {} (`sensei servers list` shows them)",
            args.label.join(" ")
        )));
    }
    let key = run_key(args.idempotency_key.as_deref())?;
    let mut followed = Vec::new();
    let mut refused = Vec::new();
    for s in &servers {
        let server = output::text(&s["name"]);
        let body = json!({"project_id": project["id"], "server_id": s["id"], "ref": args.git_ref});
        // One key per project and server: the same run key may deploy other projects too.
        let header = format!(
            "{key}.{}.{}",
            output::text(&project["id"]),
            output::text(&s["id"])
        );
        match ctx
            .api
            .send_idempotent(Method::POST, "/v1/deployments", &body, &header)
            .await
        {
            Ok((_, headers, deployment)) => {
                if !ctx.json {
                    let again = headers.get("idempotent-replayed").is_some();
                    eprintln!(
                        "{} deploy {} of {} on {server} ({}).",
                        if again { "Already queued:" } else { "Queued" },
                        args.git_ref,
                        output::text(&project["name"]),
                        output::text(&deployment["id"])
                    );
                }
                followed.push(Followed { server, deployment });
            }
            // One server refusing (not enrolled, say) must not hide what the others do.
            Err(e @ CliError::Api { .. }) => refused.push((server, e)),
            Err(e) => return Err(e),
        }
    }
    if followed.is_empty() {
        // Nothing queued anywhere: the refusal itself is the answer (and its exit code).
        if let Some((_, e)) = refused.into_iter().next() {
            return Err(e);
        }
        return Err(CliError::local("nothing was queued"));
    }
    let refused: Vec<String> = refused
        .iter()
        .map(|(server, e)| format!("{server}: {e}"))
        .collect();
    if args.no_wait {
        report_queued(ctx, &followed);
        return refused_error(&refused);
    }
    let finished = follow_all(ctx, followed).await?;
    summarize(ctx, &finished, &refused, "deploy")
}

/// The per-run idempotency key: the caller's (stable across CI retries) or a fresh one.
fn run_key(given: Option<&str>) -> Result<String> {
    match given {
        Some(k) => {
            // With the project's and a server's id appended it must stay within the API's
            // 255 characters.
            let ok = !k.is_empty() && k.len() <= 180 && k.bytes().all(|b| b.is_ascii_graphic());
            if ok {
                Ok(k.to_owned())
            } else {
                Err(CliError::usage(
                    "--idempotency-key must be 1 to 180 printable ASCII characters without spaces",
                ))
            }
        }
        None => Ok(format!("sensei-cli-{}", uuid::Uuid::new_v4())),
    }
}

fn report_queued(ctx: &Ctx, followed: &[Followed]) {
    if ctx.json {
        let list: Vec<&Value> = followed.iter().map(|f| &f.deployment).collect();
        output::json(&json!({ "deployments": list }));
    } else {
        for f in followed {
            println!("{}", output::text(&f.deployment["id"]));
        }
    }
}

fn refused_error(refused: &[String]) -> Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "not queued on every server:\n  {}",
        refused.join("\n  ")
    )))
}

/// Prints the outcome and fails unless every job succeeded, naming the failing step.
fn summarize(ctx: &Ctx, finished: &[Followed], refused: &[String], what: &str) -> Result<()> {
    if ctx.json {
        let list: Vec<&Value> = finished.iter().map(|f| &f.deployment).collect();
        output::json(&json!({ "deployments": list }));
    }
    let mut failures: Vec<String> = refused.to_vec();
    for f in finished {
        let d = &f.deployment;
        if d["status"] == "succeeded" {
            if !ctx.json {
                eprintln!(
                    "{what} on {} succeeded: release {} (commit {}) in {:.1} s.",
                    f.server,
                    output::text(&d["release_id"]),
                    output::short_commit(&d["commit"]),
                    d["duration_secs"].as_f64().unwrap_or_default()
                );
            }
        } else {
            failures.push(format!(
                "{}: failed at step {}: {} (`sensei logs {}`)",
                f.server,
                output::text(&d["error"]["step"]),
                output::text(&d["error"]["message"]),
                output::text(&d["id"])
            ));
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "{what} failed on {} of {}:\n  {}",
        failures.len(),
        finished.len() + refused.len(),
        failures.join("\n  ")
    )))
}

/// Follows every job to its end: their logs live when few, their states when many; a
/// progress bar per server on a terminal when there are several.
async fn follow_all(ctx: &Ctx, followed: Vec<Followed>) -> Result<Vec<Followed>> {
    let several = followed.len() > 1;
    let bars = MultiProgress::with_draw_target(if several && output::interactive() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let stream_logs = followed.len() <= MAX_STREAMED;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, f) in followed.into_iter().enumerate() {
        let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
        bar.set_prefix(f.server.clone());
        bar.set_message("queued");
        bar.enable_steady_tick(Duration::from_millis(120));
        let printer = Printer {
            prefix: several.then(|| f.server.clone()),
            bars: bars.clone(),
            to_stderr: ctx.json,
        };
        let api = ctx.api.clone();
        tasks.spawn(async move {
            let id = output::text(&f.deployment["id"]);
            let end = if stream_logs {
                follow_log(&api, &id, &printer, &bar).await
            } else {
                poll_until_done(&api, &id, &bar).await
            };
            let end = match end {
                Ok(()) => api.get(&format!("/v1/deployments/{id}")).await,
                Err(e) => Err(e),
            };
            match &end {
                Ok(d) => bar.finish_with_message(output::text(&d["status"])),
                Err(_) => bar.abandon_with_message("lost"),
            }
            (index, f.server, end)
        });
    }
    let mut done: BTreeMap<usize, Followed> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, server, end) =
            joined.map_err(|e| CliError::local(format!("follower task: {e}")))?;
        done.insert(
            index,
            Followed {
                server,
                deployment: end?,
            },
        );
    }
    Ok(done.into_values().collect())
}

/// Where log lines go: standard output (standard error under `--json`), above the bars,
/// prefixed by the server when several are followed.
#[derive(Clone)]
struct Printer {
    prefix: Option<String>,
    bars: MultiProgress,
    to_stderr: bool,
}

impl Printer {
    fn line(&self, text: &str) {
        let text = output::safe(text);
        let line = match &self.prefix {
            Some(p) => format!("[{p}] {text}"),
            None => text,
        };
        self.bars.suspend(|| {
            if self.to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        });
    }
}

/// Streams a deployment's log until its final status, resuming after the last line seen
/// when the connection drops.
async fn follow_log(api: &Api, id: &str, printer: &Printer, bar: &ProgressBar) -> Result<()> {
    let path = format!("/v1/deployments/{id}/logs?follow=true");
    let mut last: Option<String> = None;
    let mut reconnects = 0;
    loop {
        match api.events(&path, last.as_deref()).await {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Ok(Some(event)) if event.event == "line" => {
                        // A stream that delivers is a working one: only drops in a row count.
                        reconnects = 0;
                        last = event.id.clone().or(last);
                        let entry: Value = serde_json::from_str(&event.data).unwrap_or_default();
                        let text = output::text(&entry["line"]);
                        if entry["stream"] == "sensei" {
                            bar.set_message(text.clone());
                        }
                        printer.line(&text);
                    }
                    Ok(Some(event)) if event.event == "status" => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            },
            // Too many streams open (another terminal follows too): fall back to polling.
            Err(CliError::Api { code, .. }) if code == "too_many_streams" => {
                return poll_until_done(api, id, bar).await
            }
            Err(e @ (CliError::Api { .. } | CliError::Auth(_))) => return Err(e),
            Err(_) if reconnects < MAX_RECONNECTS => {}
            Err(e) => return Err(e),
        }
        reconnects += 1;
        if reconnects > MAX_RECONNECTS {
            return Err(CliError::Unreachable(format!(
                "lost the log stream of {id} {MAX_RECONNECTS} times in a row; `sensei logs {id} -f` resumes it"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Polls a deployment's state until it ends.
async fn poll_until_done(api: &Api, id: &str, bar: &ProgressBar) -> Result<()> {
    loop {
        let d = api.get(&format!("/v1/deployments/{id}")).await?;
        let status = output::text(&d["status"]);
        if status == "succeeded" || status == "failed" {
            return Ok(());
        }
        bar.set_message(status);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `sensei logs ID [-f]`
pub async fn logs(ctx: &Ctx, deployment: &str, follow: bool) -> Result<()> {
    let id = uuid::Uuid::parse_str(deployment)
        .map_err(|_| CliError::usage(format!("{deployment} is not a deployment id")))?
        .to_string();
    let printer = Printer {
        prefix: None,
        bars: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
        to_stderr: false,
    };
    if follow {
        let bar = ProgressBar::hidden();
        follow_log(&ctx.api, &id, &printer, &bar).await?;
        let d = ctx.api.get(&format!("/v1/deployments/{id}")).await?;
        return summarize(
            ctx,
            &[Followed {
                server: output::text(&d["server_id"]),
                deployment: d,
            }],
            &[],
            "the job",
        );
    }
    let mut after = 0i64;
    let mut all = Vec::new();
    // At most 20,000 lines are stored per deployment: 20 pages of 1,000.
    for _ in 0..25 {
        let page = ctx
            .api
            .get(&format!("/v1/deployments/{id}/logs?after={after}"))
            .await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        let Some(last) = lines.last().and_then(|l| l["id"].as_i64()) else {
            break;
        };
        after = last;
        all.extend(lines);
    }
    if ctx.json {
        output::json(&json!({ "lines": all }));
    } else {
        for l in &all {
            printer.line(&output::text(&l["line"]));
        }
    }
    Ok(())
}

/// `sensei history PROJECT`
pub async fn history(ctx: &Ctx, project: &str, server: Option<&str>, limit: u16) -> Result<()> {
    let p = ctx.project(project).await?;
    let mut query = format!("/v1/deployments?project_id={}&limit={limit}", id_of(&p)?);
    if let Some(s) = server {
        query.push_str(&format!("&server_id={}", id_of(&ctx.server(s).await?)?));
    }
    let page = ctx.api.get(&query).await?;
    if ctx.json {
        output::json(&page);
        return Ok(());
    }
    let names = server_names(ctx).await?;
    let rows: Vec<Vec<String>> = page["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                output::time(&d["created_at"]),
                output::text(&d["kind"]),
                names
                    .get(&output::text(&d["server_id"]))
                    .cloned()
                    .unwrap_or_else(|| output::text(&d["server_id"])),
                output::text(&d["status"]),
                output::text(&d["git_ref"]),
                output::short_commit(&d["commit"]),
                output::text(&d["release_id"]),
                output::text(&d["queued_by"]["email"]),
                output::text(&d["id"]),
            ]
        })
        .collect();
    output::table(
        &[
            "QUEUED", "KIND", "SERVER", "STATUS", "REF", "COMMIT", "RELEASE", "BY", "ID",
        ],
        &rows,
    );
    Ok(())
}

async fn server_names(ctx: &Ctx) -> Result<BTreeMap<String, String>> {
    Ok(ctx
        .api
        .list_all("/v1/servers", "", "servers")
        .await?
        .iter()
        .map(|s| (output::text(&s["id"]), output::text(&s["name"])))
        .collect())
}

/// A release a rollback can go back to.
struct Candidate {
    release: String,
    commit: String,
    finished: String,
    by: String,
}

/// What the server's history says about its releases: the current one, and the good ones
/// before it (newest first) that were never rolled away from.
fn candidates(history_newest_first: &[Value], keep: usize) -> (Option<String>, Vec<Candidate>) {
    let mut current: Option<String> = None;
    let mut rolled_away: HashSet<String> = HashSet::new();
    for d in history_newest_first.iter().rev() {
        let Some(release) = d["release_id"].as_str() else {
            continue;
        };
        match d["kind"].as_str() {
            Some("deploy") => current = Some(release.to_owned()),
            Some("rollback") => {
                if let Some(from) = current.take() {
                    rolled_away.insert(from);
                }
                current = Some(release.to_owned());
            }
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    let list = history_newest_first
        .iter()
        .filter(|d| d["kind"] == "deploy")
        .filter_map(|d| {
            let release = d["release_id"].as_str()?.to_owned();
            let usable = Some(&release) != current.as_ref()
                && !rolled_away.contains(&release)
                && seen.insert(release.clone());
            usable.then(|| Candidate {
                release,
                commit: output::short_commit(&d["commit"]),
                finished: output::time(&d["finished_at"]),
                by: output::text(&d["queued_by"]["email"]),
            })
        })
        // Older ones than the project keeps have been pruned from the server.
        .take(keep.saturating_sub(1).max(1))
        .collect();
    (current, list)
}

/// `sensei rollback PROJECT --server NAME [--to RELEASE]`
pub async fn rollback(ctx: &Ctx, args: RollbackArgs) -> Result<()> {
    let project = ctx.project(&args.project).await?;
    let server = ctx.server(&args.server).await?;
    let server_name = output::text(&server["name"]);
    let page = ctx
        .api
        .get(&format!(
            "/v1/deployments?project_id={}&server_id={}&status=succeeded&limit=200",
            id_of(&project)?,
            id_of(&server)?
        ))
        .await?;
    let history: Vec<Value> = page["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["kind"] == "deploy" || d["kind"] == "rollback")
        .cloned()
        .collect();
    let Some(anchor) = history.first() else {
        return Err(CliError::usage(format!(
            "{} was never deployed successfully on {server_name}: nothing to roll back",
            output::text(&project["name"])
        )));
    };
    let keep = project["keep_releases"].as_u64().unwrap_or(5) as usize;
    let to = match (args.to, args.previous) {
        (Some(to), _) => Some(to),
        (None, true) => None,
        (None, false) if output::interactive() => Some(pick(&history, keep, &server_name)?),
        (None, false) => None,
    };
    let body = match &to {
        Some(release) => {
            // A control plane older than this feature ignores the field and would go to the
            // previous release instead: ask its API description first.
            let doc = ctx.api.get("/openapi.json").await?;
            if doc["components"]["schemas"]["RollbackRequest"].is_null() {
                return Err(CliError::usage(
                    "this control plane cannot roll back to a chosen release (upgrade it); \
                     `--previous` goes to the previous good release",
                ));
            }
            json!({ "to_release": release })
        }
        None => json!({}),
    };
    let key = run_key(None)?;
    let (_, _, queued) = ctx
        .api
        .send_idempotent(
            Method::POST,
            &format!("/v1/deployments/{}/rollback", id_of(anchor)?),
            &body,
            &key,
        )
        .await?;
    if !ctx.json {
        eprintln!(
            "Queued rollback of {} on {server_name} to {} ({}).",
            output::text(&project["name"]),
            to.as_deref().unwrap_or("the previous good release"),
            output::text(&queued["id"])
        );
    }
    let finished = follow_all(
        ctx,
        vec![Followed {
            server: server_name,
            deployment: queued,
        }],
    )
    .await?;
    summarize(ctx, &finished, &[], "rollback")
}

/// The interactive picker of the server's recent good releases.
fn pick(history: &[Value], keep: usize, server: &str) -> Result<String> {
    let (current, list) = candidates(history, keep);
    if list.is_empty() {
        return Err(CliError::usage(format!(
            "{server} has no earlier good release to return to (current: {})",
            current.as_deref().unwrap_or("-")
        )));
    }
    let items: Vec<String> = list
        .iter()
        .map(|c| format!("{}  {}  {}  {}", c.release, c.commit, c.finished, c.by))
        .collect();
    eprintln!(
        "{server} runs {}. Roll back to (release, commit, deployed, by):",
        current.as_deref().unwrap_or("-")
    );
    let chosen = dialoguer::Select::new()
        .items(&items)
        .default(0)
        .interact_opt()
        .map_err(|e| CliError::local(format!("prompt: {e}")))?
        .ok_or_else(|| CliError::usage("nothing chosen: no rollback queued"))?;
    Ok(list[chosen].release.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(kind: &str, release: &str) -> Value {
        json!({"kind": kind, "release_id": release, "commit": format!("{release}c"), "status": "succeeded"})
    }

    #[test]
    fn the_picker_offers_good_releases_before_the_current_one_and_not_those_rolled_away_from() {
        // Oldest to newest: r1, r2, r3 deployed; rolled back to r2 (r3 rolled away from);
        // r4 deployed. Current r4; r3 is marked rolled back on the server.
        let newest_first = vec![
            d("deploy", "r4"),
            d("rollback", "r2"),
            d("deploy", "r3"),
            d("deploy", "r2"),
            d("deploy", "r1"),
        ];
        let (current, list) = candidates(&newest_first, 5);
        assert_eq!(current.as_deref(), Some("r4"));
        let releases: Vec<&str> = list.iter().map(|c| c.release.as_str()).collect();
        assert_eq!(releases, ["r2", "r1"]);
        // A project keeping two releases has only one besides the current one on the server.
        let (_, list) = candidates(&newest_first, 2);
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn a_given_idempotency_key_is_checked_and_kept() {
        assert_eq!(run_key(Some("ci-42")).expect("ok"), "ci-42");
        assert!(run_key(Some("has space")).is_err());
        assert!(run_key(Some("")).is_err());
        assert!(run_key(None).expect("fresh").starts_with("sensei-cli-"));
    }
}
