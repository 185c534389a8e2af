//! Connections handed over at an upgrade, on real `grace-demo` processes: at SIGHUP the old
//! generation passes each HTTP/1.1 keep-alive connection (its socket and the bytes read but
//! not parsed) to the new one at its first moment between requests, so no client reconnects
//! and no request is lost or answered twice. A new generation that fails before it is ready
//! gets nothing; HTTP/2 and TLS connections are not handed over and do not hold the window.
//!
//! Like `restart.rs`, this test process makes itself a child subreaper: each generation is
//! re-parented here when its parent (the previous generation) exits, to be reaped by pid.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

mod common;

use common::{
    BIN, Http, PATIENCE, Response, Service, TempDir, install_real_binary, read_response,
    replace_file,
};

/// The control socket's file in the service's scratch directory.
const CONTROL: &str = "control.sock";

/// [`Service::start`] with a control socket, for `ctl status`.
fn start(scratch: TempDir, program: &Path, args: &[&str]) -> Service {
    let control = scratch.path(CONTROL).display().to_string();
    Service::start(
        scratch,
        program,
        &[&["--control-socket", control.as_str()][..], args].concat(),
    )
}

impl Service {
    /// `grace-demo ctl --json status` through the control socket (the newest generation
    /// holds its path).
    async fn status(&self) -> Value {
        let out = tokio::process::Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.scratch.path(CONTROL))
            .args(["--json", "status"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run grace-demo ctl");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "ctl status: {e}: {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The shutdown reports of the generations that left at an upgrade, oldest first.
    fn restart_reports(&self) -> Vec<Value> {
        self.stderr()
            .lines()
            .filter(|l| l.starts_with('{') && l.contains("\"trigger\":\"restart\""))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// The pid in a `/whoami` answer, which must be a 200 that keeps the connection open.
fn whoami_pid(resp: &Response) -> Result<u32, String> {
    if resp.status != 200 {
        return Err(format!("status {}: {:?}", resp.status, resp.body));
    }
    if resp.closes() {
        return Err("answered with Connection: close".into());
    }
    resp.json()["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| format!("no pid in {:?}", resp.body))
}

/// `GET /whoami` on `http`: the pid that answered.
async fn whoami(http: &mut Http) -> Result<u32, String> {
    let resp = http
        .request("GET", "/whoami", None)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    whoami_pid(&resp)
}

/// Fails if anything is left to read on `http` (a response nobody asked for, or the end of
/// the connection) within a short look.
async fn nothing_more(http: &mut Http) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_millis(200), http.raw().fill_buf()).await {
        Err(_) => Ok(()),
        Ok(Ok([])) => Err("the connection was closed".into()),
        Ok(Ok(extra)) => Err(format!(
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(extra)
        )),
        Ok(Err(e)) => Err(format!("the connection broke: {e}")),
    }
}

/// A keep-alive client as HTTP libraries behave: when its connection turns out closed (or
/// the server said it closes it), it connects again, and retries a request that got no
/// response once. Every connect is counted: with hand-over there must be none after the
/// first.
struct Client {
    addr: SocketAddr,
    http: Option<Http>,
    connects: u64,
    /// What made it connect again.
    reconnect_causes: Vec<String>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            http: None,
            connects: 0,
            reconnect_causes: Vec::new(),
        }
    }

    async fn get(&mut self, path: &str) -> Result<Response, String> {
        let mut last_error = String::new();
        for _ in 0..2 {
            if self.http.is_none() {
                let http = Http::connect(self.addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                self.connects += 1;
                self.http = Some(http);
            }
            match self.http.as_mut().unwrap().request("GET", path, None).await {
                Ok(resp) => {
                    if resp.closes() {
                        self.http = None;
                        self.cause(format!("{path}: Connection: close"));
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    self.http = None;
                    last_error = format!("{path}: {e}");
                    self.cause(last_error.clone());
                }
            }
        }
        Err(last_error)
    }

    fn cause(&mut self, what: String) {
        if self.reconnect_causes.len() < 5 {
            self.reconnect_causes.push(what);
        }
    }

    /// `GET /whoami`: the pid that answered.
    async fn whoami(&mut self) -> Result<u32, String> {
        whoami_pid(&self.get("/whoami").await?)
    }
}

/// `n` clients, each connected and asked `GET /whoami` once (a few dozen at a time, so the
/// accept queue never overflows); each must be answered by `expected`.
async fn clients(addr: SocketAddr, n: usize, expected: u32) -> Vec<Client> {
    let mut all: Vec<Client> = (0..n).map(|_| Client::new(addr)).collect();
    for batch in all.chunks_mut(50) {
        for (i, got) in join_all(batch.iter_mut().map(Client::whoami))
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(got, Ok(expected), "client {i}");
        }
    }
    all
}

/// Asks every client `GET /whoami` at once: each must be answered by `expected`, on the
/// connection it opened first (none reconnected). Panics with `when`, the count and the
/// first few of what went wrong.
async fn all_answer_from(all: &mut [Client], expected: u32, when: &str) {
    let answers = join_all(all.iter_mut().map(Client::whoami)).await;
    let wrong: Vec<String> = answers
        .into_iter()
        .enumerate()
        .filter(|(_, a)| *a != Ok(expected))
        .map(|(i, a)| format!("client {i}: {a:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{when}: {} of {} not answered by {expected}: {:?}",
        wrong.len(),
        all.len(),
        &wrong[..wrong.len().min(5)]
    );
    let connects: u64 = all.iter().map(|c| c.connects).sum();
    let causes: Vec<&String> = all
        .iter()
        .flat_map(|c| &c.reconnect_causes)
        .take(5)
        .collect();
    assert_eq!(connects, all.len() as u64, "{when}: reconnects: {causes:?}");
}

/// What a load client saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    connects: u64,
    failures: Vec<String>,
    reconnect_causes: Vec<String>,
}

/// Clients sending back-to-back `GET /sleep/5` on keep-alive connections until stopped, so
/// requests are in flight whenever a drain starts.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(addr: SocketAddr, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|_| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut client = Client::new(addr);
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get("/sleep/5").await {
                            Ok(r) if r.status == 200 && r.body == "slept 5 ms\n" => tally.ok += 1,
                            Ok(r) => tally.failures.push(format!("{} {:?}", r.status, r.body)),
                            Err(e) => tally.failures.push(e),
                        }
                        if tally.failures.len() > 5 {
                            break;
                        }
                    }
                    tally.connects = client.connects;
                    tally.reconnect_causes = client.reconnect_causes;
                    tally
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for task in self.tasks {
            let t = task.await.expect("load client panicked");
            total.ok += t.ok;
            total.connects += t.connects;
            total.failures.extend(t.failures);
            total.reconnect_causes.extend(t.reconnect_causes);
        }
        total
    }
}

