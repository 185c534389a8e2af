//! `upgrade-bench`: throughput, latency and reconnects during a burst of zero-downtime
//! upgrades against steady state, with and without the hand-over of HTTP/1.1 connections
//! to the new process, and the time from the trigger (SIGHUP) to the new process serving.
//!
//! It runs itself as the server (`--serve`: grace with `Restart`, `GET /` answers the
//! serving process's pid; `--no-hand-over` sets `hand_over_window(Duration::ZERO)`), puts
//! closed-loop keep-alive load on it from tokio tasks (plus some clients that open a fresh
//! connection per request), holds `--idle` more keep-alive connections that each send one
//! request every `--pause-ms` in steady state and one in the pause after each upgrade,
//! measures a steady window, then a window with `--upgrades` SIGHUPs in a row (each sent
//! once the previous new process is ready and the old one has exited, plus the pause), and
//! prints markdown on stdout.
//! Each of `--rounds` runs both modes (a fresh server each), alternating which goes first.
//!
//! A request is retried only when a reused idle keep-alive connection closed before any
//! response byte; anything else counts as failed. Every TCP connect of a keep-alive or idle
//! connection after its first is a reconnect.
//!
//! ```sh
//! cargo run --release -p grace-bench --bin upgrade-bench -- --upgrades 20 --rounds 3 --idle 1000
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rustix::process::{Pid, Resource, Signal, WaitOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

#[derive(Parser, Debug, Clone)]
#[command(about = "Throughput and latency during zero-downtime upgrades (grace)")]
struct Args {
    /// Keep-alive client connections (closed loop).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Clients that open a fresh connection for every request.
    #[arg(long, default_value_t = 2)]
    fresh: usize,
    /// Length of the steady-state window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    steady: f64,
    /// Upgrades in the burst.
    #[arg(long, default_value_t = 20)]
    upgrades: usize,
    /// Pause after each new process is ready (and the old one gone) before the next SIGHUP,
    /// in milliseconds.
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
    /// Idle keep-alive connections, each sending one request per pause.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Rounds; each runs both modes, with hand-over and without.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Server: close idle connections at an upgrade instead of handing them over (internal).
    #[arg(long, hide = true)]
    no_hand_over: bool,
    /// Run as the server (internal).
    #[arg(long, hide = true)]
    serve: bool,
    /// Server: where to write its pid (internal).
    #[arg(long, hide = true)]
    pid_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Both sides hold a socket per connection: raise the soft fd limit to the hard one.
    let mut nofile = rustix::process::getrlimit(Resource::Nofile);
    nofile.current = nofile.maximum;
    let _ = rustix::process::setrlimit(Resource::Nofile, nofile);
    if args.serve {
        return serve(args);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(drive(args))
}

// --- the server --------------------------------------------------------------------------

fn serve(args: Args) -> Result<()> {
    let restart = grace_http::Restart::new().ready_timeout(Duration::from_secs(30));
    let restart = match &args.pid_file {
        Some(p) => restart.pid_file(p),
        None => restart,
    };
    let restart = if args.no_hand_over {
        restart.hand_over_window(Duration::ZERO)
    } else {
        restart
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let server = match grace_http::inherited_listeners()? {
            Some(l) => grace_http::Server::from_inherited(l),
            None => grace_http::Server::bind("127.0.0.1:0").await?,
        };
        let addr = server.local_addrs()[0].to_string();
        let pid = std::process::id().to_string();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || std::future::ready(pid.clone())),
        );
        let serve = server
            .drain_policy(
                grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(10)),
            )
            .serve(app)
            .with_signals()
            .with_restart(restart);
        println!("listening on {addr}");
        let report = serve.await?;
        println!("report {} {}", report.handed_over, report.closed);
        anyhow::Ok(())
    })?;
    runtime.shutdown_background();
    Ok(())
}

// --- the load ----------------------------------------------------------------------------

#[derive(Default)]
struct Window {
    latencies_us: Vec<u32>,
    failed: u64,
    retried: u64,
    refused: u64,
    /// TCP connects of a keep-alive or idle connection after its first.
    reconnects: u64,
}

