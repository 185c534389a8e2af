//! Issue 23: WebSockets handed to the next generation at an upgrade, on real `grace-demo`
//! processes with real WebSocket clients (tokio-tungstenite): no close frame, no new TCP
//! connection, no message lost, repeated or reordered; `/ws/counter`'s sequence goes on
//! across generations; a message split around the SIGHUP is answered once; a new
//! generation that does not resume WebSockets, or that fails, leaves them where they were;
//! SIGTERM in the middle of a hand-over gives each socket exactly one outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

use common::{
    BIN, Gone, PATIENCE, Service, TempDir, install_real_binary, replace_file, signal, wait_gone,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A number from the environment, or `default`.
fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `wanted` sockets, or as many as the open-file limit (raised to its hard limit) lets
/// this process and the demo hold, said when fewer.
fn sockets_within_limit(wanted: usize) -> usize {
    let limit = grace_testkit::process::raise_nofile();
    let fit = usize::try_from(limit.saturating_sub(200) / 2).unwrap_or(usize::MAX);
    if fit < wanted {
        eprintln!("REDUCED: {fit} sockets, not {wanted} (RLIMIT_NOFILE's hard limit is {limit})");
    }
    wanted.min(fit)
}

async fn connect(service: &Service, path: &str) -> Ws {
    let url = format!("ws://{}{path}", service.addr);
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(&url))
        .await
        .expect("WebSocket handshake in time")
        .expect("WebSocket handshake");
    ws
}

/// `/ws/counter`'s answer: `(seq, pid, message)`.
fn parse(answer: &str) -> (u64, u32, String) {
    let mut parts = answer.splitn(3, ' ');
    let seq = parts.next().and_then(|s| s.parse().ok());
    let pid = parts.next().and_then(|s| s.parse().ok());
    match (seq, pid, parts.next()) {
        (Some(seq), Some(pid), Some(msg)) => (seq, pid, msg.to_owned()),
        _ => panic!("not a counter answer: {answer:?}"),
    }
}

/// How a socket ended, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// A close frame: its code, and the pid its reason names (`… (pid N)`).
    Closed(u16, u32),
    /// Anything else: an error, the end of the stream, a message out of place.
    Broken(String),
}

/// The pid in a close reason `… (pid N)`.
fn closer(reason: &str) -> u32 {
    reason
        .rsplit_once("(pid ")
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
        .unwrap_or(0)
}

/// The next text message, skipping pongs (counted in `pongs`).
async fn next_text<S>(ws: &mut WebSocketStream<S>, pongs: &mut u64) -> Result<String, Ended>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Err(_) => return Err(Ended::Broken("no answer within the patience".into())),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(Message::Pong(_)))) => *pongs += 1,
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Err(Ended::Closed(u16::from(f.code), closer(&f.reason)));
            }
            Ok(other) => return Err(Ended::Broken(format!("unexpected: {other:?}"))),
        }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    answered: u64,
    pings: u64,
    pongs: u64,
    error: Option<Ended>,
}

/// One `/ws/counter` client: message `n` every `period` (a ping before every tenth), each
/// answered with sequence number `n` before the next goes; records the answering pid.
async fn counter_client(
    mut ws: Ws,
    id: usize,
    period: Duration,
    stop: Arc<AtomicBool>,
    last_pid: Arc<AtomicU32>,
) -> Seen {
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        if n % 10 == 0 {
            if let Err(e) = ws
                .send(Message::Ping(n.to_be_bytes().to_vec().into()))
                .await
            {
                seen.error = Some(Ended::Broken(format!("ping {n}: {e}")));
                return seen;
            }
            seen.pings += 1;
        }
        let msg = format!("{id}-{n}");
        if let Err(e) = ws.send(Message::text(msg.clone())).await {
            // The server's close frame may be waiting to be read: say that.
            seen.error = Some(match next_text(&mut ws, &mut seen.pongs).await {
                Err(closed @ Ended::Closed(..)) => closed,
                _ => Ended::Broken(format!("send {n}: {e}")),
            });
            return seen;
        }
        match next_text(&mut ws, &mut seen.pongs).await {
            Ok(answer) => {
                let (seq, pid, echoed) = parse(&answer);
                if seq != n || echoed != msg {
                    seen.error = Some(Ended::Broken(format!(
                        "sent {msg:?} (#{n}), answered {answer:?}"
                    )));
                    return seen;
                }
                last_pid.store(pid, Ordering::Relaxed);
                seen.answered += 1;
            }
            Err(ended) => {
                seen.error = Some(ended);
                return seen;
            }
        }
    }
    // Every ping answered (each pong goes out before the answer that follows it).
    if seen.pongs != seen.pings {
        seen.error = Some(Ended::Broken(format!(
            "{} pings, {} pongs",
            seen.pings, seen.pongs
        )));
    }
    let _ = ws.close(None).await;
    seen
}