/// A thousand idle keep-alive connections and four busy ones live through twenty upgrades
/// without a single reconnect or failed request: after each upgrade (the old generation
/// gone), every one of the thousand is answered by the new generation on the connection it
/// opened at the start. Each old generation reports at least a thousand connections handed
/// over, and each new one says (`ctl status`) it received them.
///
/// Without the hand-over (`--hand-over-window 0`) the idle connections are closed at each
/// upgrade and the clients have to reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_survive_twenty_upgrades_under_load() {
    const IDLE: usize = 1000;
    const LOAD: usize = 4;
    const UPGRADES: usize = 20;
    // The demo's generations inherit it: each holds a thousand connections.
    grace_testkit::process::raise_nofile();
    let mut service = start(TempDir::new(), Path::new(BIN), &[]);
    let started = Instant::now();
    let mut idle = clients(service.addr, IDLE, service.current()).await;
    let load = Load::start(service.addr, LOAD);
    let mut seen = HashSet::from([service.current()]);
    for round in 0..UPGRADES {
        let t = Instant::now();
        let old = service.hup();
        let new = service.upgraded(old);
        let upgraded = t.elapsed();
        assert!(seen.insert(new), "round {round}: pid {new} came back");
        all_answer_from(&mut idle, new, &format!("round {round} ({old} → {new})")).await;
        let status = service.status().await;
        assert_eq!(status["pid"], new, "{status}");
        let received = status["handed_over"]["received"].as_u64().unwrap_or(0);
        assert!(
            received >= IDLE as u64,
            "round {round}: {new} received {received} connections: {status}"
        );
        eprintln!(
            "round {round}: {old} → {new} in {upgraded:?}, {received} received, all answered \
             after {:?}",
            t.elapsed()
        );
    }
    let tally = load.finish().await;
    eprintln!(
        "{UPGRADES} upgrades in {:?}; load: {} ok, {} connects",
        started.elapsed(),
        tally.ok,
        tally.connects
    );
    assert!(tally.failures.is_empty(), "load failures: {tally:?}");
    assert_eq!(
        tally.connects, LOAD as u64,
        "the load clients had to reconnect: {tally:?}"
    );
    assert!(tally.ok >= 100, "the load did not run: {tally:?}");
    let reports = service.restart_reports();
    assert_eq!(reports.len(), UPGRADES, "{reports:?}");
    for (i, report) in reports.iter().enumerate() {
        let handed = report["handed_over"].as_u64().unwrap_or(0);
        assert!(
            handed >= IDLE as u64,
            "generation {i} handed over {handed}: {report}"
        );
    }
    service.stop();
}

/// How the second of two pipelined requests is sent, in one round of pipelining at an
/// upgrade (the first is `GET /sleep/300`).
#[derive(Clone, Copy, Debug)]
enum Pipelined {
    /// Its whole head in the same write as the first request.
    Whole,
    /// The first half of its head in the same write; the rest ~100 ms after the SIGHUP,
    /// while the first is still being answered.
    HalfHead,
    /// The first half of its head in the same write; the rest only once the first is
    /// answered and the old generation is gone.
    HalfHeadAfterTheUpgrade,
}

/// Per upgrade, two connections of each way.
const PIPELINED: [Pipelined; 6] = [
    Pipelined::Whole,
    Pipelined::HalfHead,
    Pipelined::HalfHeadAfterTheUpgrade,
    Pipelined::Whole,
    Pipelined::HalfHead,
    Pipelined::HalfHeadAfterTheUpgrade,
];

