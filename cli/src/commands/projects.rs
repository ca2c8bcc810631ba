//! `sensei projects …` and `sensei env …`

use std::io::Read;

use serde_json::{json, Value};

use super::{id_of, Ctx};
use crate::args::{EnvCommand, ProjectSettings, ProjectsCommand};
use crate::error::{CliError, Result};
use crate::output;

/// The largest value `env set` reads. The API takes 64 KiB per value but also 64 KiB per
/// request body, which JSON escaping makes larger than the value: what fits is checked on the
/// encoded request.
const MAX_ENV_VALUE: u64 = 64 * 1024;
/// Room the rest of the request (`{"env_set":{"NAME":…}}`) may take within the body limit.
const MAX_ENCODED_BODY: usize = 64 * 1024 - 512;

pub async fn run(ctx: &Ctx, command: ProjectsCommand) -> Result<()> {
    match command {
        ProjectsCommand::List => {
            let projects = ctx.api.list_all("/v1/projects", "", "projects").await?;
            if ctx.json {
                output::json(&json!({ "projects": projects }));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = projects
                .iter()
                .map(|p| {
                    vec![
                        output::text(&p["name"]),
                        output::text(&p["repo_url"]),
                        output::text(&p["deploy_path"]),
                        output::text(&p["id"]),
                    ]
                })
                .collect();
            output::table(&["NAME", "REPOSITORY", "PATH", "ID"], &rows);
        }
        ProjectsCommand::Show { project } => {
            let p = ctx.project(&project).await?;
            if ctx.json {
                output::json(&p);
            } else {
                show(&p);
            }
        }
        ProjectsCommand::Create(args) => {
            let mut body =
                json!({"name": args.name, "repo_url": args.repo, "deploy_path": args.path});
            apply(&mut body, &args.settings, &Value::Null);
            let p = ctx.api.post("/v1/projects", &body).await?;
            if ctx.json {
                output::json(&p);
            } else {
                eprintln!(
                    "Created project {} ({}).",
                    args.name,
                    output::text(&p["id"])
                );
            }
        }
        ProjectsCommand::Edit(args) => {
            let p = ctx.project(&args.project).await?;
            let mut body = json!({});
            for (field, value) in [
                ("name", &args.name),
                ("repo_url", &args.repo),
                ("deploy_path", &args.path),
            ] {
                if let Some(v) = value {
                    body[field] = json!(v);
                }
            }
            apply(&mut body, &args.settings, &p["hooks"]);
            if body.as_object().is_some_and(|o| o.is_empty()) {
                return Err(CliError::usage(
                    "nothing to change: give at least one option (`sensei projects edit --help`)",
                ));
            }
            let p = ctx
                .api
                .patch(&format!("/v1/projects/{}", id_of(&p)?), &body)
                .await?;
            if ctx.json {
                output::json(&p);
            } else {
                eprintln!("Updated project {}.", output::text(&p["name"]));
            }
        }
    }
    Ok(())
}

/// Puts the options given into a create or update body. Hooks are replaced per kind: the
/// kinds not given keep `current`'s commands (the API replaces the whole set).
fn apply(body: &mut Value, s: &ProjectSettings, current: &Value) {
    if let Some(k) = s.keep_releases {
        body["keep_releases"] = json!(k);
    }
    if !s.shared_paths.is_empty() {
        body["shared_paths"] = json!(s.shared_paths);
    }
    if !(s.build.is_empty() && s.pre_switch.is_empty() && s.post_switch.is_empty()) {
        let kind = |given: &Vec<String>, name: &str| {
            if given.is_empty() {
                match &current[name] {
                    Value::Null => json!([]),
                    kept => kept.clone(),
                }
            } else {
                json!(given)
            }
        };
        body["hooks"] = json!({
            "build": kind(&s.build, "build"),
            "pre_switch": kind(&s.pre_switch, "pre_switch"),
            "post_switch": kind(&s.post_switch, "post_switch"),
        });
    }
    if let Some(h) = &s.health_check {
        body["health_check"] = json!(h);
    }
    if let Some(t) = s.hook_timeout {
        body["hook_timeout_secs"] = json!(t);
    }
}

fn show(p: &Value) {
    let list = |v: &Value| {
        v.as_array()
            .filter(|a| !a.is_empty())
            .map(|a| a.iter().map(output::text).collect::<Vec<_>>().join(" ; "))
            .unwrap_or_else(|| "-".into())
    };
    for (k, v) in [
        ("name", output::text(&p["name"])),
        ("id", output::text(&p["id"])),
        ("repository", output::text(&p["repo_url"])),
        ("deploy path", output::text(&p["deploy_path"])),
        ("keep releases", output::text(&p["keep_releases"])),
        ("shared", list(&p["shared_paths"])),
        ("build", list(&p["hooks"]["build"])),
        ("pre-switch", list(&p["hooks"]["pre_switch"])),
        ("post-switch", list(&p["hooks"]["post_switch"])),
        ("health check", output::text(&p["health_check"])),
        (
            "hook timeout",
            format!("{} s", output::text(&p["hook_timeout_secs"])),
        ),
        ("environment", list(&p["env_names"])),
    ] {
        println!("{:<14} {v}", format!("{k}:"));
    }
}

pub async fn env(ctx: &Ctx, command: EnvCommand) -> Result<()> {
    match command {
        EnvCommand::List { project } => {
            let p = ctx.project(&project).await?;
            if ctx.json {
                output::json(&json!({"env_names": p["env_names"]}));
            } else {
                for name in p["env_names"].as_array().into_iter().flatten() {
                    println!("{}", output::text(name));
                }
            }
        }
        EnvCommand::Set {
            project,
            name,
            file,
        } => {
            let value = read_value(file.as_deref())?;
            let body = json!({"env_set": {name.clone(): value}});
            if body.to_string().len() > MAX_ENCODED_BODY {
                return Err(CliError::usage(
                    "the value is too large: encoded for the API it exceeds the 64 KiB request limit",
                ));
            }
            let p = ctx.project(&project).await?;
            let answer = ctx
                .api
                .patch(&format!("/v1/projects/{}", id_of(&p)?), &body)
                .await?;
            if ctx.json {
                output::json(&json!({"env_names": answer["env_names"]}));
            } else {
                eprintln!(
                    "Set {name} on {} (the next deploy writes it to the servers).",
                    output::text(&answer["name"])
                );
            }
        }
        EnvCommand::Unset { project, names } => {
            let p = ctx.project(&project).await?;
            let answer = ctx
                .api
                .patch(
                    &format!("/v1/projects/{}", id_of(&p)?),
                    &json!({ "env_unset": names }),
                )
                .await?;
            if ctx.json {
                output::json(&json!({"env_names": answer["env_names"]}));
            } else {
                eprintln!(
                    "Removed {} from {} (the next deploy writes the change to the servers).",
                    names.join(", "),
                    output::text(&answer["name"])
                );
            }
        }
    }
    Ok(())
}

/// The value from the file or standard input, bounded; one trailing line end is dropped (what
/// `echo value |` adds), nothing else.
fn read_value(file: Option<&std::path::Path>) -> Result<String> {
    let mut raw = Vec::new();
    let read = match file {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ENV_VALUE + 1).read_to_end(&mut raw))
            .map_err(|e| CliError::local(format!("{}: {e}", path.display()))),
        // Typed at a terminal: asked without echo, like a password (one line).
        None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            raw = dialoguer::Password::new()
                .with_prompt("Value (not shown)")
                .allow_empty_password(true)
                .interact()
                .map_err(|e| CliError::local(format!("prompt: {e}")))?
                .into_bytes();
            Ok(raw.len())
        }
        None => std::io::stdin()
            .take(MAX_ENV_VALUE + 1)
            .read_to_end(&mut raw)
            .map_err(|e| CliError::local(format!("reading standard input: {e}"))),
    };
    read?;
    if raw.len() as u64 > MAX_ENV_VALUE {
        return Err(CliError::usage("the value is larger than 64 KiB"));
    }
    let mut value =
        String::from_utf8(raw).map_err(|_| CliError::usage("the value is not UTF-8 text"))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}