/// HTTP/1.1 keep-alive clients sending `GET /` until stopped: (ok, failures).
fn http_load(
    service: &Service,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    (0..clients)
        .map(|_| {
            let (addr, stop) = (service.addr, Arc::clone(stop));
            tokio::spawn(async move {
                let (mut ok, mut failures) = (0, Vec::new());
                let mut client = grace_testkit::http1::Client::connect(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    match client.get("/").await {
                        Some(r) if r.status == 200 => ok += 1,
                        other => {
                            failures.push(format!("{other:?}"));
                            client = grace_testkit::http1::Client::connect(addr).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (ok, failures)
            })
        })
        .collect()
}

/// Waits until every socket's last answer came from `pid`.
async fn all_answered_by(pids: &[Arc<AtomicU32>], pid: u32) {
    let t = Instant::now();
    loop {
        let behind = pids
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) != pid)
            .count();
        if behind == 0 {
            return;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "{behind} sockets not answered by the new generation {pid}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proof of the issue: `GRACE_WS_SOCKETS` (default 1,000) counter sockets, each
/// sending a numbered message every 50 ms and checking every answer, across
/// `GRACE_WS_UPGRADES` (default 20) upgrades under HTTP load: no close, no error, no gap,
/// no repeat; after each upgrade every socket is answered by the newest pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_outlive_twenty_upgrades_under_load() {
    let sockets = sockets_within_limit(env_or("GRACE_WS_SOCKETS", 1000));
    let upgrades = env_or("GRACE_WS_UPGRADES", 20);
    let mut service = Service::start(
        TempDir::new(),
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "20s"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, last_pids) = counters(&service, sockets, &stop).await;
    let http = http_load(&service, 4, &stop);
    for _ in 0..upgrades {
        let old = service.hup();
        let new = tokio::task::block_in_place(|| service.next(old));
        all_answered_by(&last_pids, new).await;
        tokio::task::block_in_place(|| service.retire_old());
    }
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for c in clients {
        let seen = c.await.unwrap();
        assert_eq!(seen.error, None, "{seen:?}");
        answered += seen.answered;
    }
    let (mut ok, mut failures) = (0, Vec::new());
    for h in http {
        let (o, f) = h.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    eprintln!("{sockets} sockets, {upgrades} upgrades: {answered} messages answered; HTTP {ok} ok");
    assert!(failures.is_empty(), "HTTP failures: {failures:?}");
    assert!(ok > 0);
    tokio::task::block_in_place(|| service.stop());
}

/// Starts `n` counter clients (a message every 50 ms); waits until each was answered by
/// the current generation.
async fn counters(
    service: &Service,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<Seen>>, Vec<Arc<AtomicU32>>) {
    let mut clients = Vec::new();
    let mut last_pids = Vec::new();
    for id in 0..n {
        let ws = connect(service, "/ws/counter").await;
        let last = Arc::new(AtomicU32::new(0));
        last_pids.push(Arc::clone(&last));
        let period = Duration::from_millis(50);
        clients.push(tokio::spawn(counter_client(
            ws,
            id,
            period,
            Arc::clone(stop),
            last,
        )));
    }
    all_answered_by(&last_pids, service.current()).await;
    (clients, last_pids)
}

/// A masked client text frame (RFC 6455 §5.2) carrying `text` (at most 125 bytes).
fn text_frame(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The socket under a client `Ws`, to write raw bytes past tungstenite (which has nothing
/// buffered between two of our exchanges).
fn raw(ws: &mut Ws) -> &mut TcpStream {
    match ws.get_mut() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!("plain TCP"),
    }
}

/// A message written in two TCP writes around the SIGHUP (after 1 to 12 bytes: inside the
/// header, the mask, the payload), the second at a different moment each round (at once,
/// soon, once the new generation is ready, a little after), is answered exactly once, and
/// the sequence goes on. `GRACE_WS_SPLIT_ROUNDS` rounds (default 16), 12 sockets each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_around_the_sighup_is_answered_exactly_once() {
    let rounds = env_or("GRACE_WS_SPLIT_ROUNDS", 16);
    let mut service = Service::start(
        TempDir::new(),
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "10s"],
    );
    let mut sockets = Vec::new();
    for _ in 0..12 {
        sockets.push((connect(&service, "/ws/counter").await, 0u64));
    }
    let mut pongs = 0;
    for round in 0..rounds {
        for (k, (ws, seq)) in sockets.iter_mut().enumerate() {
            let frame = text_frame(&format!("split-{round}-{k}"));
            raw(ws).write_all(&frame[..k + 1]).await.unwrap();
            *seq += 1;
        }
        let old = service.hup();
        match round % 4 {
            0 => {}
            1 => tokio::time::sleep(Duration::from_millis(2)).await,
            2 => {
                tokio::task::block_in_place(|| service.next(old));
            }
            _ => {
                tokio::task::block_in_place(|| service.next(old));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (k, (ws, _)) in sockets.iter_mut().enumerate() {
            let frame = text_frame(&format!("split-{round}-{k}"));
            raw(ws).write_all(&frame[k + 1..]).await.unwrap();
        }
        if round % 4 < 2 {
            tokio::task::block_in_place(|| service.next(old));
        }
        let new = service.current();
        for (k, (ws, seq)) in sockets.iter_mut().enumerate() {
            let answer = next_text(ws, &mut pongs).await.unwrap();
            let (got, pid, msg) = parse(&answer);
            assert_eq!(
                (got, msg.as_str()),
                (*seq, format!("split-{round}-{k}").as_str())
            );
            assert!(pid == old || pid == new, "answered by {pid}");
            // The next message, once the old generation is gone, is the new one's.
            *seq += 1;
        }
        tokio::task::block_in_place(|| service.retire_old());
        for (k, (ws, seq)) in sockets.iter_mut().enumerate() {
            ws.send(Message::text(format!("after-{round}-{k}")))
                .await
                .unwrap();
            let answer = next_text(ws, &mut pongs).await.unwrap();
            assert_eq!(parse(&answer), (*seq, new, format!("after-{round}-{k}")));
        }
    }
    // Nothing more came: no message was answered twice.
    for (ws, _) in &mut sockets {
        let extra = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
        assert!(extra.is_err(), "an extra message: {extra:?}");
    }
    tokio::task::block_in_place(|| service.stop());
}

/// A new generation that exits at start, or never gets ready: the WebSockets stay with the
/// old one, served throughout. One that does not resume WebSockets (its config says
/// `websocket_handover = false`): the upgrade goes through, and the old generation says
/// goodbye (1012) to each as it drains; they come back to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_generation_leaves_websockets_served_or_says_1012() {
    let scratch = TempDir::new();
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let config = scratch.path("grace-demo.toml");
    replace_file(&config, "", false);
    let config_arg = config.display().to_string();
    let mut service = Service::start(
        scratch,
        &program,
        &[
            "--shutdown-timeout",
            "10s",
            "--ready-timeout",
            "3s",
            "--config",
            &config_arg,
        ],
    );
    let first = service.current();
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, last_pids) = counters(&service, 50, &stop).await;
    let answered_again_by_first = || async {
        last_pids.iter().for_each(|p| p.store(0, Ordering::Relaxed));
        all_answered_by(&last_pids, first).await;
    };

    // 1. The new binary exits at start.
    replace_file(&program, "#!/bin/sh\nexit 7\n", true);
    let line = tokio::task::block_in_place(|| service.failed_upgrade(1));
    assert!(line.contains("exited with status 7"), "{line}");
    answered_again_by_first().await;
    // 2. It never gets ready (it holds what it inherited, and sleeps).
    replace_file(&program, "#!/bin/sh\nexec sleep 60\n", true);
    let line = tokio::task::block_in_place(|| service.failed_upgrade(2));
    assert!(line.contains("not ready within"), "{line}");
    answered_again_by_first().await;
    assert!(clients.iter().all(|c| !c.is_finished()), "a socket ended");

    // 3. It does not resume WebSockets: they stay, and hear 1012 as the old one drains.
    install_real_binary(&program);
    replace_file(&config, "websocket_handover = false\n", false);
    tokio::task::block_in_place(|| service.upgrade());
    for c in clients {
        let seen = c.await.unwrap();
        assert_eq!(seen.error, Some(Ended::Closed(1012, first)), "{seen:?}");
    }
    tokio::task::block_in_place(|| service.retire_old());
    // They come back: the new generation answers.
    let mut ws = connect(&service, "/ws/counter").await;
    ws.send(Message::text("back")).await.unwrap();
    let answer = next_text(&mut ws, &mut 0).await.unwrap();
    assert_eq!(parse(&answer), (1, service.current(), "back".into()));
    drop(ws);
    stop.store(true, Ordering::Relaxed);
    tokio::task::block_in_place(|| service.stop());
}

/// Every `{…}` report line of the log: the sum of their `upgraded_handed_over`.
fn upgraded_handed_over(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["upgraded_handed_over"].as_u64())
        .sum()
}

/// SIGTERM to the old generation at moments around its hand-over of `GRACE_WS_SOCKETS`
/// (default 1,000) WebSockets (`GRACE_WS_TERM_DELAYS`, in ms after the first socket was
/// answered by the new generation; -1: as soon as the new generation is ready, before any
/// moved): each socket has exactly one outcome, a close 1001 from the old generation or,
/// handed over, from the new one (stopped too); nothing else. The reports add up: the
/// sockets closed by the new generation are those the old one's report says it handed
/// over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_websocket_hand_over_gives_each_socket_one_outcome() {
    let sockets = sockets_within_limit(env_or("GRACE_WS_SOCKETS", 1000));
    let delays: Vec<i64> = std::env::var("GRACE_WS_TERM_DELAYS")
        .ok()
        .map(|v| v.split(',').filter_map(|d| d.parse().ok()).collect())
        .unwrap_or_else(|| vec![-1, 0, 0, 1, 2, 5]);
    for delay_ms in delays {
        let mut service = Service::start(
            TempDir::new(),
            std::path::Path::new(BIN),
            &["--shutdown-timeout", "10s"],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (clients, last_pids) = counters(&service, sockets, &stop).await;
        let old = service.hup();
        let new = tokio::task::block_in_place(|| service.next(old));
        if let Ok(delay) = u64::try_from(delay_ms) {
            // The hand-over is under way once a socket is answered by the new generation.
            while !last_pids.iter().any(|p| p.load(Ordering::Relaxed) == new) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        signal(old, Signal::TERM);
        let (mut by_old, mut by_new) = (0, 0);
        for c in clients {
            match c.await.unwrap().error {
                Some(Ended::Closed(1001, p)) if p == old => by_old += 1,
                Some(Ended::Closed(1001, p)) if p == new => by_new += 1,
                other => panic!("delay {delay_ms} ms: a socket ended with {other:?}"),
            }
        }
        assert_eq!(wait_gone(old, PATIENCE), Gone::Exited(Some(0)));
        // The new generation, stopped by the old one, is reaped by it.
        let _ = wait_gone(new, PATIENCE);
        service.retired.extend([old, new]);
        let handed = upgraded_handed_over(&service.stderr());
        eprintln!(
            "delay {delay_ms} ms: {by_old} closed by the old generation, {by_new} handed over"
        );
        assert_eq!(handed, by_new, "the reports' upgraded_handed_over");
        assert_eq!(by_old + by_new, sockets as u64);
    }
}

/// `ctl status`, `/metrics` and the report count upgraded connections apart from HTTP/1
/// ones: 10 WebSockets and 3 idle keep-alive connections cross one upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_the_report_count_upgraded_connections_apart() {
    let scratch = TempDir::new();
    let socket = scratch.path("control.sock");
    let socket_arg = socket.display().to_string();
    let mut service = Service::start(
        scratch,
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "10s", "--control-socket", &socket_arg],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, last_pids) = counters(&service, 10, &stop).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = grace_testkit::http1::Client::connect(service.addr).await;
        assert_eq!(c.get("/").await.map(|r| r.status), Some(200));
        idle.push(c);
    }
    let new = tokio::task::block_in_place(|| service.upgrade());
    all_answered_by(&last_pids, new).await;
    tokio::task::block_in_place(|| service.retire_old());
    // The old generation's report.
    assert_eq!(upgraded_handed_over(&service.stderr()), 10);
    // The new one's status (the control socket went to it with the listeners).
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--socket", &socket_arg, "--json", "status"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let handed = &status["handed_over"];
    assert_eq!(handed["upgraded_received"], 10, "{status}");
    assert_eq!(handed["received"], 13, "{status}");
    let text = std::process::Command::new(BIN)
        .args(["ctl", "--socket", &socket_arg, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("received 13 (10 upgraded)"), "{text}");
    // /metrics, over one of the connections handed over.
    let metrics = idle[0].get("/metrics").await.unwrap();
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l == "grace_upgraded_received_total 10"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l == "grace_connections_received_total 13"),
        "{}",
        metrics.body
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert_eq!(c.await.unwrap().error, None);
    }
    tokio::task::block_in_place(|| service.stop());
}