/// Pipelined requests in flight at an upgrade are each answered once, in order, with the
/// connection kept. On keep-alive connections, `GET /sleep/300` and a second request go in
/// one write (the second whole, or the first half of its head), then SIGHUP. The sleep is
/// answered by the old generation with keep-alive. A second request whose head was whole
/// before the sleep ended is answered by the old generation too (hyper parses it from its
/// buffer right after the first response), or by the new one; either way exactly once, and
/// nothing follows. A half head still waiting when the sleep ends travels with the socket:
/// its rest, sent once the old generation is gone, completes it in the new generation,
/// which answers it. Each connection then serves a third request from the new generation,
/// and each old generation reports every connection handed over and none closed. Eight
/// upgrades, six connections each.
///
/// Without the hand-over the sleep's response says `Connection: close` and the second
/// request is never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_at_an_upgrade_are_answered_once_in_order() {
    const UPGRADES: usize = 8;
    let mut service = start(TempDir::new(), Path::new(BIN), &[]);
    let sleep = "GET /sleep/300 HTTP/1.1\r\nHost: grace\r\n\r\n";
    let (half, rest) = ("GET /whoami HTTP/1.1\r\nHo", "st: grace\r\n\r\n");
    let (mut by_old, mut by_new) = (0, 0);
    for upgrade in 0..UPGRADES {
        let old = service.current();
        let mut conns = Vec::new();
        for how in PIPELINED {
            let mut http = Http::connect(service.addr).await.unwrap();
            assert_eq!(whoami(&mut http).await, Ok(old));
            let second = match how {
                Pipelined::Whole => format!("{half}{rest}"),
                Pipelined::HalfHead | Pipelined::HalfHeadAfterTheUpgrade => half.to_owned(),
            };
            http.raw()
                .get_mut()
                .write_all(format!("{sleep}{second}").as_bytes())
                .await
                .unwrap();
            conns.push(http);
        }
        service.hup();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (http, how) in conns.iter_mut().zip(PIPELINED) {
            if let Pipelined::HalfHead = how {
                http.raw()
                    .get_mut()
                    .write_all(rest.as_bytes())
                    .await
                    .unwrap();
            }
        }
        // The sleeps' responses, and the second responses but for the heads still waiting.
        let answers = join_all(
            conns
                .iter_mut()
                .zip(PIPELINED)
                .map(|(http, how)| async move {
                    let first = http.read().await.map_err(|e| format!("first: {e}"))?;
                    let second = match how {
                        Pipelined::HalfHeadAfterTheUpgrade => None,
                        _ => Some(http.read().await.map_err(|e| format!("second: {e}"))?),
                    };
                    Ok::<_, String>((first, second))
                }),
        )
        .await;
        let new = service.upgraded(old);
        let what = |i: usize| {
            format!(
                "upgrade {upgrade} ({old} → {new}), connection {i} ({:?})",
                PIPELINED[i]
            )
        };
        for (i, (answer, http)) in answers.into_iter().zip(&mut conns).enumerate() {
            let (first, second) = answer.unwrap_or_else(|e| panic!("{}: {e}", what(i)));
            assert_eq!(first.status, 200, "{}: {first:?}", what(i));
            assert_eq!(first.body, "slept 300 ms\n", "{}", what(i));
            assert!(!first.closes(), "{}: the sleep closed it", what(i));
            let second = match second {
                Some(second) => second,
                None => {
                    // The old generation is gone: only the new one can complete this head.
                    http.raw()
                        .get_mut()
                        .write_all(rest.as_bytes())
                        .await
                        .unwrap();
                    let second = http.read().await;
                    second.unwrap_or_else(|e| panic!("{}: second: {e}", what(i)))
                }
            };
            let answered = whoami_pid(&second).unwrap_or_else(|e| panic!("{}: {e}", what(i)));
            match PIPELINED[i] {
                Pipelined::HalfHeadAfterTheUpgrade => assert_eq!(answered, new, "{}", what(i)),
                _ => assert!(
                    answered == old || answered == new,
                    "{}: answered by {answered}",
                    what(i)
                ),
            }
            if answered == new {
                by_new += 1;
            } else {
                by_old += 1;
            }
        }
        // Exactly two responses each: nothing follows them.
        let extra = join_all(conns.iter_mut().map(nothing_more)).await;
        for (i, extra) in extra.into_iter().enumerate() {
            extra.unwrap_or_else(|e| panic!("{}: after two responses: {e}", what(i)));
        }
        for (i, http) in conns.iter_mut().enumerate() {
            assert_eq!(whoami(http).await, Ok(new), "{}: third request", what(i));
        }
        let report = &service.restart_reports()[upgrade];
        assert_eq!(report["handed_over"], PIPELINED.len(), "{report}");
        assert_eq!(report["closed"], 0, "{report}");
    }
    eprintln!("second requests answered by the old generation {by_old}, by the new {by_new}");
    service.stop();
}

