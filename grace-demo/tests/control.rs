//! Issue 12: the control socket and `grace-demo ctl`, on real processes: status matches the
//! live counts, `ctl upgrade` says whether the upgrade worked (exit 0 and the new PID, or
//! non-zero and why it rolled back), `ctl drain` stops; the socket is owner-only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{Demo, Http, SOON, TempDir, alive, subreaper, wait_gone};

const BIN: &str = env!("CARGO_BIN_EXE_grace-demo");

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run grace-demo ctl")
}

fn json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// Replaces the program at `path` (what the next upgrade starts).
fn install(path: &Path, contents: Option<&str>) {
    let tmp = path.with_extension("new");
    match contents {
        Some(script) => std::fs::write(&tmp, script).unwrap(),
        None => {
            std::fs::copy(BIN, &tmp).unwrap();
        }
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn ctl_reports_status_upgrades_with_an_outcome_and_drains() {
    subreaper();
    let dir = TempDir::new();
    let socket = dir.path("control.sock");
    let program = dir.path("grace-demo");
    install(&program, None);
    let args: Vec<String> = [
        "--control-socket",
        socket.to_str().unwrap(),
        "--pid-file",
        dir.path("demo.pid").to_str().unwrap(),
        "--ready-timeout",
        "3s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let demo = Demo::start_with(tokio::process::Command::new(&program), &dir, &args).await;
    let first = demo.pid;

    // Owner-only, and refused to another user.
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    let as_nobody = Command::new("runuser")
        .args(["-u", "nobody", "--", BIN, "ctl", "--socket"])
        .arg(&socket)
        .arg("status")
        .output();
    if let Ok(out) = as_nobody {
        assert_ne!(
            out.status.code(),
            Some(0),
            "another user used the control socket"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ermission"),
            "{out:?}"
        );
    }

    // Status matches the live connections.
    let mut idle = Http::connect(demo.addr).await.unwrap();
    assert_eq!(idle.request("GET", "/", None).await.unwrap().status, 200);
    let mut busy = Http::connect(demo.addr).await.unwrap();
    busy.send("GET", "/sleep/3000", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = ctl(&socket, &["--json", "status"]);
    assert!(out.status.success(), "{out:?}");
    let status = json(&out);
    assert_eq!(status["pid"], first);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["phase"], "serving");
    assert_eq!(status["counts"]["idle"], 1, "{status}");
    assert_eq!(status["counts"]["active"], 1, "{status}");
    assert_eq!(status["last_upgrade"], Value::Null);
    let text = String::from_utf8_lossy(&ctl(&socket, &["status"]).stdout).into_owned();
    assert!(text.contains(&format!("pid {first}")), "{text}");
    assert!(text.contains("generation 1"), "{text}");

    // A new binary that exits: ctl upgrade fails with the reason, the old one still serves.
    install(&program, Some("#!/bin/sh\nexit 1\n"));
    let out = ctl(&socket, &["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exited with status 1"), "{stderr}");
    // One that never gets ready: killed at --ready-timeout, the reason says so.
    install(&program, Some("#!/bin/sh\nexec sleep 60\n"));
    let out = ctl(&socket, &["--json", "upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["kind"], "not_ready", "{out:?}");
    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(status["pid"], first);
    assert_eq!(status["last_upgrade"]["ok"], false, "{status}");

    // A good binary: exit 0 and the new PID, which now answers on the same socket path.
    install(&program, None);
    let out = ctl(&socket, &["upgrade"]);
    assert!(out.status.success(), "{out:?}");
    let new: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_ne!(new, first);
    assert_eq!(
        busy.read().await.unwrap().status,
        200,
        "the busy request was cut"
    );
    assert_eq!(wait_gone(first, SOON), common::Gone::Exited(Some(0)));
    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(
        (status["pid"].as_u64(), status["generation"].as_u64()),
        (Some(new as u64), Some(2))
    );
    // Both connections went to it: the idle one at once, the busy one after its answer.
    let text = String::from_utf8_lossy(&ctl(&socket, &["status"]).stdout).into_owned();
    assert!(
        text.contains("handed over: received 2 from the previous generation, sent 0 to the next"),
        "{text}"
    );

    // Drain through the socket: the service stops, the socket file goes.
    let out = ctl(&socket, &["drain"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(wait_gone(new, SOON), common::Gone::Exited(Some(0)));
    assert!(!alive(new));
    assert!(!socket.exists(), "the control socket outlived the service");
}
