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

/// Runs `cmd` to its end, which must come within `limit` (else the test fails with
/// `what`, and the child's stderr).
fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grace-demo");
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `ctl` with a bound: a socket nobody answers on must fail the test, not hang it.
fn ctl_within(socket: &Path, args: &[&str], limit: Duration) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["ctl", "--socket"]).arg(socket).args(args);
    output_within(&mut cmd, limit, &format!("ctl {args:?} got no answer"))
}

/// Runs the demo with `args` in `dir` until it exits (it must, within `PATIENCE`): its exit
/// code and stderr.
fn refused(dir: &TempDir, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&dir.0)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            "sqlite://refused.db?mode=rwc",
        ])
        .args(args);
    let out = output_within(&mut cmd, common::PATIENCE, "the demo did not exit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("listening on"),
        "said it listens: {stdout}"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 20, item 3: the control path is treated as a Unix listener's is: a stale socket is
/// replaced; a regular file, a link or a live socket (another instance's) is refused with
/// the path named, left as it is, and the first instance keeps its control socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_path_is_never_taken_from_a_file_a_link_or_a_live_socket() {
    let dir = TempDir::new();
    let socket = dir.path("control.sock");

    // A regular file: refused, its content kept.
    std::fs::write(&socket, "someone's data\n").unwrap();
    let path = socket.to_str().unwrap();
    let (code, stderr) = refused(&dir, &["--control-socket", path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(path), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&socket).unwrap(),
        "someone's data\n"
    );
    std::fs::remove_file(&socket).unwrap();

    // A symbolic link (to a file): refused, the link and its target kept.
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, &socket).unwrap();
    let (code, stderr) = refused(&dir, &["--control-socket", path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert!(std::fs::symlink_metadata(&socket).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    std::fs::remove_file(&socket).unwrap();

    // A stale socket (its process died): replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let args: Vec<String> = [
        "--control-socket",
        path,
        "--db",
        "sqlite://first.db?mode=rwc",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let first = Demo::start(&dir, &args).await;
    let status = json(&ctl_within(&socket, &["--json", "status"], SOON));
    assert_eq!(status["pid"], first.pid);

    // A second instance at the same path: refused, the first still answers there.
    let (code, stderr) = refused(&dir, &["--control-socket", path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(path) && stderr.contains("in use"),
        "{stderr}"
    );
    for _ in 0..3 {
        let status = json(&ctl_within(&socket, &["--json", "status"], SOON));
        assert_eq!(status["pid"], first.pid, "another process answered");
    }
    let out = ctl_within(&socket, &["drain"], SOON);
    assert!(out.status.success(), "{out:?}");
    let exit = first.wait_exit(common::PATIENCE).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(!socket.exists(), "the control socket outlived the service");
}

/// Issue 20, item 3: an upgrade that fails changes nothing about the control socket, one
/// that succeeds hands it over: the new process exits at start (after it would have bound
/// the socket), or dies right after it reported ready, and `ctl status` still reaches the
/// old process; after a good upgrade it reaches the new one at once, and the socket file
/// stays when the old one exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_control_socket_with_the_old_generation() {
    subreaper();
    let dir = TempDir::new();
    let socket = dir.path("control.sock");
    let pid_file = dir.path("demo.pid");
    let program = dir.path("grace-demo");
    install(&program, None);
    let args: Vec<String> = [
        "--control-socket",
        socket.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--ready-timeout",
        "10s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let demo = Demo::start_with(tokio::process::Command::new(&program), &dir, &args).await;
    let first = demo.pid;
    let status = |expected: u32, why: &str| {
        let out = ctl_within(&socket, &["--json", "status"], SOON);
        assert!(out.status.success(), "{why}: {out:?}\n{}", demo.stderr());
        let status = json(&out);
        assert_eq!(status["pid"], expected, "{why}: {status}");
    };

    // Serving (its control socket answers only from then on, after the pid file is written).
    status(first, "at start");
    // The new process exits at start, once it has set up everything but its pid file (a
    // directory now: it cannot replace it).
    std::fs::remove_file(&pid_file).unwrap();
    std::fs::create_dir(&pid_file).unwrap();
    let out = ctl_within(&socket, &["upgrade"], common::PATIENCE);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    status(first, "after a new process that exited at start");
    std::fs::remove_dir(&pid_file).unwrap();

    // A good upgrade (a request in flight holds its hand-over open a while): the new process
    // answers as soon as `ctl upgrade` says it succeeded.
    let mut busy = Http::connect(demo.addr).await.unwrap();
    busy.send("GET", "/sleep/1000", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = ctl_within(&socket, &["upgrade"], common::PATIENCE);
    assert!(out.status.success(), "{out:?}");
    let second: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    for _ in 0..5 {
        status(second, "right after a good upgrade");
    }
    assert_eq!(busy.read().await.unwrap().status, 200);
    assert_eq!(
        wait_gone(first, common::PATIENCE),
        common::Gone::Exited(Some(0))
    );
    assert!(
        socket.exists(),
        "the old generation removed the new one's socket"
    );
    status(second, "after the old one exited");

    // The next new process dies during the hand-over (held open by a request in flight),
    // right after its pid file names it: `ctl upgrade` says the upgrade failed, and the old
    // process (serving on, its request answered) still answers control requests.
    let mut busy = Http::connect(demo.addr).await.unwrap();
    busy.send("GET", "/sleep/3000", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upgrade = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || ctl_within(&socket, &["upgrade"], common::PATIENCE))
    };
    let t = std::time::Instant::now();
    let third = loop {
        let named = std::fs::read_to_string(&pid_file).ok();
        if let Some(p) = named
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&p| p != second)
        {
            break p;
        }
        assert!(
            t.elapsed() < common::PATIENCE,
            "no new process named in the pid file"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    common::signal(third, rustix::process::Signal::KILL);
    let out = upgrade.await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // (Killed at once, it may go before its ready message is read: "before it was ready".)
    assert!(said.contains("killed by signal 9"), "{said}");
    status(second, "after the new process died during the hand-over");
    assert_eq!(busy.read().await.unwrap().status, 200);
    assert!(alive(second));
    // Stop what is left: the socket file goes with the last generation.
    let _ = ctl_within(&socket, &["drain"], SOON);
    assert_eq!(
        wait_gone(second, common::PATIENCE),
        common::Gone::Exited(Some(0))
    );
    assert!(!socket.exists(), "the control socket outlived the service");
}
