//! One file per group of commands. Each command is a client of the public API only.

pub mod audit;
pub mod auth;
pub mod deploy;
pub mod projects;
pub mod rollout;
pub mod servers;

use serde_json::Value;

use crate::client::{encode, Api};
use crate::error::{CliError, Result};

/// What every command has: the API client and how to print.
pub struct Ctx {
    pub api: Api,
    pub json: bool,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Project,
    Server,
}

/// Whether `s` is a UUID (an id given instead of a name).
fn is_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

impl Ctx {
    /// A project by id or by its exact name.
    pub async fn project(&self, name_or_id: &str) -> Result<Value> {
        if is_id(name_or_id) {
            return self.api.get(&format!("/v1/projects/{name_or_id}")).await;
        }
        let all = self.api.list_all("/v1/projects", "", "projects").await?;
        one_named(all, name_or_id, "project", "sensei projects list")
    }

    /// A server by id or by its exact name.
    pub async fn server(&self, name_or_id: &str) -> Result<Value> {
        if is_id(name_or_id) {
            return self.api.get(&format!("/v1/servers/{name_or_id}")).await;
        }
        let all = self.api.list_all("/v1/servers", "", "servers").await?;
        one_named(all, name_or_id, "server", "sensei servers list")
    }

    /// `{"id", "name"}` of a project or server: an id is taken as it is (a CI key need not
    /// be allowed to read projects and servers), a name is looked up.
    pub async fn reference(&self, name_or_id: &str, kind: Kind) -> Result<Value> {
        if is_id(name_or_id) {
            return Ok(serde_json::json!({"id": name_or_id, "name": name_or_id}));
        }
        match kind {
            Kind::Project => self.project(name_or_id).await,
            Kind::Server => self.server(name_or_id).await,
        }
    }

    /// Every server carrying all of `labels` (`key=value`).
    pub async fn servers_labelled(&self, labels: &[String]) -> Result<Vec<Value>> {
        let query = label_query(labels)?;
        self.api.list_all("/v1/servers", &query, "servers").await
    }
}

fn one_named(all: Vec<Value>, name: &str, what: &str, list: &str) -> Result<Value> {
    let mut matching: Vec<Value> = all.into_iter().filter(|v| v["name"] == name).collect();
    match matching.len() {
        0 => Err(CliError::Api {
            status: 404,
            code: "not_found".into(),
            message: format!("no {what} is named {name:?} (`{list}` shows them)"),
        }),
        1 => Ok(matching.remove(0)),
        n => Err(CliError::usage(format!(
            "{n} {what}s are named {name:?}: give the id instead (`{list}`)"
        ))),
    }
}

/// `label=k%3Dv&label=…` for the server list's label filter.
pub fn label_query(labels: &[String]) -> Result<String> {
    labels
        .iter()
        .map(|l| {
            if l.split_once('=').is_some_and(|(k, _)| !k.is_empty()) {
                Ok(format!("label={}", encode(l)))
            } else {
                Err(CliError::usage(format!(
                    "--label {l:?}: write it KEY=VALUE"
                )))
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.join("&"))
}

/// Labels as the API's object.
pub fn labels_object(labels: &[String]) -> Result<Value> {
    let mut map = serde_json::Map::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CliError::usage(format!("--label {l:?}: write it KEY=VALUE")))?;
        map.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(Value::Object(map))
}

/// The id field of an API object.
pub fn id_of(v: &Value) -> Result<String> {
    v["id"].as_str().map(str::to_owned).ok_or_else(|| {
        CliError::Unreachable("the control plane answered an object without an id".into())
    })
}

/// Asks a yes/no question on the terminal; refuses (with the flag to use) when there is none.
pub fn confirm(question: &str, flag: &str) -> Result<bool> {
    if !crate::output::interactive() {
        return Err(CliError::usage(format!(
            "not a terminal: pass {flag} to do this without being asked"
        )));
    }
    dialoguer::Confirm::new()
        .with_prompt(question)
        .default(false)
        .interact()
        .map_err(|e| CliError::local(format!("prompt: {e}")))
}
