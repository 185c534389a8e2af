//! Issue 22, item 2: `grace-demo --admin-listen ADDR`, on real processes. `/metrics`,
//! `/debug` and `/debug/conns` are served on the admin listener (its own service, through
//! `Serve::also_serve`) and answer 404 on the public one; both listeners live through
//! SIGHUP upgrades (both passed on by name, kept connections of each handed over to the
//! service of their own listener), and SIGTERM drains both into one report.
//!
//! Like `restart.rs`, this test process makes itself a child subreaper: each generation is
//! re-parented here when its parent (the previous generation) exits, to be reaped by pid.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;
use tokio::io::AsyncReadExt;

mod common;

use common::{BIN, Demo, Http, PATIENCE, Response, SOON, Service, TempDir, call};

const ADMIN_ROUTES: [&str; 3] = ["/metrics", "/debug", "/debug/conns"];

async fn get(addr: SocketAddr, path: &str) -> Response {
    call(addr, "GET", path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// The value of the gauge or counter `name` (without labels) in a Prometheus text body.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `/metrics`, `/debug` and `/debug/conns` answer on the admin port only; the public port
/// keeps the rest. Then SIGTERM, with a request in flight on each port (a slow one on the
/// public port, the live page's event stream on the admin one) and an idle keep-alive
/// connection on the admin port: both listeners close, every connection ends cleanly, and
/// the one report counts the connections of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_routes_move_to_the_admin_port_and_sigterm_drains_both_into_one_report() {
    let dir = TempDir::new();
    let args = [
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        &format!("sqlite://{}?mode=rwc", dir.path("ledger.db").display()),
    ]
    .map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let (public, admin) = (demo.addr, demo.admin.expect("an admin address"));
    assert_ne!(public, admin);
    for path in ADMIN_ROUTES {
        let on_admin = get(admin, path).await;
        assert_eq!(
            on_admin.status, 200,
            "{path} on the admin port: {on_admin:?}"
        );
        let on_public = get(public, path).await;
        assert_eq!(
            on_public.status, 404,
            "{path} on the public port: {on_public:?}"
        );
    }
    let metrics = get(admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, "grace_generation"), Some(1.0), "{metrics}");
    assert_eq!(get(admin, "/debug/conns").await.json()["phase"], "serving");
    // The public routes stay where they were, and only there.
    assert_eq!(get(public, "/").await.body, "hello");
    assert_eq!(get(public, "/healthz").await.status, 200);
    assert_eq!(get(admin, "/").await.status, 404);

    // In flight on each port, and one idle keep-alive connection on the admin port.
    let mut slow = Http::connect(public).await.unwrap();
    slow.send("GET", "/sleep/3000", None).await.unwrap();
    let mut page = Http::connect(admin).await.unwrap();
    page.send("GET", "/debug/events", None).await.unwrap();
    assert_eq!(page.read_head().await.unwrap().status, 200);
    let mut idle = Http::connect(admin).await.unwrap();
    // Until this one sees the other two at work (itself active while it asks).
    let t = Instant::now();
    loop {
        let conns = idle
            .request("GET", "/debug/conns", None)
            .await
            .unwrap()
            .json();
        if conns["counts"]["active"] == 3 {
            break;
        }
        assert!(t.elapsed() < SOON, "never 3 active: {conns}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    demo.signal(Signal::TERM);
    // The idle admin connection closes at once; then neither port accepts.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(SOON, idle.raw().read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "{closed:?} {rest:?}"
    );
    for addr in [public, admin] {
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "{addr} still accepts during the drain");
    }
    // The slow request finishes, then the live page says goodbye and its stream ends.
    let answer = slow.read().await.expect("the slow request was cut");
    assert_eq!((answer.status, answer.closes()), (200, true), "{answer:?}");
    let mut stream = Vec::new();
    tokio::time::timeout(SOON, page.raw().read_to_end(&mut stream))
        .await
        .expect("the live page's stream never ended")
        .expect("the live page's stream broke");
    let stream = String::from_utf8_lossy(&stream);
    assert!(stream.contains("event: goodbye"), "{stream}");

    let exit = demo.wait_exit(PATIENCE).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    let report = &exit.report;
    assert_eq!(report["trigger"], "SIGTERM", "{report}");
    let at_start = &report["at_start"];
    let active = at_start["active"].as_u64().unwrap();
    let idle_at_start = at_start["idle"].as_u64().unwrap();
    // The slow request and the event stream, the idle connection (it may still have been
    // finishing its last answer when the signal came).
    assert!(active >= 2, "{report}");
    assert_eq!(active + idle_at_start, 3, "{report}");
    assert_eq!(report["closed"], 3, "{report}");
    assert_eq!(
        report["forced"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    assert!(
        report["requests_completed"].as_u64().unwrap() >= 2,
        "{report}"
    );
}

/// Fresh connections on both ports, until stopped: `GET /` on the public one (and
/// `/metrics` there is 404), `GET /metrics` on the admin one. Every answer is checked.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(public: SocketAddr, admin: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let checks: [(SocketAddr, &'static str, u16); 3] = [
            (public, "/", 200),
            (admin, "/metrics", 200),
            (public, "/metrics", 404),
        ];
        let tasks = checks
            .into_iter()
            .map(|(addr, path, want)| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) && failures.len() < 5 {
                        match call(addr, "GET", path, None).await {
                            Ok(r) if r.status == want => ok += 1,
                            Ok(r) => failures.push(format!("{path}: {} {:?}", r.status, r.body)),
                            Err(e) => failures.push(format!("{path} on {addr}: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for task in self.tasks {
            let (o, f) = task.await.expect("load task panicked");
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// `grace-demo ctl --json ACTION` on the service's control socket.
async fn ctl(service: &Service, action: &str) -> Value {
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(service.scratch.path("control.sock"))
        .args(["--json", action])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run grace-demo ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("ctl {action}: {e}: {text:?}"))
}

/// Across five upgrades (four by SIGHUP, the last by `ctl upgrade`), under load on both
/// ports with a fresh connection per request: no request fails, and none is refused
/// (before this, the admin socket was not passed on, the new process could not bind it,
/// and every upgrade rolled back). Each upgrade brings a new pid that `ctl status` names,
/// one generation more (in `/metrics` too), and the old generation drains for the restart.
/// A keep-alive connection on each port, opened before each upgrade, is handed over and
/// served by the new generation with its own listener's service: `/metrics` on the admin
/// one, `/whoami` (and a 404 for `/metrics`) on the public one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ports_serve_across_upgrades_and_kept_connections_keep_their_service() {
    const UPGRADES: usize = 5;
    let scratch = TempDir::new();
    let control = scratch.path("control.sock").display().to_string();
    let mut service = Service::start(
        scratch,
        Path::new(BIN),
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--control-socket",
            &control,
        ],
    );
    let (public, admin) = (service.addr, service.admin.expect("an admin address"));
    let load = Load::start(public, admin);
    for round in 0..UPGRADES {
        let generation = round as u64 + 2;
        let mut kept_public = Http::connect(public).await.unwrap();
        let mut kept_admin = Http::connect(admin).await.unwrap();
        let before = kept_public.request("GET", "/whoami", None).await.unwrap();
        assert_eq!(before.json()["pid"], service.current());
        assert_eq!(
            kept_admin
                .request("GET", "/metrics", None)
                .await
                .unwrap()
                .status,
            200
        );

        let old = service.current();
        let new = match round {
            r if r < UPGRADES - 1 => {
                service.hup();
                service.upgraded(old)
            }
            _ => {
                let outcome = ctl(&service, "upgrade").await;
                assert_eq!(outcome["ok"], true, "{outcome}");
                let new = service.next(old);
                assert_eq!(outcome["pid"], new, "{outcome}");
                service.retire_old();
                new
            }
        };
        assert_ne!(new, old);
        let status = ctl(&service, "status").await;
        assert_eq!(
            (&status["pid"], &status["generation"]),
            (&Value::from(new), &Value::from(generation)),
            "round {round}: {status}"
        );
        // The kept connections, now the new generation's, each with its own service.
        let answer = kept_admin.request("GET", "/metrics", None).await;
        let answer = answer.unwrap_or_else(|e| panic!("round {round}: kept admin: {e}"));
        assert_eq!(answer.status, 200, "round {round}: {answer:?}");
        assert!(!answer.closes(), "round {round}: {answer:?}");
        assert_eq!(
            metric(&answer.body, "grace_generation"),
            Some(generation as f64),
            "round {round}: answered by another generation"
        );
        let received = metric(&answer.body, "grace_connections_received_total");
        assert!(
            received >= Some(2.0),
            "round {round}: received {received:?}"
        );
        let whoami = kept_public.request("GET", "/whoami", None).await;
        let whoami = whoami.unwrap_or_else(|e| panic!("round {round}: kept public: {e}"));
        assert_eq!(whoami.json()["pid"], new, "round {round}");
        let metrics = kept_public.request("GET", "/metrics", None).await.unwrap();
        assert_eq!(
            metrics.status, 404,
            "round {round}: /metrics on the public port"
        );
    }
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed under load: {failures:?}");
    assert!(ok >= 30, "the load did not run: {ok} answers");
    let log = service.stderr();
    assert!(!log.contains("upgrade failed"), "{log}");
    let ready = log.matches("new process is ready").count();
    assert_eq!(ready, UPGRADES, "{log}");
    let restarts: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"trigger\":\"restart\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(restarts.len(), UPGRADES, "{log}");
    for report in &restarts {
        assert!(report["handed_over"].as_u64() >= Some(2), "{report}");
    }
    service.stop();
}