/// Requests that begin around the hand-over are answered once, whole. 99 idle keep-alive
/// connections each send `GET /whoami` in two writes (its first byte or the first 20
/// bytes, a pause of 1, 10 or 40 ms, the rest): a third of them write the first part just
/// before the SIGHUP (so it is read, unparsed, when the drain starts, and travels with the
/// socket), the others start over the second after it, densely at first, where the
/// hand-over happens (the new generation is ready within tens of milliseconds). Each gets
/// exactly one 200 (from the old or the new generation), no close and no reset; nothing
/// follows; the connection then serves the new generation, and the old one reports every
/// connection handed over and none closed. Two upgrades.
///
/// Without the hand-over the idle connections are closed at the drain, and the requests
/// sent after that fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_begun_during_the_hand_over_is_answered_once() {
    const CONNS: usize = 99;
    let mut service = start(TempDir::new(), Path::new(BIN), &[]);
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut http = Http::connect(service.addr).await.unwrap();
        assert_eq!(whoami(&mut http).await, Ok(service.current()));
        conns.push(http);
    }
    let request = "GET /whoami HTTP/1.1\r\nHost: grace\r\n\r\n".as_bytes();
    // Where conn `i` splits its request, and whether it writes the first part early.
    let split = |i: usize| if i % 2 == 0 { 1 } else { 20 };
    let early = |i: usize| i % 3 == 0;
    for upgrade in 0..2 {
        for (i, http) in conns.iter_mut().enumerate().filter(|(i, _)| early(*i)) {
            let io = http.raw().get_mut();
            io.write_all(&request[..split(i)]).await.unwrap();
        }
        let old = service.hup();
        let t = Instant::now();
        let answers = join_all(conns.iter_mut().enumerate().map(|(i, http)| async move {
            // 0 to 1 s after the SIGHUP, quadratically: a third within the first 110 ms.
            let offset = Duration::from_secs_f64((i as f64 / CONNS as f64).powi(2));
            tokio::time::sleep_until((t + offset).into()).await;
            let io = http.raw().get_mut();
            if !early(i) {
                io.write_all(&request[..split(i)])
                    .await
                    .map_err(|e| format!("first write: {e}"))?;
            }
            tokio::time::sleep(Duration::from_millis([1, 10, 40][i % 3])).await;
            io.write_all(&request[split(i)..])
                .await
                .map_err(|e| format!("second write: {e}"))?;
            let resp = http.read().await.map_err(|e| format!("response: {e}"))?;
            whoami_pid(&resp)
        }))
        .await;
        let new = service.upgraded(old);
        let (mut by_old, mut by_new) = (0, 0);
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(p) if p == old => by_old += 1,
                Ok(p) if p == new => by_new += 1,
                other => panic!("upgrade {upgrade} ({old} → {new}), connection {i}: {other:?}"),
            }
        }
        eprintln!("upgrade {upgrade}: answered by the old generation {by_old}, the new {by_new}");
        let extra = join_all(conns.iter_mut().map(nothing_more)).await;
        for (i, extra) in extra.into_iter().enumerate() {
            extra.unwrap_or_else(|e| panic!("upgrade {upgrade}, connection {i}: {e}"));
        }
        for (i, http) in conns.iter_mut().enumerate() {
            assert_eq!(
                whoami(http).await,
                Ok(new),
                "upgrade {upgrade}, connection {i}"
            );
        }
        let report = &service.restart_reports()[upgrade];
        assert_eq!(report["handed_over"], CONNS, "{report}");
        assert_eq!(report["closed"], 0, "{report}");
    }
    service.stop();
}

/// A new generation that fails before it is ready is handed nothing: with 200 idle
/// keep-alive connections held, (a) the config file is broken, so the new process exits at
/// start, and (b) the program is replaced by one that never reports ready (killed at
/// `--ready-timeout`). After each failed upgrade the old generation still answers every
/// connection, none reconnects, and it says it sent none. Then (c) a good upgrade hands all
/// of them to the new generation (so the connections were there to hand over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_generation_hands_over_nothing() {
    const CONNS: usize = 200;
    let scratch = TempDir::new();
    // Upgrades start whatever is at this path now, like a binary replaced on disk.
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let config = scratch.path("grace-demo.toml");
    replace_file(&config, "greeting = \"one\"\n", false);
    let config_arg = config.display().to_string();
    let mut service = start(
        scratch,
        &program,
        &["--config", &config_arg, "--ready-timeout", "3s"],
    );
    let first = service.current();
    let mut held = clients(service.addr, CONNS, first).await;

    // (a) The new process exits at start: its config does not parse.
    replace_file(&config, "greeting = \n", false);
    let line = service.failed_upgrade(1);
    assert!(line.contains("exited with status 1"), "{line}");
    all_answer_from(&mut held, first, "after a broken config").await;
    replace_file(&config, "greeting = \"one\"\n", false);

    // (b) The new program adopts the sockets (the hand-over socket too, across the exec)
    //     and never says it is ready.
    let hangs = "#!/bin/sh\nexec sleep 60\n";
    replace_file(&program, hangs, true);
    let line = service.failed_upgrade(2);
    assert!(line.contains("not ready within"), "{line}");
    all_answer_from(&mut held, first, "after a new process that never got ready").await;
    let status = service.status().await;
    assert_eq!(status["pid"], first, "{status}");
    assert_eq!(status["handed_over"]["sent"], 0, "{status}");
    assert!(service.restart_reports().is_empty());

    // (c) A good program again: this upgrade hands every connection over.
    install_real_binary(&program);
    let old = service.hup();
    let new = service.upgraded(old);
    all_answer_from(&mut held, new, "after a good upgrade").await;
    let status = service.status().await;
    assert!(
        status["handed_over"]["received"].as_u64().unwrap_or(0) >= CONNS as u64,
        "{status}"
    );
    let reports = service.restart_reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0]["handed_over"], CONNS, "{}", reports[0]);
    service.stop();
}

