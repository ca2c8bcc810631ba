//! `sensei servers …`

use serde_json::{json, Value};

use super::{confirm, id_of, labels_object, Ctx};
use crate::args::{AddServerArgs, ServersCommand};
use crate::error::Result;
use crate::output;

pub async fn run(ctx: &Ctx, command: ServersCommand) -> Result<()> {
    match command {
        ServersCommand::List { label } => {
            let servers = if label.is_empty() {
                ctx.api.list_all("/v1/servers", "", "servers").await?
            } else {
                ctx.servers_labelled(&label).await?
            };
            if ctx.json {
                output::json(&json!({ "servers": servers }));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = servers.iter().map(row).collect();
            output::table(
                &["NAME", "TRANSPORT", "HOST", "STATE", "LABELS", "ID"],
                &rows,
            );
        }
        ServersCommand::Show { server } => {
            let s = ctx.server(&server).await?;
            if ctx.json {
                output::json(&s);
                return Ok(());
            }
            show(&s);
        }
        ServersCommand::Add(args) => add(ctx, args).await?,
        ServersCommand::Remove { server, yes } => {
            let s = ctx.server(&server).await?;
            let name = output::text(&s["name"]);
            if !yes && !confirm(&format!("Delete server {name}?"), "--yes")? {
                return Ok(());
            }
            ctx.api
                .delete(&format!("/v1/servers/{}", id_of(&s)?))
                .await?;
            eprintln!("Deleted server {name}.");
        }
        ServersCommand::Revoke { server, yes } => {
            let s = ctx.server(&server).await?;
            let name = output::text(&s["name"]);
            if !yes
                && !confirm(
                    &format!("Revoke {name}'s agent certificate? Its agent is cut off at once."),
                    "--yes",
                )?
            {
                return Ok(());
            }
            let answer = ctx
                .api
                .delete(&format!("/v1/servers/{}/agent-certificate", id_of(&s)?))
                .await?;
            if ctx.json {
                output::json(&answer);
            } else {
                eprintln!(
                    "Revoked {name}'s agent certificate: it is disconnected and gets no job. \
                     `sensei servers enroll {name}` makes a new enrollment command."
                );
            }
        }
        ServersCommand::Enroll { server } => {
            let s = ctx.server(&server).await?;
            let answer = ctx
                .api
                .post(
                    &format!("/v1/servers/{}/enrollment-token", id_of(&s)?),
                    &json!({}),
                )
                .await?;
            if ctx.json {
                output::json(&answer);
            } else {
                print_enrollment(&answer);
            }
        }
    }
    Ok(())
}

fn state(s: &Value) -> String {
    if s["transport"] == "ssh" {
        return "ssh".into();
    }
    let agent = &s["agent"];
    if agent["connected"] == true {
        "connected".into()
    } else if agent["certificate_fingerprint"].is_null() {
        "not enrolled".into()
    } else {
        "offline".into()
    }
}

fn row(s: &Value) -> Vec<String> {
    vec![
        output::text(&s["name"]),
        output::text(&s["transport"]),
        output::text(&s["host"]),
        state(s),
        output::labels(&s["labels"]),
        output::text(&s["id"]),
    ]
}

fn show(s: &Value) {
    let agent = &s["agent"];
    let mut lines = vec![
        ("name", output::text(&s["name"])),
        ("id", output::text(&s["id"])),
        ("transport", output::text(&s["transport"])),
        ("host", output::text(&s["host"])),
        ("labels", output::labels(&s["labels"])),
        ("state", state(s)),
        ("created", output::time(&s["created_at"])),
    ];
    if s["transport"] == "agent" {
        lines.extend([
            ("agent version", output::text(&agent["version"])),
            ("os", output::text(&agent["os"])),
            ("arch", output::text(&agent["arch"])),
            ("last seen", output::time(&agent["last_seen_at"])),
            (
                "certificate",
                output::text(&agent["certificate_fingerprint"]),
            ),
            ("expires", output::time(&agent["expires_at"])),
        ]);
    } else {
        lines.extend([
            ("port", output::text(&s["port"])),
            ("user", output::text(&s["username"])),
            ("auth", output::text(&s["auth"])),
            ("key", output::text(&s["fingerprint"])),
        ]);
    }
    for (k, v) in lines {
        println!("{:<14} {v}", format!("{k}:"));
    }
}

async fn add(ctx: &Ctx, args: AddServerArgs) -> Result<()> {
    let labels = labels_object(&args.label)?;
    let body = match &args.ssh {
        Some(host) => {
            let mut body = json!({"name": args.name, "host": host, "transport": "ssh",
                                  "username": args.user, "auth": "key", "labels": labels});
            if let Some(port) = args.port {
                body["port"] = json!(port);
            }
            if let Some(key) = &args.host_key {
                body["host_key"] = json!(key);
            }
            body
        }
        None => json!({"name": args.name, "host": args.host.as_deref().unwrap_or(&args.name),
                       "transport": "agent", "labels": labels}),
    };
    let created = ctx.api.post("/v1/servers", &body).await?;
    if ctx.json {
        output::json(&created);
        return Ok(());
    }
    eprintln!(
        "Added server {} ({}).",
        args.name,
        output::text(&created["id"])
    );
    if args.ssh.is_some() {
        eprintln!(
            "Install this public key for {} on {} (in ~/.ssh/authorized_keys):\n",
            args.user,
            args.ssh.as_deref().unwrap_or_default()
        );
        println!("{}", output::text(&created["public_key"]));
        eprintln!(
            "\nIts fingerprint: {}",
            output::text(&created["fingerprint"])
        );
    } else {
        print_enrollment(&created);
    }
    Ok(())
}

fn print_enrollment(answer: &Value) {
    eprintln!(
        "Run this on the server (the token works once, until {}):\n",
        output::time(&answer["enrollment_expires_at"])
    );
    println!("sudo {}", output::text(&answer["enroll_command"]));
}
