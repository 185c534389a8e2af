//! `grace-demo ctl`: asks a running grace-demo, through its control socket
//! (`--control-socket`), for its status, an upgrade, or a drain.
//!
//! `upgrade` waits for the outcome and exits 0 printing the new PID, or 1 printing why the
//! upgrade rolled back — so `ExecReload=grace-demo ctl --socket … upgrade` makes
//! `systemctl reload` fail when the upgrade fails.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

/// What to ask.
#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum Action {
    /// Generation, PID, phase, connections per state, connections handed over at upgrades,
    /// the last upgrade's outcome.
    Status,
    /// Upgrade with zero downtime and wait for the outcome.
    Upgrade,
    /// Drain and stop (like SIGTERM).
    Drain,
}

/// `grace-demo ctl` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Ctl {
    /// The control socket of the running grace-demo (its `--control-socket`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Action,
}

/// Runs the command; returns the process exit code.
pub fn run(ctl: &Ctl) -> anyhow::Result<i32> {
    let request = match ctl.action {
        Action::Status => "status",
        Action::Upgrade => "upgrade",
        Action::Drain => "drain",
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let answer = runtime
        .block_on(grace_http::control::request(&ctl.socket, request))
        .with_context(|| format!("asking {} for {request}", ctl.socket.display()))?;
    if ctl.json {
        println!("{answer}");
    } else {
        print!("{}", text(ctl.action, &answer));
    }
    let ok = answer.get("ok").and_then(Value::as_bool).unwrap_or(true);
    Ok(if ok { 0 } else { 1 })
}

/// The answer for a person.
fn text(action: Action, a: &Value) -> String {
    let ok = a.get("ok").and_then(Value::as_bool).unwrap_or(true);
    match action {
        Action::Status => {
            let c = &a["counts"];
            let last = match &a["last_upgrade"] {
                Value::Null => "none".to_owned(),
                l if l["ok"] == true => format!("ok, pid {}", l["pid"]),
                l => format!("failed: {}", l["error"].as_str().unwrap_or("?")),
            };
            format!(
                "pid {}\ngeneration {}\nphase {}\nconnections {} (new {}, active {}, idle {}, hijacked {})\nhanded over: received {} from the previous generation, sent {} to the next\nlast upgrade {last}\n",
                a["pid"],
                a["generation"],
                a["phase"].as_str().unwrap_or("?"),
                a["connections"],
                c["new"],
                c["active"],
                c["idle"],
                c["hijacked"],
                a["handed_over"]["received"],
                a["handed_over"]["sent"],
            )
        }
        Action::Upgrade if ok => format!("{}\n", a["pid"]),
        Action::Drain if ok => "draining\n".to_owned(),
        _ => {
            let error = a["error"].as_str().unwrap_or("unknown error");
            eprintln!("failed: {error}");
            String::new()
        }
    }
}
