//! `upgrade-bench`: throughput and latency during a burst of zero-downtime upgrades against
//! steady state, and the time from the trigger (SIGHUP) to the new process serving.
//!
//! It runs itself as the server (`--serve`: grace with `Restart`, `GET /` answers the
//! serving process's pid), puts closed-loop keep-alive load on it from tokio tasks (plus
//! some clients that open a fresh connection per request), measures a steady window, then
//! a window with `--upgrades` SIGHUPs in a row (each sent once the previous new process is
//! ready), and prints markdown on stdout. A request is retried only when a reused idle
//! keep-alive connection closed before any response byte; anything else counts as failed.
//!
//! ```sh
//! cargo run --release -p grace-bench --bin upgrade-bench -- --upgrades 20
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rustix::process::{Pid, Signal, WaitOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
    /// Pause after each new process is ready before the next SIGHUP, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
    /// Run as the server (internal).
    #[arg(long, hide = true)]
    serve: bool,
    /// Server: where to write its pid (internal).
    #[arg(long, hide = true)]
    pid_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
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
            .shutdown_timeout(Duration::from_secs(10))
            .serve(app)
            .with_signals()
            .with_restart(restart);
        println!("listening on {addr}");
        serve.await?;
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
}

/// Everything the clients record, per window.
#[derive(Default)]
struct Record {
    steady: Window,
    burst: Window,
    /// When a response from each pid was first seen.
    first_seen: HashMap<u32, Instant>,
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
    let mut last_pid = 0;
    let mut local: Vec<(Phase, u32)> = Vec::new();
    let mut counts: HashMap<(u8, u8), u64> = HashMap::new(); // (phase, kind)
    let idx = |p: Phase| p as u8;
    while !shared.stop.load(Ordering::Relaxed) {
        let phase = shared.phase();
        let t = Instant::now();
        let mut c = match conn.take() {
            Some(c) => c,
            None => match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    Conn {
                        io: BufReader::new(s),
                        reused: false,
                    }
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
            _ => w.refused += n,
        }
    }
}

// --- the driver --------------------------------------------------------------------------

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

async fn drive(args: Args) -> Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    let dir = std::env::temp_dir().join(format!("upgrade-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pid_file = dir.join("server.pid");
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(&exe)
        .arg("--serve")
        .arg("--pid-file")
        .arg(&pid_file)
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
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut stdout, &mut sink).await;
    });
    while read_pid(&pid_file) != Some(child.id()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let shared = Arc::new(Shared {
        phase: Mutex::new(Phase::Warmup),
        stop: AtomicBool::new(false),
        record: Mutex::new(Record::default()),
    });
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
    let steady_t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.steady)).await;
    let steady_took = steady_t.elapsed();

    *shared.phase.lock().unwrap() = Phase::Burst;
    let burst_t = Instant::now();
    let mut upgrades = Vec::new();
    let mut current = child.id();
    let mut old_pids = Vec::new();
    for _ in 0..args.upgrades {
        let t = Instant::now();
        rustix::process::kill_process(pid(current), Signal::HUP)?;
        let new = loop {
            match read_pid(&pid_file) {
                Some(p) if p != current => break p,
                _ => {}
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no new process within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let ready = t.elapsed();
        // Time the old process's drain and exit meanwhile.
        let old = current;
        old_pids.push(tokio::spawn(async move {
            while !gone(old) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            t.elapsed()
        }));
        current = new;
        upgrades.push((t, new, ready));
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    // Let the last drains finish within the burst window.
    let mut exited = Vec::new();
    for watcher in old_pids {
        exited.push(watcher.await?);
    }
    let burst_took = burst_t.elapsed();
    *shared.phase.lock().unwrap() = Phase::Done;
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    rustix::process::kill_process(pid(current), Signal::TERM)?;
    while !gone(current) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = child.try_wait();
    let _ = std::fs::remove_dir_all(&dir);

    let record = shared.record.lock().unwrap();
    let measured: Vec<Upgrade> = upgrades
        .iter()
        .zip(&exited)
        .map(|((t, new, ready), exited)| Upgrade {
            ready: *ready,
            first_served: record.first_seen.get(new).map(|s| s.duration_since(*t)),
            old_exited: *exited,
        })
        .collect();
    report(&args, &record, steady_took, burst_took, &measured);
    Ok(())
}

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

fn report(args: &Args, r: &Record, steady: Duration, burst: Duration, ups: &[Upgrade]) {
    println!(
        "{} keep-alive + {} fresh-connection clients, {} upgrades ({} ms apart once ready)\n",
        args.connections, args.fresh, args.upgrades, args.pause_ms
    );
    println!(
        "| window | duration (s) | requests | req/s | p50 (µs) | p99 (µs) | max (µs) | failed | refused | retried (idle conn closed) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, w, d) in [
        ("steady", &r.steady, steady),
        ("upgrade burst", &r.burst, burst),
    ] {
        let mut l = w.latencies_us.clone();
        l.sort_unstable();
        println!(
            "| {name} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            d.as_secs_f64(),
            l.len(),
            l.len() as f64 / d.as_secs_f64(),
            pct(&l, 0.5),
            pct(&l, 0.99),
            pct(&l, 1.0),
            w.failed,
            w.refused,
            w.retried
        );
    }
    let stat = |f: &dyn Fn(&Upgrade) -> Option<Duration>| {
        let mut v: Vec<f64> = ups.iter().filter_map(f).map(ms).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return "n/a".to_owned();
        }
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        format!("{:.1} / {:.1} / {:.1}", at(0.0), at(0.5), at(1.0))
    };
    println!("\n| per upgrade, from SIGHUP | min / median / max (ms) |");
    println!("|---|---|");
    println!(
        "| new process ready (pid file rewritten) | {} |",
        stat(&|u| Some(u.ready))
    );
    println!(
        "| first response from the new process | {} |",
        stat(&|u| u.first_served)
    );
    println!(
        "| old process drained and exited | {} |",
        stat(&|u| Some(u.old_exited))
    );
}