/// Attacks on the hand-over: a client that stops in the middle of a message (half a
/// payload; a 1 MiB frame with one byte sent) keeps its socket with the old generation,
/// which says goodbye (1012) once the window ends and it must exit; one that stopped inside
/// a frame header is between two messages: it moves, the header's first bytes with it, and
/// the new generation answers once the frame is complete; a frame announcing 2^63 bytes is
/// refused by the old generation (the connection ends). The others move as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_message_stays_and_hears_1012() {
    let mut service = Service::start(
        TempDir::new(),
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "10s", "--hand-over-window", "500ms"],
    );
    let first = service.current();
    let mut stuck = Vec::new();
    let big = {
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 20).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4, b'x']);
        f
    };
    let half_payload = text_frame("never finished")[..10].to_vec();
    for partial in [half_payload, big] {
        let mut ws = connect(&service, "/ws/counter").await;
        raw(&mut ws).write_all(&partial).await.unwrap();
        stuck.push(ws);
    }
    let mut absurd = connect(&service, "/ws/counter").await;
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw(&mut absurd).write_all(&header).await.unwrap();
    let frame = text_frame("in two");
    let mut half_header = connect(&service, "/ws/counter").await;
    raw(&mut half_header).write_all(&frame[..1]).await.unwrap();
    let mut fine = connect(&service, "/ws/counter").await;
    // Let the server read what was sent before the upgrade starts.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new = tokio::task::block_in_place(|| service.upgrade());
    // Answered by whichever generation holds the socket then (it moves in its turn).
    fine.send(Message::text("moved")).await.unwrap();
    let (seq, pid, text) = parse(&next_text(&mut fine, &mut 0).await.unwrap());
    assert_eq!((seq, text.as_str()), (1, "moved"));
    assert!(pid == first || pid == new, "{pid}");
    raw(&mut half_header).write_all(&frame[1..]).await.unwrap();
    let (seq, pid, text) = parse(&next_text(&mut half_header, &mut 0).await.unwrap());
    assert_eq!((seq, text.as_str()), (1, "in two"));
    assert!(pid == first || pid == new, "{pid}");
    for (i, ws) in stuck.iter_mut().enumerate() {
        match next_text(ws, &mut 0).await {
            Err(Ended::Closed(1012, pid)) => assert_eq!(pid, first, "socket {i}"),
            other => panic!("socket {i}: {other:?}"),
        }
    }
    // Refused by the old generation: the connection ended, nothing answered.
    match next_text(&mut absurd, &mut 0).await {
        Err(Ended::Broken(e)) => assert!(!e.contains("patience"), "{e}"),
        other => panic!("a 2^63-byte frame: {other:?}"),
    }
    tokio::task::block_in_place(|| service.retire_old());
    // The two that were between messages moved: the new generation answers them.
    for ws in [&mut fine, &mut half_header] {
        ws.send(Message::text("again")).await.unwrap();
        let answer = next_text(ws, &mut 0).await.unwrap();
        assert_eq!(parse(&answer), (2, new, "again".into()));
    }
    drop(fine);
    tokio::task::block_in_place(|| service.stop());
}

