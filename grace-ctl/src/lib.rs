//! `grace-ctl`: asks a server built with grace, through its control socket
//! ([`grace_http::control`], turned on with `Serve::with_control`), for its status, an
//! upgrade, or a drain.
//!
//! ```text
//! grace-ctl --socket /run/app/control.sock status [--json]
//! grace-ctl --socket /run/app/control.sock upgrade   # the new pid, or exit 1 and why
//! grace-ctl --socket /run/app/control.sock drain
//! ```
//!
//! `upgrade` waits for the outcome and exits 0 printing the new PID, or 1 printing why the
//! upgrade rolled back (`failed: …` on stderr), so `ExecReload=grace-ctl --socket … upgrade`
//! makes `systemctl reload` fail when the upgrade fails. Any other failure (no server on
//! the socket, no permission) exits 1 too, with the reason on stderr.
//!
//! The command is also a library, so a program can offer it as a subcommand of its own
//! (`grace-demo ctl` does):
//!
//! ```no_run
//! #[derive(clap::Parser)]
//! enum Command {
//!     /// Ask a running instance for its status, an upgrade or a drain.
//!     Ctl(grace_ctl::Ctl),
//! }
//!
//! let Command::Ctl(ctl) = clap::Parser::parse();
//! std::process::exit(grace_ctl::run(&ctl));
//! ```

use std::io::Write;
use std::path::PathBuf;

use grace_http::control::{self, RequestError, UpgradeOutcome};

/// The exit code of a command that did what it was asked.
pub const EXIT_OK: i32 = 0;
/// The exit code of a command that did not: the upgrade rolled back, or the server could not
/// be asked.
pub const EXIT_FAILED: i32 = 1;

/// What to ask.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Generation, PID, phase, connections per state, connections handed over at upgrades,
    /// the last upgrade's outcome.
    Status,
    /// Upgrade with zero downtime and wait for the outcome: prints the new PID, or exits 1
    /// with the reason.
    Upgrade,
    /// Drain and stop (like SIGTERM).
    Drain,
}

/// The command's flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Ctl {
    /// The control socket of the running server (the path given to `Serve::with_control`;
    /// grace-demo's `--control-socket`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Print the answer as JSON, one line.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Action,
}

/// Asks, prints the answer (stdout) or what went wrong (stderr), and returns the exit code:
/// [`EXIT_OK`] or [`EXIT_FAILED`].
pub fn run(ctl: &Ctl) -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let answer = match runtime {
        Ok(runtime) => runtime.block_on(ask(ctl)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let (out, err, code) = match answer {
        Ok(said) => said,
        Err(e) => (String::new(), format!("error: {e}\n"), EXIT_FAILED),
    };
    // Whoever reads us may be gone (`grace-ctl … | head -1`): nothing to do about it.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    let _ = std::io::stderr().lock().write_all(err.as_bytes());
    code
}

/// What to print on stdout and stderr, and the exit code.
async fn ask(ctl: &Ctl) -> Result<(String, String, i32), RequestError> {
    Ok(match ctl.action {
        Action::Status => {
            let status = control::status(&ctl.socket).await?;
            let out = match ctl.json {
                true => json(&status),
                false => status.to_string(),
            };
            (out, String::new(), EXIT_OK)
        }
        Action::Upgrade => {
            let outcome = control::upgrade(&ctl.socket).await?;
            match (&outcome, ctl.json) {
                (_, true) => (json(&outcome), String::new(), exit_code(&outcome)),
                (UpgradeOutcome::Upgraded { pid }, false) => {
                    (format!("{pid}\n"), String::new(), EXIT_OK)
                }
                (UpgradeOutcome::Failed { error, .. }, false) => {
                    (String::new(), format!("failed: {error}\n"), EXIT_FAILED)
                }
            }
        }
        Action::Drain => {
            let started = control::drain(&ctl.socket).await?;
            let out = match ctl.json {
                true => json(&started),
                false => "draining\n".to_owned(),
            };
            (out, String::new(), EXIT_OK)
        }
    })
}

fn exit_code(outcome: &UpgradeOutcome) -> i32 {
    match outcome.is_ok() {
        true => EXIT_OK,
        false => EXIT_FAILED,
    }
}

/// An answer as one line of JSON.
fn json<T: serde::Serialize>(answer: &T) -> String {
    // The answers are plain data: serializing them cannot fail.
    serde_json::to_string(answer).unwrap_or_default() + "\n"
}