/// An HTTP/2 frame: type, flags, payload.
type Frame = (u8, u8, Vec<u8>);

/// The client side of an idle h2c (prior knowledge) connection, kept by hand: grace-demo's
/// dev-dependencies have no HTTP/2 client. It sends the preface and its SETTINGS, then
/// acknowledges the server's SETTINGS and PINGs (as any client does: hyper's graceful
/// shutdown waits for the PING's answer), and records the frames until the connection
/// ends. Resolves `ready` once the server's SETTINGS arrived (the server speaks HTTP/2 on
/// it).
async fn h2c_idle(
    addr: SocketAddr,
    ready: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<Vec<Frame>> {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const ACK: u8 = 0x1;
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut ready = Some(ready);
    let mut frames = Vec::new();
    loop {
        let mut head = [0u8; 9];
        match tcp.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(frames),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        tcp.read_exact(&mut payload).await?;
        let (kind, flags) = (head[3], head[4]);
        if kind == SETTINGS && flags & ACK == 0 {
            tcp.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]).await?;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
        }
        if kind == PING && flags & ACK == 0 {
            let mut ack = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
            ack.extend_from_slice(&payload);
            tcp.write_all(&ack).await?;
        }
        frames.push((kind, flags, payload));
    }
}

/// Connections that can never be handed over do not hold an upgrade for the hand-over
/// window: with `--hand-over-window 30s`, (a) an idle h2c connection (next to an idle
/// HTTP/1 one, which is handed over) gets GOAWAY and its connection ends, and (b) an idle
/// keep-alive HTTPS connection is closed; in both cases the old generation exits within
/// 15 s of the new one being ready, far from the 30 s window.
///
/// (At 44e344c, which introduced the hand-over, an idle TLS connection waited for the end
/// of the window: the old generation lived 30 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_tls_connections_are_not_held_by_the_window() {
    const PROMPT: Duration = Duration::from_secs(15);
    /// An upgrade whose old generation must be gone within `PROMPT` of the SIGHUP: the new
    /// pid, and how long that took.
    fn prompt_upgrade(service: &mut Service, what: &str) -> (u32, Duration) {
        let old = service.hup();
        let t = Instant::now();
        let new = service.upgraded(old);
        let took = t.elapsed();
        assert!(
            took < PROMPT,
            "{what}: the old generation took {took:?} to exit"
        );
        (new, took)
    }

    // (a) h2c, and an HTTP/1 connection beside it.
    let mut service = start(
        TempDir::new(),
        Path::new(BIN),
        &["--hand-over-window", "30s"],
    );
    let (ready, h2_ready) = tokio::sync::oneshot::channel();
    let h2 = tokio::spawn(h2c_idle(service.addr, ready));
    tokio::time::timeout(PATIENCE, h2_ready)
        .await
        .expect("no SETTINGS from the server")
        .expect("the h2c client failed");
    let mut http1 = Http::connect(service.addr).await.unwrap();
    let first = service.current();
    assert_eq!(whoami(&mut http1).await, Ok(first));
    let (new, took) = prompt_upgrade(&mut service, "h2c");
    let frames = tokio::time::timeout(PATIENCE, h2)
        .await
        .expect("the h2c connection was not ended")
        .unwrap()
        .expect("the h2c connection broke");
    assert!(
        frames.iter().any(|(kind, _, _)| *kind == 0x7),
        "no GOAWAY: {frames:?}"
    );
    assert_eq!(whoami(&mut http1).await, Ok(new), "the HTTP/1 connection");
    let reports = service.restart_reports();
    assert_eq!(reports[0]["handed_over"], 1, "{}", reports[0]);
    eprintln!("h2c: old generation gone {took:?} after the SIGHUP");
    service.stop();

    // (b) TLS.
    let scratch = TempDir::new();
    let certificate = common::cert();
    let (cert, key) = (scratch.path("cert.pem"), scratch.path("key.pem"));
    std::fs::write(&cert, certificate.cert_pem).unwrap();
    std::fs::write(&key, certificate.key_pem).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mut service = start(
        scratch,
        Path::new(BIN),
        &[
            "--hand-over-window",
            "30s",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let connector = common::tls_connector(certificate.der);
    let mut tls = common::tls_connect(&connector, service.addr).await.unwrap();
    let get = b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n";
    tls.get_mut().write_all(get).await.unwrap();
    let first = service.current();
    let resp = read_response(&mut tls).await.unwrap();
    assert_eq!(whoami_pid(&resp), Ok(first));
    let (new, took) = prompt_upgrade(&mut service, "TLS");
    // The old generation ended it (close_notify, then the end).
    let mut rest = Vec::new();
    let end = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "the TLS connection did not end cleanly: {end:?} {rest:?}"
    );
    let reports = service.restart_reports();
    assert_eq!(reports[0]["handed_over"], 0, "{}", reports[0]);
    // A new connection reaches the new generation.
    let mut again = common::tls_connect(&connector, service.addr).await.unwrap();
    again.get_mut().write_all(get).await.unwrap();
    let resp = read_response(&mut again).await.unwrap();
    assert_eq!(whoami_pid(&resp), Ok(new));
    eprintln!("TLS: old generation gone {took:?} after the SIGHUP");
    drop(again);
    service.stop();
}

