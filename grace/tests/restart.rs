//! `Handle::restart` in-process, with small shell scripts as the "new process": what the
//! child inherits, the readiness handshake, rollback, one restart at a time.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::Client;
use grace_http::{Restart, Server, Trigger};

const SOON: Duration = Duration::from_secs(10);

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("grace-restart-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// An executable shell script.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET /` on a fresh connection: the body.
async fn get(addr: SocketAddr) -> String {
    let answer = tokio::time::timeout(SOON, Client::connect(addr).await.get("/")).await;
    answer.expect("no answer").expect("connection closed").body
}

fn app() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "old" }))
}

/// A server on 127.0.0.1:0, and the kernel's name for its listening socket.
fn listener() -> (grace_http::Listener, SocketAddr, PathBuf) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let inode = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
    (l.try_into().unwrap(), addr, inode)
}

#[tokio::test]
async fn restart_is_refused_when_not_enabled() {
    let server = Server::bind("127.0.0.1:0").await.unwrap();
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());
    let err = handle.restart().await.unwrap_err();
    assert!(matches!(err, grace_http::RestartError::NotEnabled), "{err}");
    handle.shutdown();
    served.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_child_inherits_the_same_socket_and_takes_over_once_ready() {
    let dir = Dir::new("ok");
    let (listener, addr, socket) = listener();
    let seen = dir.0.join("seen");
    // The "new process": records what it inherited, says it is ready, then lingers a bit.
    let child = dir.script(
        "child",
        &format!(
            "{{ echo \"ppid=$PPID\"; env | grep -E '^(LISTEN_|GRACE_LISTEN|GRACE_READY)' | sort; \
             echo \"fd3=$(readlink /proc/$$/fd/3)\"; }} > {seen}.tmp && mv {seen}.tmp {seen}\n\
             echo ready >&$GRACE_READY_FD\nsleep 1",
            seen = seen.display()
        ),
    );
    let server = Server::from_listener(listener);
    let handle = server.handle();
    let serve = server
        .serve(app())
        .with_restart(Restart::new().no_signal().program(&child).args(["--x"]));
    let served = tokio::spawn(serve.into_future());
    assert_eq!(get(addr).await, "old");

    let pid = tokio::time::timeout(SOON, handle.restart())
        .await
        .unwrap()
        .unwrap();
    let report = tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::Restart);

    let seen = std::fs::read_to_string(&seen).unwrap();
    let me = std::process::id();
    let expected = format!(
        "ppid={me}\nGRACE_LISTEN_PPID={me}\nGRACE_READY_FD=4\nLISTEN_FDNAMES=grace\nLISTEN_FDS=1\nfd3={}\n",
        socket.display()
    );
    assert_eq!(seen, expected, "child {pid}");
}

