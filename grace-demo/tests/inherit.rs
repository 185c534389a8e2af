//! Issue 22, item 5: sockets inherited the `systemfd --no-pid` way (a listening socket at
//! fd 3, `LISTEN_FDS=1`, no `LISTEN_PID`) are served; a descriptor at 3 that is not a
//! listening socket is refused with a clear error and exit code 1, never an abort.
//!
//! The shell lays the descriptors out (`exec 3<&0` copies stdin, which the test sets to the
//! socket), then execs the demo, so no `unsafe` is needed here.

use std::os::fd::OwnedFd;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

mod common;

use common::{BIN, Http, PATIENCE, TempDir};

/// Every variable of the inheritance protocols, none of which the demo must see from the
/// test's own environment.
const VARS: [&str; 9] = [
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "GRACE_LISTEN_PPID",
    "GRACE_READY_FD",
    "GRACE_HANDOVER_FD",
    "GRACE_CONTROL_FD",
    "GRACE_SOCKET_FILES",
    "GRACE_GENERATION",
];

/// `grace-demo --listen LISTEN` started by `sh -c SETUP; exec grace-demo …` in `dir`, with
/// `stdin` as its standard input (for SETUP to move to fd 3) and `LISTEN_FDS=1`.
fn demo(dir: &TempDir, setup: &str, stdin: Stdio, listen: &str) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{setup}; exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(["--listen", listen, "--db", "sqlite://ledger.db?mode=rwc"])
        .current_dir(&dir.0);
    for var in VARS {
        cmd.env_remove(var);
    }
    cmd.env("LISTEN_FDS", "1")
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh")
}

/// Issue 22, item 5: the systemfd way. `--listen` names the very address of the inherited
/// socket, as `cargo watch -x run` would keep running the same command: binding it instead
/// of adopting the socket fails with `EADDRINUSE`.
#[tokio::test]
async fn started_the_systemfd_way_it_serves_on_the_inherited_socket() {
    let dir = TempDir::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stdin = Stdio::from(OwnedFd::from(listener));
    let setup = "exec 3<&0 0</dev/null";
    let mut child = demo(&dir, setup, stdin, &addr.to_string());
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let read = tokio::time::timeout(PATIENCE, stdout.read_line(&mut line)).await;
    if line.trim() != format!("listening on {addr}") {
        let _ = child.kill().await;
        panic!("{read:?} {line:?}\n{}", log.await.unwrap());
    }
    for _ in 0..3 {
        let mut http = Http::connect(addr).await.unwrap();
        let answer = http.request("GET", "/", None).await.unwrap();
        assert_eq!(answer.status, 200);
    }
    common::signal(child.id().unwrap(), rustix::process::Signal::TERM);
    let status = tokio::time::timeout(PATIENCE, child.wait()).await;
    let log = log.await.unwrap();
    assert_eq!(status.unwrap().unwrap().code(), Some(0), "{log}");
    assert!(
        log.contains(&format!(
            "adopted inherited listener fd=3 name=grace addr={addr}"
        )),
        "{log}"
    );
}

/// Runs the demo with `setup` laying out fd 3 (and `LISTEN_PID` set to its pid if
/// `listen_pid`) until it exits, which it must, within `PATIENCE`: its exit code (`None`:
/// killed by a signal, an abort) and stderr.
async fn refused(setup: &str, stdin: Stdio, listen_pid: bool) -> (Option<i32>, String) {
    let dir = TempDir::new();
    let setup = match listen_pid {
        true => format!("{setup}; export LISTEN_PID=$$"),
        false => setup.to_owned(),
    };
    let child = demo(&dir, &setup, stdin, "127.0.0.1:0");
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output()).await;
    let out = out.expect("the demo did not exit").expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening on"), "it served: {stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// Issue 22, item 5: whatever sits at fd 3 — a file, a connected socket, or nothing passed
/// at all (so that the number is the demo's own, its runtime's) — the demo says what it is
/// and exits 1. Before, the last case closed the runtime's descriptor and aborted
/// (`IO Safety violation: owned file descriptor already closed`), and without `LISTEN_PID`
/// every case was ignored (the demo bound `--listen` and served).
#[tokio::test]
async fn a_descriptor_that_is_not_a_listening_socket_is_refused_with_exit_1_never_an_abort() {
    let dir = TempDir::new();
    let file = dir.path("not-a-socket");
    std::fs::write(&file, "data\n").unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for listen_pid in [false, true] {
        let cases = [
            (
                format!("exec 3<'{}'", file.display()),
                Stdio::null(),
                "it is a regular file, not a socket",
            ),
            (
                "exec 3<&0 0</dev/null".to_owned(),
                Stdio::from(OwnedFd::from(
                    std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap(),
                )),
                "it is a socket that does not listen",
            ),
            (
                "exec 3<&-".to_owned(),
                Stdio::null(),
                "it was opened by this process (it is close-on-exec), not passed to it",
            ),
        ];
        for (setup, stdin, why) in cases {
            let (code, stderr) = refused(&setup, stdin, listen_pid).await;
            let case = format!("{setup} (LISTEN_PID: {listen_pid})");
            assert_eq!(code, Some(1), "{case}: {stderr}");
            assert!(!stderr.contains("fatal runtime error"), "{case}: {stderr}");
            let said = format!(
                "cannot adopt inherited descriptor 3 (listener \"grace\" of LISTEN_FDS): {why}"
            );
            assert!(stderr.contains(&said), "{case}: {stderr}");
        }
    }
    drop(server);
    // Not meant for it: LISTEN_PID names another process (this one). Ignored: it binds
    // `--listen` and serves.
    let mut child = {
        let mut cmd = tokio::process::Command::new(BIN);
        for var in VARS {
            cmd.env_remove(var);
        }
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            "sqlite://ledger.db?mode=rwc",
        ])
        .current_dir(&dir.0)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
    };
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let _ = tokio::time::timeout(PATIENCE, stdout.read_line(&mut line)).await;
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line:?}");
    common::signal(child.id().unwrap(), rustix::process::Signal::TERM);
    let status = tokio::time::timeout(PATIENCE, child.wait()).await;
    assert_eq!(status.unwrap().unwrap().code(), Some(0));
}
