//! Issue 12: a rolling deploy behind a real load balancer. Three grace-demo instances behind
//! HAProxy (health-checking `/readyz`), rolled one at a time under steady load through
//! HAProxy — once by replacing processes (SIGTERM with a pre-stop delay longer than
//! HAProxy's `inter × fall`, then a fresh start on the same port), once by in-place upgrades
//! (`grace-demo ctl upgrade`). Zero failed requests at the client; every instance's report
//! clean. Skipped (saying so) where HAProxy is not installed; `.ci/run` installs it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::process::Command;

mod common;

use common::{Demo, Gone, Http, SOON, TempDir, subreaper, wait_gone};

const BIN: &str = env!("CARGO_BIN_EXE_grace-demo");
/// HAProxy checks every 200 ms and needs 2 failures: an instance is out within ~0.5 s.
/// The pre-stop delay gives it three times that.
const PRE_STOP: &str = "1500ms";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn haproxy() -> Option<&'static str> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// One instance of the service: its directory, port and control socket.
struct Instance {
    dir: TempDir,
    port: u16,
}

impl Instance {
    fn args(&self) -> Vec<String> {
        let control = self.dir.path("control.sock");
        [
            "--pre-stop-delay",
            PRE_STOP,
            "--shutdown-timeout",
            "10s",
            "--control-socket",
            control.to_str().unwrap(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    async fn start(&self) -> Demo {
        let cmd = Command::new(BIN);
        let listen = format!("127.0.0.1:{}", self.port);
        Demo::start_at(cmd, &self.dir, &listen, &self.args()).await
    }

    /// `grace-demo ctl upgrade`: the new pid.
    fn upgrade(&self) -> u32 {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.dir.path("control.sock"))
            .arg("upgrade")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// A reused keep-alive connection to HAProxy closed before any response byte (the one
    /// case a client may retry); HAProxy should never do it.
    retried: AtomicU64,
}

/// Keep-alive clients sending `GET /` through HAProxy until `stop`.
fn load(
    front: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|_| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut conn: Option<Http> = None;
                while !stop.load(Ordering::Relaxed) {
                    let reused = conn.is_some();
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Http::connect(front).await {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                failures.push(format!("connect: {e}"));
                                tally.failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                    };
                    match c.request("GET", "/", None).await {
                        Ok(r) if r.status == 200 => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            if r.closes() {
                                conn = None;
                            }
                        }
                        Ok(r) => {
                            failures.push(format!("status {}: {}", r.status, r.body));
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                        Err(e) if reused && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            tally.retried.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                        Err(e) => {
                            failures.push(format!("request: {e}"));
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                failures
            })
        })
        .collect()
}

/// Waits until HAProxy routes to every instance again (each answers a request through it;
/// the greeting is the same, so we count the backend's own counters instead: enough
/// successful requests in a row).
async fn settle(front: SocketAddr) {
    let t = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 20 {
        let ok =
            matches!(common::call(front, "GET", "/readyz", None).await, Ok(r) if r.status == 200);
        in_a_row = if ok { in_a_row + 1 } else { 0 };
        assert!(t.elapsed() < SOON * 3, "HAProxy never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn roll(by_upgrade: bool) {
    let Some(haproxy) = haproxy() else {
        println!("skipped: haproxy is not installed (.ci/run installs it)");
        return;
    };
    subreaper();
    let instances: Vec<Instance> = (0..3)
        .map(|_| Instance {
            dir: TempDir::new(),
            port: free_port(),
        })
        .collect();
    let mut running = Vec::new();
    for i in &instances {
        running.push(Some(i.start().await));
    }
    let front_port = free_port();
    let mut config = format!(
        "global\n  maxconn 2000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  \
         timeout server 30s\n  retries 3\n  option redispatch\n  retry-on all-retryable-errors\n  \
         option httpchk GET /readyz\n  default-server inter 200ms fall 2 rise 2\n\
         frontend fe\n  bind 127.0.0.1:{front_port}\n  default_backend be\nbackend be\n  balance roundrobin\n"
    );
    for (n, i) in instances.iter().enumerate() {
        config.push_str(&format!("  server s{n} 127.0.0.1:{} check\n", i.port));
    }
    let cfg = instances[0].dir.path("haproxy.cfg");
    std::fs::write(&cfg, config).unwrap();
    let mut lb = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let front: SocketAddr = format!("127.0.0.1:{front_port}").parse().unwrap();
    settle(front).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = load(front, 6, Arc::clone(&stop), Arc::clone(&tally));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut retired = Vec::new();
    for (n, inst) in instances.iter().enumerate() {
        if by_upgrade {
            let old = running[n].as_ref().unwrap().pid;
            let new = inst.upgrade();
            assert_ne!(new, old);
            retired.push(old);
        } else {
            let old = running[n].take().unwrap();
            old.signal(Signal::TERM);
            let exit = old.wait_exit(SOON * 2).await;
            assert_eq!(exit.code, 0, "instance {n}: {}", exit.stderr);
            assert_eq!(
                exit.report["forced"].as_array().map(Vec::len),
                Some(0),
                "{}",
                exit.report
            );
            running[n] = Some(inst.start().await);
        }
        settle(front).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "roll ({}): {ok} ok, {} failed, {} retried",
        if by_upgrade { "upgrade" } else { "replace" },
        tally.failed.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "failed requests at the client: {failures:?}"
    );
    assert!(ok > 100, "only {ok} requests went through");
    // Every old generation left cleanly (status 0).
    for pid in retired {
        assert_eq!(wait_gone(pid, SOON), Gone::Exited(Some(0)));
    }
    let _ = lb.kill().await;
    // The last generation of each instance stops cleanly too.
    for (n, inst) in instances.iter().enumerate() {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(inst.dir.path("control.sock"))
            .args(["--json", "status"])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let pid = status["pid"].as_u64().unwrap() as u32;
        match running[n].take() {
            Some(demo) if demo.pid == pid => {
                demo.signal(Signal::TERM);
                let exit = demo.wait_exit(SOON).await;
                assert_eq!(exit.code, 0, "instance {n}: {}", exit.stderr);
            }
            _ => {
                common::signal(pid, Signal::TERM);
                assert_eq!(wait_gone(pid, SOON), Gone::Exited(Some(0)), "instance {n}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_replace_behind_haproxy_loses_nothing() {
    roll(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_in_place_upgrade_behind_haproxy_loses_nothing() {
    roll(true).await;
}
