//! `sensei rollout …`: start a fleet rollout, watch it, steer it.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};

use super::{labels_object, Ctx};
use crate::args::{OnHalt, RolloutCommand, RolloutStartArgs};
use crate::error::{CliError, Result};
use crate::output;

const MAX_RECONNECTS: u32 = 30;

pub async fn run(ctx: &Ctx, command: RolloutCommand) -> Result<()> {
    match command {
        RolloutCommand::Start(args) => start(ctx, args).await,
        RolloutCommand::Status { id, watch } => {
            let id = rollout_id(&id)?;
            if watch {
                return watch_to_end(ctx, &id).await;
            }
            let r = ctx.api.get(&format!("/v1/rollouts/{id}")).await?;
            if ctx.json {
                output::json(&r);
            } else {
                show(ctx, &r).await?;
            }
            Ok(())
        }
        RolloutCommand::List => {
            let page = ctx.api.get("/v1/rollouts?limit=50").await?;
            if ctx.json {
                output::json(&page);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = page["rollouts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        output::time(&r["created_at"]),
                        output::text(&r["state"]),
                        match r["upgrade_agent"]["version"].as_str() {
                            Some(version) => format!("agent {version}"),
                            None => output::text(&r["ref"]),
                        },
                        counts(&r["target_counts"]),
                        output::text(&r["id"]),
                    ]
                })
                .collect();
            output::table(&["STARTED", "STATE", "REF", "TARGETS", "ID"], &rows);
            Ok(())
        }
        RolloutCommand::Pause { id } => steer(ctx, &id, "pause", "Paused").await,
        RolloutCommand::Resume { id } => steer(ctx, &id, "resume", "Resumed").await,
        RolloutCommand::Approve { id } => steer(ctx, &id, "approve", "Approved").await,
        RolloutCommand::Abort { id } => steer(ctx, &id, "abort", "Aborted").await,
    }
}

fn rollout_id(raw: &str) -> Result<String> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| CliError::usage(format!("{raw} is not a rollout id")))
}

async fn steer(ctx: &Ctx, id: &str, action: &str, done: &str) -> Result<()> {
    let id = rollout_id(id)?;
    let r = ctx
        .api
        .post(&format!("/v1/rollouts/{id}/{action}"), &json!({}))
        .await?;
    if ctx.json {
        output::json(&r);
    } else {
        eprintln!("{done} rollout {id}: now {}.", output::text(&r["state"]));
    }
    Ok(())
}

/// `--batch 10` (servers) or `--batch 10%`.
fn batch(raw: &str) -> Result<(&'static str, u32)> {
    let (field, number) = match raw.strip_suffix('%') {
        Some(p) => ("batch_percent", p),
        None => ("batch_size", raw),
    };
    let n: u32 = number
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            CliError::usage(format!(
                "--batch {raw}: give a number of servers or a percentage, e.g. 10 or 10%"
            ))
        })?;
    Ok((field, n))
}

async fn start(ctx: &Ctx, args: RolloutStartArgs) -> Result<()> {
    let (batch_field, batch_value) = batch(&args.batch)?;
    let mut strategy = json!({
        "canary": args.canary,
        "max_failures": args.max_failures,
        "pause_seconds": args.pause,
        "manual_approval": args.approve,
        "on_halt": match args.on_halt { OnHalt::Stop => "stop", OnHalt::Rollback => "rollback" },
    });
    strategy[batch_field] = json!(batch_value);
    if batch_field == "batch_size" {
        // The API's default is a percentage; a size given replaces it.
        strategy["batch_percent"] = Value::Null;
    }
    if let Some(deadline) = args.upgrade_deadline {
        strategy["upgrade_deadline_seconds"] = json!(deadline);
    }
    let mut body = json!({
        "selector": {"labels": labels_object(&args.label)?},
        "strategy": strategy,
    });
    // What the rollout does, for the message below.
    let what = match (&args.upgrade_agent, &args.project) {
        (Some(version), _) => {
            body["upgrade_agent"] = json!({ "version": version });
            format!("the agent upgrade to {version}")
        }
        (None, Some(project)) => {
            let project = ctx.project(project).await?;
            body["project_id"] = project["id"].clone();
            body["ref"] = json!(args.git_ref);
            args.git_ref.clone()
        }
        // clap requires one of the two.
        (None, None) => return Err(CliError::usage("give a project or --upgrade-agent")),
    };
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| format!("sensei-cli-{}", uuid::Uuid::new_v4()));
    let (_, _, r) = ctx
        .api
        .send_idempotent(Method::POST, "/v1/rollouts", &body, &key)
        .await?;
    let id = output::text(&r["id"]);
    if !args.watch {
        if ctx.json {
            output::json(&r);
        } else {
            println!("{id}");
            eprintln!(
                "Started rollout {id} of {} to {} servers ({} batches). `sensei rollout status {id} --watch` follows it.",
                what,
                r["target_counts"].as_object().map(|c| c.values().filter_map(Value::as_i64).sum::<i64>()).unwrap_or_default(),
                output::text(&r["batch_count"])
            );
        }
        return Ok(());
    }
    if !ctx.json {
        eprintln!("Started rollout {id}.");
    }
    watch_to_end(ctx, &id).await
}

