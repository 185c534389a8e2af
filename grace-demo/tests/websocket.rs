//! Issue 23: WebSockets handed to the next generation at an upgrade, on real `grace-demo`
//! processes with real WebSocket clients (tokio-tungstenite): no close frame, no new TCP
//! connection, no message lost, repeated or reordered; `/ws/counter`'s sequence goes on
//! across generations; a message split around the SIGHUP is answered once; a new
//! generation that does not resume WebSockets, or that fails, leaves them where they were;
//! SIGTERM in the middle of a hand-over gives each socket exactly one outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

use common::{BIN, PATIENCE, Service, TempDir, replace_file, signal};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A number from the environment, or `default`.
fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the demo, our child, inherits it).
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
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

/// The next text message, skipping pongs (counted in `pongs`); panics on anything else.
async fn next_text(ws: &mut Ws, pongs: &mut u64) -> Result<String, String> {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Err(_) => return Err("no answer within the patience".into()),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(Message::Pong(_)))) => *pongs += 1,
            Ok(other) => return Err(format!("unexpected: {other:?}")),
        }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    answered: u64,
    pings: u64,
    pongs: u64,
    error: Option<String>,
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
                seen.error = Some(format!("ping {n}: {e}"));
                return seen;
            }
            seen.pings += 1;
        }
        let msg = format!("{id}-{n}");
        if let Err(e) = ws.send(Message::text(msg.clone())).await {
            seen.error = Some(format!("send {n}: {e}"));
            return seen;
        }
        match next_text(&mut ws, &mut seen.pongs).await {
            Ok(answer) => {
                let (seq, pid, echoed) = parse(&answer);
                if seq != n || echoed != msg {
                    seen.error = Some(format!("sent {msg:?} (#{n}), answered {answer:?}"));
                    return seen;
                }
                last_pid.store(pid, Ordering::Relaxed);
                seen.answered += 1;
            }
            Err(e) => {
                seen.error = Some(format!("message {n}: {e}"));
                return seen;
            }
        }
    }
    // Every ping answered (each pong goes out before the answer that follows it).
    if seen.pongs != seen.pings {
        seen.error = Some(format!("{} pings, {} pongs", seen.pings, seen.pongs));
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
    let sockets = env_or("GRACE_WS_SOCKETS", 1000);
    let upgrades = env_or("GRACE_WS_UPGRADES", 20);
    let nofile = raise_nofile();
    let sockets = sockets.min(nofile.saturating_sub(200) as usize / 2);
    let mut service = Service::start(
        TempDir::new(),
        std::path::Path::new(BIN),
        &["--shutdown-timeout", "20s"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut last_pids = Vec::new();
    let mut clients = Vec::new();
    for id in 0..sockets {
        let ws = connect(&service, "/ws/counter").await;
        let last = Arc::new(AtomicU32::new(0));
        last_pids.push(Arc::clone(&last));
        clients.push(tokio::spawn(counter_client(
            ws,
            id,
            Duration::from_millis(50),
            Arc::clone(&stop),
            last,
        )));
    }
    let http = http_load(&service, 4, &stop);
    all_answered_by(&last_pids, service.current()).await;
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