/// Another protocol after an upgrade (`Upgrade: lines`, moved with `Movable::raw`): a line
/// begun before the SIGHUP and finished after it is answered exactly once, and the
/// connection goes on in the new generation; `GRACE_WS_SPLIT_ROUNDS` upgrades (default 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_upgraded_protocol_moves_between_its_own_messages() {
    use tokio::io::AsyncBufReadExt;
    let rounds = env_or("GRACE_WS_SPLIT_ROUNDS", 16);
    let mut service = Service::start(
        TempDir::new(),
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "10s"],
    );
    let stream = TcpStream::connect(service.addr).await.unwrap();
    let mut io = tokio::io::BufReader::new(stream);
    io.get_mut()
        .write_all(
            b"GET /lines HTTP/1.1\r\nHost: x\r\nUpgrade: lines\r\nConnection: upgrade\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(io.read_line(&mut head).await.unwrap() > 0, "{head}");
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut answer = String::new();
    for round in 0..rounds {
        io.get_mut()
            .write_all(format!("be{round}").as_bytes())
            .await
            .unwrap();
        let old = service.hup();
        if round % 2 == 1 {
            tokio::task::block_in_place(|| service.next(old));
        }
        io.get_mut()
            .write_all(format!("gun{round}\n").as_bytes())
            .await
            .unwrap();
        if round % 2 == 0 {
            tokio::task::block_in_place(|| service.next(old));
        }
        let new = service.current();
        answer.clear();
        io.read_line(&mut answer).await.unwrap();
        let (pid, line) = answer.trim_end().split_once(' ').unwrap();
        assert_eq!(line, format!("be{round}gun{round}"));
        let pid: u32 = pid.parse().unwrap();
        assert!(pid == old || pid == new, "answered by {pid}");
        tokio::task::block_in_place(|| service.retire_old());
        io.get_mut().write_all(b"after\n").await.unwrap();
        answer.clear();
        io.read_line(&mut answer).await.unwrap();
        assert_eq!(answer, format!("{new} after\n"), "round {round}");
    }
    // Nothing more: no line answered twice.
    let extra = tokio::time::timeout(Duration::from_millis(100), io.read_line(&mut answer)).await;
    assert!(extra.is_err(), "an extra answer: {answer:?}");
    tokio::task::block_in_place(|| service.stop());
}