/// A connection whose last request had a body goes along once the handler read the body to
/// its end; one whose body was left unread (a `405` answered without reading it: hyper would
/// still drain it) is closed as without a hand-over, at once: with a 60 s window, the old
/// process does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_read_goes_along_and_one_left_unread_closes_at_once() {
    let mut service = start(
        TempDir::new(),
        Path::new(BIN),
        &["--hand-over-window", "60s"],
    );
    let mut read = Http::connect(service.addr).await.unwrap();
    let created = read
        .request("POST", "/accounts", Some(r#"{"id":"handed","balance":5}"#))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{created:?}");
    assert!(!created.closes());
    // Head and body in one write: hyper drains the unread body and keeps the connection.
    let mut unread = Http::connect(service.addr).await.unwrap();
    let body = r#"{"not":"read"}"#;
    let head = format!(
        "POST /whoami HTTP/1.1\r\nHost: grace\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    unread
        .raw()
        .get_mut()
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    let refused = unread.read().await.unwrap();
    assert_eq!(refused.status, 405, "{refused:?}");
    assert!(!refused.closes());

    let t = Instant::now();
    let new = service.upgraded(service.hup());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the old process waited {:?} for the connection with an unread body",
        t.elapsed()
    );
    assert_eq!(
        whoami(&mut read).await,
        Ok(new),
        "the connection whose body was read"
    );
    // The new generation's metrics count what it received.
    let metrics = read.request("GET", "/metrics", None).await.unwrap();
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l == "grace_connections_received_total 1"),
        "{}",
        metrics.body
    );
    assert!(
        unread.read().await.is_err(),
        "the connection whose body was left unread was kept open"
    );
    let report = &service.restart_reports()[0];
    assert_eq!(report["at_start"]["idle"], 2, "{report}");
    assert_eq!(report["handed_over"], 1, "{report}");
    assert_eq!(report["closed"], 1, "{report}");
    service.stop();
}

/// A force (a second SIGTERM) in the middle of a hand-over: whatever went along is answered
/// by the new process, whatever did not is closed (never answered by the old one, never left
/// hanging), and the old process's report accounts for every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_during_the_hand_over_leaves_every_connection_accounted_for() {
    const CONNS: usize = 2000;
    // The demo's generations inherit it: each holds a thousand connections.
    grace_testkit::process::raise_nofile();
    for round in 0..3 {
        let mut service = start(TempDir::new(), Path::new(BIN), &[]);
        let old = service.current();
        let mut held = Vec::new();
        for _ in 0..CONNS {
            let mut http = Http::connect(service.addr).await.unwrap();
            assert_eq!(whoami(&mut http).await, Ok(old));
            held.push(http);
        }
        service.hup();
        // The old process takes the new one's readiness as its cue to hand over (a stop
        // before that wins over the upgrade: another test's matter).
        service.wait_log("draining this one", 1);
        let new = service.pid().expect("the new generation's pid");
        service.pids.push(new);
        // Two signals a moment apart (the same signal pending twice is delivered once).
        for _ in 0..2 {
            common::signal(old, rustix::process::Signal::TERM);
            tokio::time::sleep(Duration::from_millis(10 * round)).await;
        }
        // Each is answered once: by the new process, or by the old one (a request that came
        // before its connection's turn is served there, then the connection goes or
        // closes); or its connection is closed (the force).
        let answers = join_all(held.iter_mut().map(whoami)).await;
        let by_new = answers.iter().filter(|a| **a == Ok(new)).count();
        let wrong: Vec<_> = answers
            .iter()
            .filter(|a| matches!(a, Ok(p) if *p != new && *p != old))
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: answered by another process: {wrong:?}"
        );
        let log = service.wait_log("\"trigger\":\"restart\"", 1);
        let report: Value = serde_json::from_str(&log).unwrap_or_else(|e| panic!("{e}: {log}"));
        let forced = report["forced"].as_array().map_or(0, Vec::len) as u64;
        let handed = report["handed_over"].as_u64().unwrap();
        let closed = report["closed"].as_u64().unwrap();
        assert_eq!(
            handed + closed + forced,
            CONNS as u64,
            "round {round}: every connection accounted for: {report}"
        );
        eprintln!("round {round}: handed over {handed}, closed {closed}, forced {forced}");
        assert!(
            by_new as u64 <= handed,
            "round {round}: {by_new} answered by the new process: {report}"
        );
        // Forced or not (status 3 or 0), the old process is gone.
        let gone = common::wait_gone(old, PATIENCE);
        assert!(
            matches!(gone, common::Gone::Exited(Some(0 | 3))),
            "round {round}: {gone:?}"
        );
        service.retired.insert(old);
        service.stop();
    }
}

