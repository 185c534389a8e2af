//! Issue 22, item 6: `grace-ctl`, the built binary, against real servers: one built with
//! grace in this test process (any application's), and a running `grace-demo`.

use std::future::IntoFuture;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CTL: &str = env!("CARGO_BIN_EXE_grace-ctl");

/// Never flakes on a loaded machine, still catches a hang.
const PATIENCE: Duration = Duration::from_secs(30);

/// A scratch directory, removed afterwards (kept after a failure).
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("grace-ctl-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `grace-ctl --socket SOCKET ARGS…`, which must end within `PATIENCE`.
fn ctl(socket: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(CTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grace-ctl");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("grace-ctl {args:?} got no answer within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A GET on a keep-alive connection, left open (idle) for the status to count.
fn idle_connection(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    conn
}

/// Any application that turns the control socket on gets `grace-ctl`: its status (text and
/// JSON, `--json` before or after the command), an upgrade that cannot happen (restarts
/// not enabled: exit 1 and why), a drain; and a socket with no server behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_ctl_answers_for_any_grace_server() {
    let dir = Dir::new("app");
    let socket = dir.0.join("control.sock");
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let server = grace_http::Server::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addrs()[0].to_string().parse().unwrap();
    let serve = server.serve(app).try_with_control(&socket).unwrap();
    let served = tokio::spawn(serve.into_future());
    let _idle = idle_connection(addr);

    let socket2 = socket.clone();
    let (text, json, json_after, upgrade, upgrade_json) = tokio::task::spawn_blocking(move || {
        (
            ctl(&socket2, &["status"]),
            ctl(&socket2, &["--json", "status"]),
            ctl(&socket2, &["status", "--json"]),
            ctl(&socket2, &["upgrade"]),
            ctl(&socket2, &["upgrade", "--json"]),
        )
    })
    .await
    .unwrap();
    let me = std::process::id();
    assert!(text.status.success(), "{text:?}");
    assert_eq!(
        stdout(&text),
        format!(
            "pid {me}\ngeneration 1\nphase serving\nconnections 1 (new 0, active 0, idle 1, hijacked 0)\n\
             handed over: received 0 from the previous generation, sent 0 to the next\nlast upgrade none\n"
        )
    );
    for out in [&json, &json_after] {
        assert!(out.status.success(), "{out:?}");
        let status: grace_http::control::Status = serde_json::from_str(&stdout(out)).unwrap();
        assert_eq!((status.pid, status.generation), (me, 1));
        assert_eq!(status.phase, grace_http::control::ServerPhase::Serving);
        assert_eq!((status.counts.idle, status.connections), (1, 1));
    }
    assert_eq!(upgrade.status.code(), Some(1), "{upgrade:?}");
    assert_eq!(stdout(&upgrade), "");
    assert_eq!(
        stderr(&upgrade),
        "failed: restarts are not enabled (see Serve::with_restart)\n"
    );
    assert_eq!(upgrade_json.status.code(), Some(1), "{upgrade_json:?}");
    assert_eq!(
        stdout(&upgrade_json),
        "{\"ok\":false,\"kind\":\"not_enabled\",\"error\":\"restarts are not enabled (see Serve::with_restart)\"}\n"
    );

    // Drain: the server stops, its socket goes; then nobody answers there.
    let socket2 = socket.clone();
    let drain = tokio::task::spawn_blocking(move || ctl(&socket2, &["drain"]))
        .await
        .unwrap();
    assert!(drain.status.success(), "{drain:?}");
    assert_eq!(stdout(&drain), "draining\n");
    let report = tokio::time::timeout(PATIENCE, served).await.unwrap();
    assert_eq!(
        report.unwrap().unwrap().trigger,
        grace_http::Trigger::Handle
    );
    let gone = tokio::task::spawn_blocking(move || ctl(&socket, &["status"]))
        .await
        .unwrap();
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(
        stderr(&gone).starts_with("error: cannot reach the control socket"),
        "{gone:?}"
    );
}

/// The `grace-demo` binary of this build, next to `grace-ctl` (cargo builds it for the
/// workspace's tests: `cargo test --workspace`, or `cargo build -p grace-demo`).
fn demo_binary() -> Option<PathBuf> {
    let path = Path::new(CTL).with_file_name(format!("grace-demo{}", std::env::consts::EXE_SUFFIX));
    path.exists().then_some(path)
}

/// Kills the process if the test fails before it stopped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Issue 22's proof: `grace-ctl --socket S status` answers for a running grace-demo (and
/// `drain` stops it).
#[test]
fn grace_ctl_answers_for_a_running_grace_demo() {
    let Some(demo) = demo_binary() else {
        println!(
            "skipped: no grace-demo binary next to {CTL} (`cargo build -p grace-demo`, or run \
             `cargo test --workspace`)"
        );
        return;
    };
    let dir = Dir::new("demo");
    let socket = dir.0.join("control.sock");
    let mut child = Killed(
        Command::new(&demo)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--db",
                "sqlite://ledger.db?mode=rwc",
            ])
            .arg("--control-socket")
            .arg(&socket)
            .current_dir(&dir.0)
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        panic!("grace-demo did not start: {line:?}");
    };
    let _idle = idle_connection(addr.parse().unwrap());

    let status = ctl(&socket, &["status"]);
    let text = stdout(&status);
    assert!(status.status.success(), "{status:?}");
    assert!(
        text.starts_with(&format!(
            "pid {}\ngeneration 1\nphase serving\n",
            child.id()
        )),
        "{text}"
    );
    assert!(text.contains("idle 1"), "{text}");
    let json = ctl(&socket, &["status", "--json"]);
    let status: grace_http::control::Status = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(status.pid, child.id());

    let drain = ctl(&socket, &["drain"]);
    assert!(drain.status.success(), "{drain:?}");
    let t = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if t.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("grace-demo did not stop within {PATIENCE:?} of the drain");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0));
    assert!(!socket.exists(), "the control socket outlived the demo");
}
