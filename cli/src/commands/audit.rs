//! `sensei audit`: the account's audit log, newest first.

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use super::Ctx;
use crate::client::encode;
use crate::error::{CliError, Result};
use crate::output;

/// `--since`: an RFC 3339 time, or a span back from now (`90m`, `2h`, `7d`).
fn since(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    // The unit is the last character, whatever its width (`7д` must not split a character).
    let cut = raw.char_indices().last().map(|(i, _)| i).unwrap_or(0);
    let (number, unit) = raw.split_at(cut);
    let n: i64 = number
        .parse()
        .ok()
        .filter(|n| *n >= 0 && *n <= 100_000)
        .ok_or_else(|| bad_since(raw))?;
    let span = match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return Err(bad_since(raw)),
    };
    Ok(now - span)
}

fn bad_since(raw: &str) -> CliError {
    CliError::usage(format!(
        "--since {raw}: give a time (2026-12-01T09:00:00Z) or a span back (30m, 2h, 7d)"
    ))
}

pub async fn run(
    ctx: &Ctx,
    since_arg: Option<&str>,
    action: Option<&str>,
    limit: u16,
) -> Result<()> {
    let mut path = format!("/v1/audit?limit={limit}");
    if let Some(s) = since_arg {
        let t = since(s, Utc::now())?;
        path.push_str(&format!("&since={}", encode(&t.to_rfc3339())));
    }
    if let Some(a) = action {
        path.push_str(&format!("&action={}", encode(a)));
    }
    let page = ctx.api.get(&path).await?;
    if ctx.json {
        output::json(&page);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e: &Value| {
            let actor = match &e["actor"]["email"] {
                Value::Null => output::text(&e["actor"]["type"]),
                email => output::text(email),
            };
            let resource = match &e["resource"]["id"] {
                Value::Null => output::text(&e["resource"]["type"]),
                id => format!(
                    "{} {}",
                    output::text(&e["resource"]["type"]),
                    output::text(id)
                ),
            };
            vec![
                output::time(&e["timestamp"]),
                output::text(&e["event"]),
                actor,
                output::text(&e["actor"]["ip"]),
                resource,
                output::text(&e["result"]),
            ]
        })
        .collect();
    output::table(
        &["TIME", "EVENT", "ACTOR", "IP", "RESOURCE", "RESULT"],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_span_back() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            since("2h", now).expect("ok").to_rfc3339(),
            "2026-12-02T10:00:00+00:00"
        );
        assert_eq!(
            since("7d", now).expect("ok").to_rfc3339(),
            "2026-11-25T12:00:00+00:00"
        );
        assert_eq!(
            since("2026-12-01T09:00:00Z", now).expect("ok").to_rfc3339(),
            "2026-12-01T09:00:00+00:00"
        );
        for bad in ["", "h", "2w", "-1h", "yesterday", "7д"] {
            assert!(since(bad, now).is_err(), "{bad}");
        }
    }
}
