//! The configuration file (`--config FILE`, TOML) and the zero-downtime restart settings.
//!
//! ```toml
//! greeting = "hello from generation 2"   # what GET / answers (default "hello")
//! shutdown_timeout = "30s"               # overrides --shutdown-timeout
//! websocket_handover = false             # this generation resumes no WebSocket (default true)
//! ```
//!
//! The file is read once, at start-up. An upgrade (SIGHUP) starts a new process that reads
//! it again; a file that does not parse (or has an unknown key) makes that new process exit
//! with status 1 before it is ready, so the old one rolls back and keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Extension;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    greeting: Option<String>,
    shutdown_timeout: Option<String>,
    websocket_handover: Option<bool>,
}

/// The settings the file gives.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What `GET /` answers.
    pub greeting: Greeting,
    /// Overrides `--shutdown-timeout` when set.
    pub shutdown_timeout: Option<Duration>,
    /// This generation resumes the WebSockets the previous one hands over (default): with
    /// `false` it resumes none, so the previous generation keeps them and says goodbye
    /// (1012) as it drains.
    pub websocket_handover: bool,
}

/// What `GET /` answers, put in the request extensions.
#[derive(Debug, Clone)]
pub struct Greeting(pub Arc<str>);

impl Default for Greeting {
    fn default() -> Self {
        Greeting("hello".into())
    }
}

/// Reads and checks the file; no file means the defaults.
pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
    let file: File = match path {
        None => File::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing the config file {}", path.display()))?
        }
    };
    let shutdown_timeout = file
        .shutdown_timeout
        .as_deref()
        .map(crate::parse_duration)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("config: shutdown_timeout")?;
    Ok(Settings {
        greeting: file
            .greeting
            .map(|g| Greeting(g.into()))
            .unwrap_or_default(),
        shutdown_timeout,
        websocket_handover: file.websocket_handover.unwrap_or(true),
    })
}

/// How this process restarts itself: on SIGHUP, into the binary at the path it was started
/// from (a replaced binary is what starts), with the same arguments.
pub fn restart(
    pid_file: Option<&PathBuf>,
    ready_timeout: Duration,
    hand_over_window: Duration,
) -> grace_http::Restart {
    let restart = grace_http::Restart::new()
        .ready_timeout(ready_timeout)
        .hand_over_window(hand_over_window);
    match pid_file {
        Some(path) => restart.pid_file(path),
        None => restart,
    }
}

/// `GET /`: the configured greeting.
pub async fn greet(greeting: Option<Extension<Greeting>>) -> String {
    greeting
        .map(|Extension(g)| g)
        .unwrap_or_default()
        .0
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> anyhow::Result<Settings> {
        let path = std::env::temp_dir().join(format!(
            "grace-demo-config-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let r = load(Some(&path));
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn defaults_and_values() {
        let s = load(None).unwrap();
        assert_eq!(&*s.greeting.0, "hello");
        assert_eq!(s.shutdown_timeout, None);
        let s = load_str("greeting = \"hi\"\nshutdown_timeout = \"1500ms\"\n").unwrap();
        assert_eq!(&*s.greeting.0, "hi");
        assert_eq!(s.shutdown_timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn broken_files_are_errors() {
        assert!(load_str("greeting = ").is_err());
        assert!(load_str("greting = \"typo\"").is_err());
        assert!(load_str("shutdown_timeout = \"soon\"").is_err());
        assert!(load(Some(Path::new("/nonexistent/grace.toml"))).is_err());
    }
}