/// Everything the clients record, per window.
#[derive(Default)]
struct Record {
    steady: Window,
    burst: Window,
    /// The idle connections: in steady state, then from the first upgrade to the end.
    idle: [Window; 2],
    /// When a response from each pid was first seen.
    first_seen: HashMap<u32, Instant>,
    /// The servers' shutdown reports: how many, connections handed over, closed.
    reports: (u64, u64, u64),
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Warmup,
    Steady,
    Burst,
    Done,
}

struct Shared {
    phase: Mutex<Phase>,
    stop: AtomicBool,
    record: Mutex<Record>,
    /// Requests made by the idle connections (one per probe each).
    probed: AtomicUsize,
}

impl Shared {
    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap()
    }
}

struct Conn {
    io: BufReader<TcpStream>,
    reused: bool,
}

async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
    let s = TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(Conn {
        io: BufReader::new(s),
        reused: false,
    })
}

enum Outcome {
    Ok(u32, bool),
    NothingReceived,
    Failed,
}

async fn request(conn: &mut Conn, close: bool) -> Outcome {
    let req: &[u8] = if close {
        b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    };
    if conn.io.get_mut().write_all(req).await.is_err() {
        return Outcome::NothingReceived;
    }
    match conn.io.fill_buf().await {
        Ok([]) | Err(_) => return Outcome::NothingReceived,
        Ok(_) => {}
    }
    match read_response(&mut conn.io).await {
        Ok((200, pid, close)) => Outcome::Ok(pid, close),
        _ => Outcome::Failed,
    }
}

async fn read_response(io: &mut BufReader<TcpStream>) -> std::io::Result<(u16, u32, bool)> {
    let mut line = String::new();
    io.read_line(&mut line).await?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut len, mut close) = (0usize, false);
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().unwrap_or(0);
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.trim().eq_ignore_ascii_case("close");
        }
    }
    let mut body = vec![0; len];
    io.read_exact(&mut body).await?;
    let pid = String::from_utf8_lossy(&body).trim().parse().unwrap_or(0);
    Ok((status, pid, close))
}