#[tokio::test]
async fn a_failed_child_is_rolled_back_and_one_restart_runs_at_a_time() {
    let dir = Dir::new("fail");
    let (listener, addr, _) = listener();
    let pid_file = dir.0.join("pid");
    let hangs = dir.script("hangs", "exec sleep 30");
    let server = Server::from_listener(listener);
    let handle = server.handle();
    let serve = server.serve(app()).with_restart(
        Restart::new()
            .no_signal()
            .program(&hangs)
            .ready_timeout(Duration::from_secs(1))
            .pid_file(&pid_file),
    );
    let served = tokio::spawn(serve.into_future());
    assert_eq!(get(addr).await, "old");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", std::process::id())
    );

    // Never ready: killed at the timeout. A second request meanwhile is refused.
    let first = tokio::spawn({
        let handle = handle.clone();
        async move { handle.restart().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = handle.restart().await.unwrap_err().to_string();
    assert!(second.contains("already under way"), "{second}");
    let first = tokio::time::timeout(SOON, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        first.contains("not ready within") && first.contains("killed"),
        "{first}"
    );
    assert_eq!(get(addr).await, "old");
    handle.shutdown();
    let report = tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::Handle);
}

#[tokio::test]
async fn a_program_that_cannot_start_is_an_error() {
    let (listener, addr, _) = listener();
    let server = Server::from_listener(listener);
    let handle = server.handle();
    let serve = server.serve(app()).with_restart(
        Restart::new()
            .no_signal()
            .program(Path::new("/nonexistent/grace-child")),
    );
    let served = tokio::spawn(serve.into_future());
    let err = tokio::time::timeout(SOON, handle.restart())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/grace-child"), "{err}");
    assert_eq!(get(addr).await, "old");
    handle.shutdown();
    served.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_child_that_exits_is_reported_with_its_status() {
    let dir = Dir::new("exits");
    let (listener, addr, _) = listener();
    let exits = dir.script("exits", "exit 5");
    let server = Server::from_listener(listener);
    let handle = server.handle();
    let serve = server
        .serve(app())
        .with_restart(Restart::new().no_signal().program(&exits));
    let served = tokio::spawn(serve.into_future());
    let err = tokio::time::timeout(SOON, handle.restart())
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited with status 5"), "{err}");
    assert_eq!(get(addr).await, "old");
    assert!(!handle.notice().is_draining());
    handle.shutdown();
    let report = served.await.unwrap().unwrap();
    assert_eq!(report.trigger, Trigger::Handle);
}

#[tokio::test]
async fn a_silent_connection_accepted_before_the_handover_is_still_served() {
    let dir = Dir::new("silent");
    let (listener, addr, _) = listener();
    let ready = dir.script("ready", "echo ready >&$GRACE_READY_FD\nsleep 1");
    let server = Server::from_listener(listener).drain_policy(
        grace_http::DrainPolicy::default().new_connection_grace(Duration::from_millis(50)),
    );
    let handle = server.handle();
    let serve = server
        .serve(app())
        .with_restart(Restart::new().no_signal().program(&ready));
    let served = tokio::spawn(serve.into_future());

    // Accepted by this process, not a byte sent yet.
    let mut slow = Client::connect(addr).await;
    tokio::time::timeout(SOON, async {
        while handle.counts().new == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::timeout(SOON, handle.restart())
        .await
        .unwrap()
        .unwrap();
    // Well past the first-byte grace of a plain drain, the client sends its request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.send("/").await;
    let resp = tokio::time::timeout(SOON, slow.read()).await.unwrap();
    let resp = resp.expect("the slow client's request was not answered");
    assert_eq!((resp.status, resp.body.as_str()), (200, "old"));
    assert_eq!(resp.header("connection"), Some("close"));
    let report = tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::Restart);
    assert!(report.forced.is_empty());
}

/// The pre-stop delay is for load balancers to move away before a listener closes; at an
/// upgrade the listening socket stays open in the new process, so the old one drains at
/// once instead of answering 503 on the shared address for the length of the delay.
#[tokio::test]
async fn an_upgrade_does_not_wait_for_the_pre_stop_delay() {
    let dir = Dir::new("pre-stop");
    let (listener, addr, _socket) = listener();
    let child = dir.script("child", "echo ready >&$GRACE_READY_FD\nsleep 1");
    let server = Server::from_listener(listener)
        .drain_policy(grace_http::DrainPolicy::default().pre_stop_delay(Duration::from_secs(60)));
    let handle = server.handle();
    let serve = server
        .serve(app())
        .with_restart(Restart::new().no_signal().program(&child));
    let served = tokio::spawn(serve.into_future());
    assert_eq!(get(addr).await, "old");
    tokio::time::timeout(SOON, handle.restart())
        .await
        .unwrap()
        .unwrap();
    let report = tokio::time::timeout(SOON, served)
        .await
        .expect("the upgrade's drain waited for the pre-stop delay")
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::Restart);
    assert_eq!(
        report.phase(grace_http::Phase::PreStop),
        None,
        "{}",
        report.to_json()
    );
}

/// A restart asked for as the server starts serving (a SIGHUP right after the pid file
/// names the new generation, as `grace-demo/tests/handover.rs` sends under load) passes
/// the control socket on. It used to be registered for passing only once its task first
/// ran: a restart handled before that started the new process without it, which then
/// found the path in use and exited, and the upgrade rolled back.
#[tokio::test(flavor = "current_thread")]
async fn a_restart_asked_for_as_serving_starts_passes_the_control_socket() {
    let dir = Dir::new("control-early");
    let (listener, _, _) = listener();
    let seen = dir.0.join("seen");
    // Records whether it was given the control socket, then exits (the upgrade fails).
    let child = dir.script(
        "child",
        &format!(
            "echo \"control=${{GRACE_CONTROL_FD:-none}}\" > {seen}.tmp && mv {seen}.tmp {seen}\nexit 3",
            seen = seen.display()
        ),
    );
    let server = Server::from_listener(listener);
    let handle = server.handle();
    let serve = server
        .serve(app())
        .with_control(dir.0.join("control.sock"))
        .with_restart(Restart::new().no_signal().program(&child));
    // Asked for before serving starts: the restart task takes it as soon as it first runs,
    // which on this one-thread runtime is before any task spawned after it.
    let asked = tokio::spawn({
        let handle = handle.clone();
        async move { handle.restart().await }
    });
    tokio::task::yield_now().await;
    let served = tokio::spawn(serve.into_future());
    let outcome = tokio::time::timeout(SOON, asked).await.unwrap().unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    let seen = std::fs::read_to_string(&seen).unwrap();
    assert_ne!(
        seen.trim(),
        "control=none",
        "the control socket was not passed"
    );
    handle.shutdown();
    tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