/// Signals at the worst moment: the new process is upgraded again while the first is still
/// handing over (its busy connections go only once their responses are written). Every
/// request in flight is answered exactly once, in full; the middle generation takes what
/// the first still hands over and passes it on, so every connection goes on working; the
/// two old generations exit cleanly, and one process is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_during_a_hand_over_loses_no_request() {
    const IDLE: usize = 300;
    const BUSY: usize = 20;
    // The demo's generations inherit it: each holds a thousand connections.
    grace_testkit::process::raise_nofile();
    let mut service = start(TempDir::new(), Path::new(BIN), &[]);
    let first = service.current();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut http = Http::connect(service.addr).await.unwrap();
        assert_eq!(whoami(&mut http).await, Ok(first));
        idle.push(http);
    }
    let mut busy = Vec::new();
    for _ in 0..BUSY {
        let mut http = Http::connect(service.addr).await.unwrap();
        http.send("GET", "/sleep/800", None).await.unwrap();
        busy.push(http);
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // the sleeps are in flight
    let second = service.upgrade();
    let third = service.upgrade();
    let generations = [first, second, third];

    for (i, http) in busy.iter_mut().enumerate() {
        let slept = http
            .read()
            .await
            .unwrap_or_else(|e| panic!("busy {i}: {e}"));
        assert_eq!(slept.status, 200, "busy {i}: {slept:?}");
        assert_eq!(slept.body, "slept 800 ms\n", "busy {i}");
    }
    // Nothing more came after the sleeps' answers (none answered twice).
    let after = join_all(busy.iter_mut().map(nothing_more)).await;
    for (i, after) in after.into_iter().enumerate() {
        assert!(
            after.is_ok() || after == Err("the connection was closed".into()),
            "busy {i}: {after:?}"
        );
    }
    let mut answered = 0;
    for (i, http) in busy.iter_mut().chain(idle.iter_mut()).enumerate() {
        match whoami(http).await {
            Ok(pid) => {
                assert!(
                    generations.contains(&pid),
                    "connection {i}: answered by {pid}"
                );
                answered += 1;
            }
            // Closed before any byte of an answer (a client retries that safely); not a
            // wrong, partial or doubled answer.
            Err(e) => assert!(e.starts_with("request failed"), "connection {i}: {e}"),
        }
    }
    // The two old generations end; the second may be reaped by the first, its parent, if
    // it ends first (it drains while the first still hands its busy connections over).
    for p in [first, second] {
        let gone = common::wait_gone(p, PATIENCE);
        assert!(
            matches!(
                gone,
                common::Gone::Exited(Some(0)) | common::Gone::Elsewhere
            ),
            "{p}: {gone:?}"
        );
        service.retired.insert(p);
    }
    let reports = service.restart_reports();
    assert_eq!(reports.len(), 2, "{reports:?}");
    for report in &reports {
        assert!(report.get("forced_by").is_none(), "{report}");
    }
    // The second generation takes what the first hands over until the first is done, and
    // passes it on: every connection is kept.
    assert_eq!(
        answered,
        IDLE + BUSY,
        "connections kept across both upgrades"
    );
    service.stop();
}

/// The new generation is killed (SIGKILL) right after it said it was ready, while the old one
/// hands it 1,000 idle keep-alive connections: the old generation takes back every
/// connection the new one had not acknowledged, keeps (and reopens) its listeners, and
/// serves on: no client reconnects, the pid file names it again, the upgrade is reported as
/// failed. Repeated with the kill at different moments of the hand-over (at once, and a few
/// milliseconds in; a request in flight holds the hand-over open meanwhile). Then a good
/// upgrade still hands everything over. (Before: every connection ended with EOF, the port
/// refused connections, the old process exited 0 and the pid file named the dead one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_killed_during_the_hand_over_gives_every_connection_back() {
    const CONNS: usize = 1_000;
    // The demo's generations inherit it: each holds a thousand connections.
    grace_testkit::process::raise_nofile();
    let scratch = TempDir::new();
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let mut service = start(scratch, &program, &[]);
    let first = service.current();
    let mut held = clients(service.addr, CONNS, first).await;
    let rounds: [u64; 6] = [0, 0, 2, 5, 10, 30];
    for (round, &delay_ms) in rounds.iter().enumerate() {
        // A request in flight: its connection goes only once answered, which holds the
        // hand-over open (the kill is sure to land in it, whatever the delay).
        let slow_request = {
            let addr = service.addr;
            tokio::spawn(async move {
                let mut http = Http::connect(addr).await.unwrap();
                let resp = http.request("GET", "/sleep/1500", None).await;
                (
                    resp.map(|r| r.status).map_err(|e| e.to_string()),
                    whoami(&mut http).await,
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let new = service.upgrade(); // SIGHUP, then the pid file names the new process
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        common::signal(new, rustix::process::Signal::KILL);
        service.pids.pop(); // reaped by the old generation, not here
        // Killed at once, it may die before its ready message is read: then the upgrade
        // fails as before ready (nothing was handed over). Either way it fails.
        service.wait_log("upgrade failed", round + 1);
        assert_eq!(service.pid(), Some(first), "round {round}: the pid file");
        assert!(common::alive(first), "round {round}: the old process died");
        all_answer_from(
            &mut held,
            first,
            &format!("round {round} (kill after {delay_ms} ms)"),
        )
        .await;
        // The port still accepts, and this process answers.
        let mut fresh = Http::connect(service.addr).await.unwrap();
        assert_eq!(
            whoami(&mut fresh).await,
            Ok(first),
            "round {round}: a new connection"
        );
        let (status, next) = slow_request.await.unwrap();
        assert_eq!(status, Ok(200), "round {round}: the request in flight");
        assert_eq!(next, Ok(first), "round {round}: its connection after it");
        let metrics = fresh.request("GET", "/metrics", None).await.unwrap();
        let failed = format!("grace_upgrades_total{{outcome=\"failed\"}} {}", round + 1);
        assert!(
            metrics.body.lines().any(|l| l == failed),
            "round {round}: no {failed:?} in\n{}",
            metrics.body
        );
    }
    // The request in flight holds the hand-over open for 1.5 s: a kill a few milliseconds
    // after the pid file names the new process lands in it.
    let in_hand_over = service
        .stderr()
        .lines()
        .filter(|l| l.contains("went during the hand-over") && l.contains("taken_back"))
        .count();
    assert!(
        in_hand_over >= 3,
        "{in_hand_over} of 6 kills landed in the hand-over"
    );
    assert!(
        service.restart_reports().is_empty(),
        "the old process drained"
    );
    // A good upgrade after all that hands every connection over.
    let old = service.hup();
    let new = service.upgraded(old);
    all_answer_from(&mut held, new, "after a good upgrade").await;
    let reports = service.restart_reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0]["handed_over"], CONNS, "{}", reports[0]);
    service.stop();
}

/// Reads one HTTP/2 frame header (9 bytes) from `stream`: its type, or what came instead.
async fn first_frame_type(stream: &mut tokio::net::TcpStream) -> Result<u8, String> {
    let mut head = [0u8; 9];
    match tokio::time::timeout(PATIENCE, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) if &head[..4] == b"HTTP" => Err(format!(
            "answered as HTTP/1: {:?}",
            String::from_utf8_lossy(&head)
        )),
        Ok(Ok(_)) => Ok(head[3]),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
        Err(_) => Err("nothing within the patience".into()),
    }
}