async fn client(addr: SocketAddr, fresh: bool, shared: Arc<Shared>) {
    let mut conn: Option<Conn> = None;
    let mut connected = false;
    let mut last_pid = 0;
    let mut local: Vec<(Phase, u32)> = Vec::new();
    let mut counts: HashMap<(u8, u8), u64> = HashMap::new(); // (phase, kind)
    let idx = |p: Phase| p as u8;
    while !shared.stop.load(Ordering::Relaxed) {
        let phase = shared.phase();
        let t = Instant::now();
        let mut c = match conn.take() {
            Some(c) => c,
            None => match connect(addr).await {
                Ok(c) => {
                    if connected && !fresh {
                        *counts.entry((idx(phase), 3)).or_default() += 1;
                    }
                    connected = true;
                    c
                }
                Err(e) => {
                    let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        2
                    } else {
                        0
                    };
                    *counts.entry((idx(phase), kind)).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        match request(&mut c, fresh).await {
            Outcome::Ok(pid, close) => {
                local.push((phase, t.elapsed().as_micros() as u32));
                if pid != last_pid {
                    last_pid = pid;
                    let now = Instant::now();
                    shared
                        .record
                        .lock()
                        .unwrap()
                        .first_seen
                        .entry(pid)
                        .or_insert(now);
                }
                if !fresh && !close {
                    c.reused = true;
                    conn = Some(c);
                }
            }
            Outcome::NothingReceived if c.reused => {
                *counts.entry((idx(phase), 1)).or_default() += 1;
            }
            Outcome::NothingReceived | Outcome::Failed => {
                *counts.entry((idx(phase), 0)).or_default() += 1;
            }
        }
        if local.len() >= 4096 {
            flush(&shared, &mut local, &mut counts);
        }
    }
    flush(&shared, &mut local, &mut counts);
}

fn flush(shared: &Shared, local: &mut Vec<(Phase, u32)>, counts: &mut HashMap<(u8, u8), u64>) {
    let mut r = shared.record.lock().unwrap();
    for (phase, us) in local.drain(..) {
        match phase {
            Phase::Steady => r.steady.latencies_us.push(us),
            Phase::Burst => r.burst.latencies_us.push(us),
            _ => {}
        }
    }
    for ((phase, kind), n) in counts.drain() {
        let w = if phase == Phase::Steady as u8 {
            &mut r.steady
        } else if phase == Phase::Burst as u8 {
            &mut r.burst
        } else {
            continue;
        };
        match kind {
            0 => w.failed += n,
            1 => w.retried += n,
            2 => w.refused += n,
            _ => w.reconnects += n,
        }
    }
}

/// One idle keep-alive connection: one request per probe, through a new connection when
/// it was closed (once more if a reused one closed before any response byte).
async fn idle(addr: SocketAddr, c: Conn, mut probes: watch::Receiver<()>, shared: Arc<Shared>) {
    let mut conn = Some(c);
    let mut windows: [Window; 2] = Default::default();
    while probes.changed().await.is_ok() {
        let w = &mut windows[usize::from(shared.phase() != Phase::Steady)];
        for _ in 0..2 {
            let mut c = match conn.take() {
                Some(c) => c,
                None => match connect(addr).await {
                    Ok(c) => {
                        w.reconnects += 1;
                        c
                    }
                    Err(_) => {
                        w.failed += 1;
                        break;
                    }
                },
            };
            match request(&mut c, false).await {
                Outcome::Ok(_, close) => {
                    c.reused = true;
                    conn = (!close).then_some(c);
                    break;
                }
                Outcome::NothingReceived if c.reused => w.retried += 1,
                Outcome::NothingReceived | Outcome::Failed => {
                    w.failed += 1;
                    break;
                }
            }
        }
        shared.probed.fetch_add(1, Ordering::Relaxed);
    }
    let mut r = shared.record.lock().unwrap();
    for (total, w) in r.idle.iter_mut().zip(windows) {
        total.failed += w.failed;
        total.retried += w.retried;
        total.reconnects += w.reconnects;
    }
}

// --- the driver --------------------------------------------------------------------------

/// One request on every idle connection; returns once all have made it, so that they are
/// idle again when the next drain starts.
async fn probe_idle(probe: &watch::Sender<()>, shared: &Shared, idle: usize) {
    let target = shared.probed.load(Ordering::Relaxed) + idle;
    probe.send_replace(());
    while shared.probed.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn pid(raw: u32) -> Pid {
    Pid::from_raw(raw as i32).expect("pid")
}

/// Reaps `raw` once it exits (we are the subreaper); true when it is gone.
fn gone(raw: u32) -> bool {
    match rustix::process::waitpid(Some(pid(raw)), WaitOptions::NOHANG) {
        Ok(Some(_)) => true,
        Ok(None) => false,
        Err(_) => rustix::process::test_kill_process(pid(raw)).is_err(),
    }
}

struct Upgrade {
    ready: Duration,
    first_served: Option<Duration>,
    old_exited: Duration,
}

/// One server, started fresh in one mode: a steady window, then the burst.
struct Run {
    round: usize,
    hand_over: bool,
    steady: Duration,
    burst: Duration,
    record: Record,
    upgrades: Vec<Upgrade>,
}

async fn drive(args: Args) -> Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for i in 0..2 {
            let hand_over = (round + i) % 2 == 0;
            eprintln!("round {}, hand-over {hand_over}", round + 1);
            runs.push(run(&args, round, hand_over).await?);
        }
    }
    report(&args, &runs);
    Ok(())
}

async fn run(args: &Args, round: usize, hand_over: bool) -> Result<Run> {
    let dir = std::env::temp_dir().join(format!(
        "upgrade-bench-{}-{round}-{hand_over}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let pid_file = dir.join("server.pid");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--serve").arg("--pid-file").arg(&pid_file);
    if !hand_over {
        cmd.arg("--no-hand-over");
    }
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(tokio::process::ChildStdout::from_std(
        child.stdout.take().unwrap(),
    )?);
    let mut line = String::new();
    stdout.read_line(&mut line).await?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .context("no address")?
        .parse()?;
    let shared = Arc::new(Shared {
        phase: Mutex::new(Phase::Warmup),
        stop: AtomicBool::new(false),
        record: Mutex::new(Record::default()),
        probed: AtomicUsize::new(0),
    });
    // Every generation writes to this pipe; each one that exits, "report <handed> <closed>".
    let reports = Arc::clone(&shared);
    tokio::spawn(async move {
        let mut line = String::new();
        while stdout.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            let counts: Vec<u64> = match line.trim().strip_prefix("report ") {
                Some(rest) => rest.split(' ').filter_map(|n| n.parse().ok()).collect(),
                None => Vec::new(),
            };
            if let [handed_over, closed] = counts[..] {
                let r = &mut reports.record.lock().unwrap().reports;
                *r = (r.0 + 1, r.1 + handed_over, r.2 + closed);
            }
            line.clear();
        }
    });
    while read_pid(&pid_file) != Some(child.id()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let (probe, probes) = watch::channel(());
    let mut idle_tasks = Vec::new();
    for _ in 0..args.idle {
        let mut c = connect(addr).await.context("idle connection")?;
        if !matches!(request(&mut c, false).await, Outcome::Ok(_, false)) {
            bail!("the first request of an idle connection failed");
        }
        c.reused = true;
        let task = idle(addr, c, probes.clone(), Arc::clone(&shared));
        idle_tasks.push(tokio::spawn(task));
    }
    let mut tasks = Vec::new();
    for i in 0..args.connections + args.fresh {
        tasks.push(tokio::spawn(client(
            addr,
            i >= args.connections,
            Arc::clone(&shared),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    *shared.phase.lock().unwrap() = Phase::Steady;
    let pause = Duration::from_millis(args.pause_ms);
    let steady_t = Instant::now();
    let steady_end = steady_t + Duration::from_secs_f64(args.steady);
    while Instant::now() < steady_end {
        let next = Instant::now() + pause.max(Duration::from_millis(1));
        tokio::time::sleep_until(next.min(steady_end).into()).await;
        probe_idle(&probe, &shared, args.idle).await;
    }
    let steady_took = steady_t.elapsed();

    *shared.phase.lock().unwrap() = Phase::Burst;
    let burst_t = Instant::now();
    let mut upgrades = Vec::new();
    let mut current = child.id();
    for _ in 0..args.upgrades {
        let t = Instant::now();
        rustix::process::kill_process(pid(current), Signal::HUP)?;
        let old = current;
        current = loop {
            match read_pid(&pid_file) {
                Some(p) if p != old => break p,
                _ => {}
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no new process within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let ready = t.elapsed();
        while !gone(old) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        upgrades.push((t, current, ready, t.elapsed()));
        // The idle connections send their request once the old process is gone, halfway
        // through the pause (the next SIGHUP waits for them).
        tokio::time::sleep_until((t + ready + pause / 2).into()).await;
        probe_idle(&probe, &shared, args.idle).await;
        tokio::time::sleep_until((t + ready + pause).into()).await;
    }
    let burst_took = burst_t.elapsed();
    *shared.phase.lock().unwrap() = Phase::Done;
    // A last request on every idle connection, then they end.
    probe_idle(&probe, &shared, args.idle).await;
    drop(probe);
    for t in idle_tasks {
        t.await?;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let t = Instant::now();
    while shared.record.lock().unwrap().reports.0 < args.upgrades as u64
        && t.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let record = std::mem::take(&mut *shared.record.lock().unwrap());
    rustix::process::kill_process(pid(current), Signal::TERM)?;
    while !gone(current) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = child.try_wait();
    let _ = std::fs::remove_dir_all(&dir);

    let upgrades = upgrades
        .into_iter()
        .map(|(t, new, ready, old_exited)| Upgrade {
            ready,
            first_served: record.first_seen.get(&new).map(|s| s.duration_since(t)),
            old_exited,
        })
        .collect();
    Ok(Run {
        round,
        hand_over,
        steady: steady_took,
        burst: burst_took,
        record,
        upgrades,
    })
}

// --- the report --------------------------------------------------------------------------

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Requests/s, p50, p99 and max latency (µs) of a window.
fn latency(w: &Window, took: Duration) -> [f64; 4] {
    let mut l = w.latencies_us.clone();
    l.sort_unstable();
    let rate = l.len() as f64 / took.as_secs_f64();
    [rate, pct(&l, 0.5), pct(&l, 0.99), pct(&l, 1.0)]
}

/// One run's figures: (row label, value, decimals).
fn figures(args: &Args, r: &Run) -> Vec<(String, f64, usize)> {
    let ups = args.upgrades.max(1) as f64;
    let (s, b, [is, ib]) = (&r.record.steady, &r.record.burst, &r.record.idle);
    let [s_rate, s50, s99, s_max] = latency(s, r.steady);
    let [b_rate, b50, b99, b_max] = latency(b, r.burst);
    let (_, handed_over, closed) = r.record.reports;
    let per_upgrade = |f: fn(&Upgrade) -> Option<Duration>| {
        grace_bench::median(&r.upgrades.iter().filter_map(f).map(ms).collect::<Vec<_>>())
    };
    let failed = s.failed + b.failed + is.failed + ib.failed;
    [
        ("steady: req/s", s_rate, 0),
        ("steady: p50 (µs)", s50, 0),
        ("steady: p99 (µs)", s99, 0),
        ("steady: max (µs)", s_max, 0),
        ("upgrade burst: req/s", b_rate, 0),
        ("upgrade burst: p50 (µs)", b50, 0),
        ("upgrade burst: p99 (µs)", b99, 0),
        ("upgrade burst: max (µs)", b_max, 0),
        ("**burst p99 / steady p99**", b99 / s99, 2),
        (
            "failed requests (load and idle, both windows)",
            failed as f64,
            0,
        ),
        ("refused connects", (s.refused + b.refused) as f64, 0),
        (
            &format!(
                "**reconnects per upgrade: {} keep-alive load connections**",
                args.connections
            ),
            b.reconnects as f64 / ups,
            2,
        ),
        (
            &format!("**reconnects per upgrade: {} idle connections**", args.idle),
            ib.reconnects as f64 / ups,
            2,
        ),
        (
            "retried per upgrade (load and idle)",
            (b.retried + ib.retried) as f64 / ups,
            2,
        ),
        (
            "reconnects in steady state (load and idle)",
            (s.reconnects + is.reconnects) as f64,
            0,
        ),
        (
            "server: connections handed over per upgrade",
            handed_over as f64 / ups,
            1,
        ),
        (
            "server: connections closed per upgrade",
            closed as f64 / ups,
            1,
        ),
        (
            "new process ready after SIGHUP, median (ms)",
            per_upgrade(|u| Some(u.ready)),
            1,
        ),
        (
            "first response from it, median (ms)",
            per_upgrade(|u| u.first_served),
            1,
        ),
        (
            "old process exited, median (ms)",
            per_upgrade(|u| Some(u.old_exited)),
            1,
        ),
    ]
    .into_iter()
    .map(|(label, v, d)| (label.to_owned(), v, d))
    .collect()
}

fn table(heads: &[String], columns: &[Vec<(String, f64, usize)>]) {
    println!("| | {} |", heads.join(" | "));
    println!("|---|{}", "---|".repeat(heads.len()));
    for (i, (label, _, _)) in columns[0].iter().enumerate() {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| format!("{:.*}", c[i].2, c[i].1))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
}

fn mode(hand_over: bool) -> &'static str {
    if hand_over {
        "hand-over"
    } else {
        "no hand-over"
    }
}

fn report(args: &Args, runs: &[Run]) {
    println!(
        "{} keep-alive + {} fresh-connection clients, {} idle connections, {} upgrades \
         ({} ms apart once ready), {} rounds\n",
        args.connections, args.fresh, args.idle, args.upgrades, args.pause_ms, args.rounds
    );
    let all: Vec<_> = runs.iter().map(|r| figures(args, r)).collect();
    let medians: Vec<_> = [true, false]
        .iter()
        .map(|&hand_over| {
            let of_mode: Vec<_> = runs
                .iter()
                .zip(&all)
                .filter(|(r, _)| r.hand_over == hand_over)
                .map(|(_, f)| f)
                .collect();
            (0..all[0].len())
                .map(|i| {
                    let (label, _, d) = &of_mode[0][i];
                    (
                        label.clone(),
                        grace_bench::median(&of_mode.iter().map(|f| f[i].1).collect::<Vec<_>>()),
                        *d,
                    )
                })
                .collect()
        })
        .collect();
    let heads = [true, false].map(|h| format!("{}, median", mode(h)));
    table(&heads, &medians);
    println!("\nEach run, in order:\n");
    let heads: Vec<_> = runs
        .iter()
        .map(|r| format!("{}: {}", r.round + 1, mode(r.hand_over)))
        .collect();
    table(&heads, &all);
}