/// A WebSocket over TLS is not moved (its session's keys are in rustls' memory): at an
/// upgrade it stays with the old generation, served until that one drains, and hears 1012
/// from it (as `Movable::websocket` gives such a connection back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_tls_stays_and_hears_1012() {
    let scratch = TempDir::new();
    let cert = common::cert();
    let (cert_path, key_path) = (scratch.path("cert.pem"), scratch.path("key.pem"));
    replace_file(&cert_path, &cert.cert_pem, false);
    replace_file(&key_path, &cert.key_pem, false);
    let (cert_arg, key_arg) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let mut service = Service::start(
        scratch,
        std::path::Path::new(BIN),
        &[
            "--shutdown-timeout",
            "10s",
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
        ],
    );
    let first = service.current();
    let tls = common::tls_connector(cert.der)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            TcpStream::connect(service.addr).await.unwrap(),
        )
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws/counter", service.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    let before = next_text(&mut ws, &mut 0).await.unwrap();
    assert_eq!(parse(&before), (1, first, "before".into()));
    tokio::task::block_in_place(|| service.upgrade());
    assert_eq!(
        next_text(&mut ws, &mut 0).await,
        Err(Ended::Closed(1012, first))
    );
    tokio::task::block_in_place(|| service.retire_old());
    tokio::task::block_in_place(|| service.stop());
}