/// HTTP/2's connection preface, then an empty SETTINGS frame.
const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Issue 20, item 4. Connections whose protocol was not told yet at an upgrade: a silent one
/// whose h2c (prior knowledge) client sends its preface only after the upgrade, and one that
/// sent just `PR`, are sniffed by the new generation, which speaks HTTP/2 on them (before:
/// the silent one was served as HTTP/1, and the `PR` one was closed). A request head of
/// 70 KiB, more than a hand-over carries, stays with the old generation, which answers it
/// (before: EOF). And at a drain (SIGTERM), a connection that sent only `P` is answered
/// once its request completes (before: EOF, where `G` was answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_not_told_yet_are_sniffed_by_the_new_generation_and_a_large_head_stays() {
    let scratch = TempDir::new();
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let mut service = start(scratch, &program, &[]);
    let first = service.current();
    let mut silent = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    partial.write_all(b"PR").await.unwrap();
    let mut big = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    let head = format!(
        "GET /whoami HTTP/1.1\r\nHost: grace\r\nX-Big: {}\r\n",
        "a".repeat(70 * 1024)
    );
    big.write_all(head.as_bytes()).await.unwrap();
    // Let the server read what was sent before the upgrade.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old = service.hup();
    let new = service.next(old);
    // The big head completes: the old generation answers it (and closes it: it drains).
    big.write_all(b"\r\n").await.unwrap();
    let mut reader = tokio::io::BufReader::new(&mut big);
    let answered = read_response(&mut reader)
        .await
        .expect("the 70 KiB head was answered");
    assert_eq!(answered.status, 200, "{answered:?}");
    assert_eq!(
        answered.json()["pid"].as_u64(),
        Some(u64::from(first)),
        "answered by the old generation: {answered:?}"
    );
    service.retire_old();
    // The h2c clients go on: the new generation speaks HTTP/2 to both.
    silent.write_all(H2_START).await.unwrap();
    assert_eq!(
        first_frame_type(&mut silent).await,
        Ok(0x4),
        "silent: SETTINGS"
    );
    partial.write_all(&H2_START[2..]).await.unwrap();
    assert_eq!(
        first_frame_type(&mut partial).await,
        Ok(0x4),
        "`PR`: SETTINGS"
    );
    let status = service.status().await;
    assert!(
        status["handed_over"]["received"].as_u64() >= Some(2),
        "{status}"
    );
    assert_eq!(status["pid"], new, "{status}");

    // At a drain: `P`, then the rest of a POST once the drain has begun.
    let mut p = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    p.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    common::signal(new, rustix::process::Signal::TERM);
    service.wait_log("drain started", 2);
    let body = r#"{"id":"late","balance":1}"#;
    let rest = format!(
        "OST /accounts HTTP/1.1\r\nHost: grace\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    p.write_all(rest.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(&mut p);
    let answered = read_response(&mut reader)
        .await
        .expect("`P` then a POST, at a drain");
    assert_eq!(answered.status, 201, "{answered:?}");
    assert!(answered.closes(), "{answered:?}");
    service.retire(service.pids.len());
}
