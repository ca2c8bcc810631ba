//! How the control plane and the agent write their logs: one setup for both binaries, so a
//! fleet's logs read the same whichever side wrote them.

use std::io::IsTerminal;
use std::str::FromStr;

/// `--log-format`: text for people, JSON lines for a log pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Logs to standard error at the level `SENSEI_LOG` asks (info by default). tokio-postgres
/// logs statement parameters at debug level, and parameters carry password hashes and sealed
/// secrets, so its chatter stops at warnings whatever `SENSEI_LOG` says.
pub fn init(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("SENSEI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Ok(cap) = "tokio_postgres=warn".parse() {
        filter = filter.add_directive(cap);
    }
    // Colours only for a person at a terminal: escape codes in a log file or a journal get in
    // the way of every grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_strictly() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("JSON ".parse::<LogFormat>().is_err());
    }
}