fn counts(c: &Value) -> String {
    c.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn ended(r: &Value) -> bool {
    matches!(
        r["state"].as_str(),
        Some("succeeded" | "aborted" | "rolled_back")
    ) || (r["state"] == "halted" && !r["finished_at"].is_null())
}

/// One line on the rollout's progress.
fn summary(r: &Value) -> String {
    let batch = r["current_batch"]
        .as_i64()
        .map(|b| format!("batch {} of {}", b + 1, output::text(&r["batch_count"])))
        .unwrap_or_else(|| format!("{} batches", output::text(&r["batch_count"])));
    let mut line = format!(
        "{} ({batch}): {}",
        output::text(&r["state"]),
        counts(&r["target_counts"])
    );
    for reason in [&r["paused_reason"], &r["halted_reason"]] {
        if let Some(why) = reason.as_str() {
            line.push_str(&format!(" — {why}"));
        }
    }
    line
}

/// Follows the rollout's event stream until it ends; exit 1 unless it succeeded.
async fn watch_to_end(ctx: &Ctx, id: &str) -> Result<()> {
    let path = format!("/v1/rollouts/{id}/events");
    let bar = ProgressBar::with_draw_target(
        None,
        if output::interactive() && !ctx.json {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_id: Option<String> = None;
    let mut last_line = String::new();
    let mut reconnects = 0;
    let last = 'watch: loop {
        match ctx.api.events(&path, last_id.as_deref()).await {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Ok(Some(event)) if event.event == "rollout" => {
                        reconnects = 0;
                        last_id = event.id.clone();
                        let r: Value = serde_json::from_str(&event.data).unwrap_or_default();
                        let total: i64 = r["target_counts"]
                            .as_object()
                            .map(|c| c.values().filter_map(Value::as_i64).sum())
                            .unwrap_or_default();
                        let settled: i64 = ["succeeded", "failed", "unreachable", "skipped"]
                            .iter()
                            .filter_map(|s| r["target_counts"][s].as_i64())
                            .sum();
                        bar.set_length(total.max(0) as u64);
                        bar.set_position(settled.max(0) as u64);
                        let line = summary(&r);
                        bar.set_message(line.clone());
                        // Plain lines where no bar is drawn (CI logs): one per change.
                        if bar.is_hidden() && !ctx.json && line != last_line {
                            eprintln!("{line}");
                        }
                        last_line = line;
                        if ended(&r) {
                            break 'watch r;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            },
            Err(e @ (CliError::Api { .. } | CliError::Auth(_))) => return Err(e),
            Err(e) if reconnects >= MAX_RECONNECTS => return Err(e),
            Err(_) => {}
        }
        reconnects += 1;
        if reconnects > MAX_RECONNECTS {
            return Err(CliError::Unreachable(format!(
                "lost the rollout's event stream {MAX_RECONNECTS} times in a row; `sensei rollout status {id} --watch` resumes"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    bar.finish_and_clear();
    if ctx.json {
        output::json(&last);
    } else {
        show(ctx, &last).await?;
    }
    if last["state"] == "succeeded" {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "rollout {id} ended {}",
            summary(&last)
        )))
    }
}

/// The rollout and its targets as a table.
async fn show(ctx: &Ctx, r: &Value) -> Result<()> {
    match r["upgrade_agent"]["version"].as_str() {
        Some(version) => println!(
            "rollout {}: agent upgrade to {version}",
            output::text(&r["id"])
        ),
        None => println!(
            "rollout {} of {} (commit {})",
            output::text(&r["id"]),
            output::text(&r["ref"]),
            output::short_commit(&r["commit"])
        ),
    }
    println!("{}", summary(r));
    let names: std::collections::BTreeMap<String, String> = ctx
        .api
        .list_all("/v1/servers", "", "servers")
        .await?
        .iter()
        .map(|s| (output::text(&s["id"]), output::text(&s["name"])))
        .collect();
    let rows: Vec<Vec<String>> = r["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let id = output::text(&t["server_id"]);
            vec![
                // Counted from 1, as the summary line counts batches.
                t["batch"]
                    .as_i64()
                    .map(|b| (b + 1).to_string())
                    .unwrap_or_else(|| "-".into()),
                names.get(&id).cloned().unwrap_or(id),
                output::text(&t["status"]),
                output::text(&t["deployment_id"]),
                output::text(&t["error"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        output::table(&["BATCH", "SERVER", "STATUS", "DEPLOYMENT", "ERROR"], &rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_a_count_or_a_percentage() {
        assert_eq!(batch("10%").expect("ok"), ("batch_percent", 10));
        assert_eq!(batch("3").expect("ok"), ("batch_size", 3));
        for bad in ["0", "x", "%", "-1", "10 %%"] {
            assert!(batch(bad).is_err(), "{bad}");
        }
    }
}
