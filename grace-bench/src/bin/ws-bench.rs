//! `ws-bench`: WebSockets (and idle HTTP/1.1 connections) across upgrades of the release
//! `grace-demo` (issue 23).
//!
//! - `--mode handover`: how long the old process's `hand_over` phase (its report) takes to
//!   pass `--conns` idle WebSockets (`/ws/counter`, one message answered each) and, in the
//!   other run of each round, as many idle HTTP/1.1 keep-alive connections; the two kinds
//!   interleaved, the order alternating. Afterwards every connection is checked: answered by
//!   the new process (the WebSocket's sequence going on), none failed.
//! - `--mode latency`: `--sockets` WebSockets on `/ws` each echoing a message every 50 ms
//!   and `--http` HTTP/1.1 keep-alive clients each sending `GET /` every 5 ms, in a steady
//!   window (`--steady` s) and then through a burst of `--upgrades` upgrades (each SIGHUP
//!   once the previous old process has exited, plus 100 ms); p50/p99/max of each in both
//!   windows and the p99 ratios, per round.
//!
//! ```sh
//! cargo build --release -p grace-bench --bin ws-bench -p grace-demo
//! ./target/release/ws-bench --demo target/release/grace-demo --mode handover --conns 10000 --rounds 3
//! ./target/release/ws-bench --demo target/release/grace-demo --mode latency --rounds 3
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
struct Args {
    /// The grace-demo binary (a release build).
    #[arg(long)]
    demo: PathBuf,
    /// `handover` or `latency`.
    #[arg(long, default_value = "handover")]
    mode: String,
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    #[arg(long, default_value_t = 8)]
    http: usize,
    #[arg(long, default_value_t = 5)]
    upgrades: usize,
    /// Seconds of steady state before the burst.
    #[arg(long, default_value_t = 5.0)]
    steady: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    grace_bench::raise_nofile()?;
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.mode.as_str() {
        "handover" => rt.block_on(handover(&args)),
        "latency" => rt.block_on(latency(&args)),
        other => bail!("unknown mode {other:?}"),
    }
}

/// A running `grace-demo`: its first process, address, pid file and log.
struct Demo {
    first: Child,
    addr: SocketAddr,
    pid_file: PathBuf,
    log: PathBuf,
    dir: PathBuf,
}

impl Demo {
    fn start(bin: &Path, tag: &str) -> Result<Demo> {
        let dir = std::env::temp_dir().join(format!("ws-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pid_file = dir.join("pid");
        let log = dir.join("stderr.log");
        let db = format!("sqlite://{}?mode=rwc", dir.join("ledger.db").display());
        let mut first = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--db", &db, "--pid-file"])
            .arg(&pid_file)
            .args(["--shutdown-timeout", "60s", "--hand-over-window", "30s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting grace-demo")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(first.stdout.take().context("stdout")?),
            &mut line,
        )?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .context("no `listening on` line")?
            .parse()?;
        Ok(Demo {
            first,
            addr,
            pid_file,
            log,
            dir,
        })
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGHUP to `old`; returns the new pid once the pid file names it (it is ready).
    async fn upgrade(&self, old: u32) -> Result<u32> {
        signal(old, rustix::process::Signal::HUP);
        let t = Instant::now();
        loop {
            if let Some(p) = self.pid().filter(|&p| p != old) {
                return Ok(p);
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("no new process within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The reports in the log, in the order they were written.
    fn reports(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGTERM to `pid` (the last generation) and waits for every process to be gone.
    async fn stop(mut self, last: u32) {
        signal(last, rustix::process::Signal::TERM);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.first.wait();
            // Later generations were re-parented here (subreaper): reap them all.
            while rustix::process::wait(rustix::process::WaitOptions::empty()).is_ok() {}
            let _ = std::fs::remove_dir_all(&self.dir);
        })
        .await;
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Blocks until `pid` (our child, or re-parented here) has exited.
async fn reap(pid: u32) {
    let _ = tokio::task::spawn_blocking(move || {
        rustix::process::Pid::from_raw(pid as i32)
            .map(|p| rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty()))
    })
    .await;
}

/// A masked client text frame (≤ 125 bytes).
fn frame(text: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one (unmasked, short) server frame's payload.
async fn read_frame(io: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            io.read_exact(&mut l).await?;
            usize::from(u16::from_be_bytes(l))
        }
        127 => bail!("frame too long"),
        n => usize::from(n),
    };
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await?;
    if head[0] & 0x0f != 1 {
        bail!(
            "not a text frame: {head:?} {:?}",
            String::from_utf8_lossy(&payload)
        );
    }
    Ok(payload)
}

/// Reads a response head up to its blank line; returns it.
async fn read_head(io: &mut BufReader<TcpStream>) -> Result<String> {
    let mut head = String::new();
    loop {
        let n = io.read_line(&mut head).await?;
        if n == 0 {
            bail!("closed in the head");
        }
        if head.ends_with("\r\n\r\n") {
            return Ok(head);
        }
    }
}

/// A WebSocket to `path`, its handshake done.
async fn websocket(addr: SocketAddr, path: &str) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut io = BufReader::new(s);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    io.get_mut().write_all(req.as_bytes()).await?;
    let head = read_head(&mut io).await?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("handshake: {head:?}");
    }
    Ok(io)
}

/// One `GET path` on a keep-alive connection: the status and body.
async fn get(io: &mut BufReader<TcpStream>, path: &str) -> Result<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    io.get_mut().write_all(req.as_bytes()).await?;
    let head = read_head(io).await?;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .context("no content-length")?;
    let mut body = vec![0; len];
    io.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Opens `n` connections with `open`, 256 at a time.
async fn open_all<F, Fut>(n: usize, open: F) -> Result<Vec<BufReader<TcpStream>>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<BufReader<TcpStream>>> + Send + 'static,
{
    let mut all = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + 256).min(n);
        let batch: Vec<_> = (start..end).map(|i| tokio::spawn(open(i))).collect();
        for b in batch {
            all.push(b.await??);
        }
        start = end;
    }
    Ok(all)
}

/// Each connection checked after the upgrade, concurrently: `check(conn)` says whether it
/// was answered by the new process as expected.
async fn check_all<F, Fut>(conns: Vec<BufReader<TcpStream>>, check: F) -> (usize, Vec<String>)
where
    F: Fn(BufReader<TcpStream>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let tasks: Vec<_> = conns.into_iter().map(|c| tokio::spawn(check(c))).collect();
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (ok, failed)
}

/// One hand-over run: `conns` idle connections of one kind across one upgrade.
async fn handover_run(args: &Args, ws: bool, tag: &str) -> Result<(f64, f64, u64)> {
    let demo = Demo::start(&args.demo, tag)?;
    let addr = demo.addr;
    let conns = if ws {
        open_all(args.conns, move |i| async move {
            let mut io = websocket(addr, "/ws/counter").await?;
            io.get_mut()
                .write_all(&frame(format!("{i}").as_bytes()))
                .await?;
            let answer = read_frame(&mut io).await?;
            if !answer.starts_with(b"1 ") {
                bail!("first answer {:?}", String::from_utf8_lossy(&answer));
            }
            Ok(io)
        })
        .await?
    } else {
        open_all(args.conns, move |_| async move {
            let s = TcpStream::connect(addr).await?;
            let mut io = BufReader::new(s);
            let (status, _) = get(&mut io, "/").await?;
            if status != 200 {
                bail!("status {status}");
            }
            Ok(io)
        })
        .await?
    };
    let old = demo.pid().context("no pid")?;
    let t = Instant::now();
    let new = demo.upgrade(old).await?;
    reap(old).await;
    let old_exit = t.elapsed();
    let report = demo
        .reports()
        .pop()
        .context("no report from the old process")?;
    let hand_over_ms = report["phases"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "hand_over"))
        .and_then(|p| p["ms"].as_f64())
        .context("no hand_over phase")?;
    let handed = report["handed_over"].as_u64().unwrap_or(0);
    let (ok, failed) = if ws {
        check_all(conns, move |mut io| async move {
            io.get_mut().write_all(&frame(b"again")).await?;
            let answer = String::from_utf8(read_frame(&mut io).await?)?;
            match answer.split(' ').collect::<Vec<_>>()[..] {
                ["2", pid, "again"] if pid == new.to_string() => Ok(()),
                _ => bail!("answer {answer:?}"),
            }
        })
        .await
    } else {
        check_all(conns, move |mut io| async move {
            let (status, body) = get(&mut io, "/whoami").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            match (status, v["pid"].as_u64()) {
                (200, Some(p)) if p == u64::from(new) => Ok(()),
                _ => bail!("{status} {body}"),
            }
        })
        .await
    };
    if !failed.is_empty() {
        bail!(
            "{} failed after the upgrade, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }
    eprintln!(
        "{tag}: {} {}: hand_over {hand_over_ms:.1} ms, handed over {handed}, old process ({old}) exited after {:.1} ms; {ok} answered by the new process ({new})",
        args.conns,
        if ws { "WebSockets" } else { "HTTP/1.1" },
        old_exit.as_secs_f64() * 1e3
    );
    demo.stop(new).await;
    Ok((hand_over_ms, old_exit.as_secs_f64() * 1e3, handed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn handover(args: &Args) -> Result<()> {
    let (mut ws, mut http) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Interleaved, the order alternating.
        let kinds = match std::env::var("WS_BENCH_ONLY").as_deref() {
            Ok("ws") => vec![true],
            Ok("http") => vec![false],
            _ => vec![round % 2 == 0, round % 2 == 1],
        };
        for kind in kinds {
            let tag = format!("round {} {}", round + 1, if kind { "ws" } else { "http" });
            let r = handover_run(args, kind, &tag).await?;
            if kind { ws.push(r) } else { http.push(r) }
        }
    }
    println!(
        "| median of {} rounds, {} idle connections | WebSockets | HTTP/1.1 |",
        args.rounds, args.conns
    );
    println!("|---|---|---|");
    let col =
        |v: &[(f64, f64, u64)], f: fn(&(f64, f64, u64)) -> f64| median(v.iter().map(f).collect());
    println!(
        "| old process's `hand_over` phase (ms) | {:.1} | {:.1} |",
        col(&ws, |r| r.0),
        col(&http, |r| r.0)
    );
    println!(
        "| SIGHUP → old process exited (ms) | {:.1} | {:.1} |",
        col(&ws, |r| r.1),
        col(&http, |r| r.1)
    );
    println!(
        "| handed over (report) | {:.0} | {:.0} |",
        col(&ws, |r| r.2 as f64),
        col(&http, |r| r.2 as f64)
    );
    Ok(())
}

/// Latencies (µs) recorded in the steady window and in the burst.
#[derive(Default)]
struct Lat {
    steady: Vec<u32>,
    burst: Vec<u32>,
}

/// Which window a sample falls in: 0 before the steady window, 1 steady, 2 burst, 3 after.
struct Clock {
    window: std::sync::atomic::AtomicU8,
}

impl Clock {
    /// Records the latency of an exchange begun at `t` in the window it ends in.
    fn record(&self, lat: &Mutex<Lat>, t: Instant) {
        let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let mut l = lat.lock().unwrap_or_else(|e| e.into_inner());
        match self.window.load(Ordering::Relaxed) {
            1 => l.steady.push(us),
            2 => l.burst.push(us),
            _ => {}
        }
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i])
}

async fn latency(args: &Args) -> Result<()> {
    let mut rows = Vec::new();
    for round in 0..args.rounds {
        rows.push(latency_run(args, round).await?);
    }
    println!(
        "| round | WS echo p50 / p99 / max steady (µs) | burst | WS p99 ratio | HTTP p50 / p99 / max steady (µs) | burst | HTTP p99 ratio | WS messages / HTTP requests |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, r) in rows.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.2} | {} / {} |",
            i + 1,
            r.0,
            r.1,
            r.2,
            r.3,
            r.4,
            r.5,
            r.6,
            r.7
        );
    }
    println!(
        "| median | | | {:.2} | | | {:.2} | |",
        median(rows.iter().map(|r| r.2).collect()),
        median(rows.iter().map(|r| r.5).collect())
    );
    Ok(())
}

type Row = (String, String, f64, String, String, f64, usize, usize);

async fn latency_run(args: &Args, round: usize) -> Result<Row> {
    let demo = Demo::start(&args.demo, &format!("latency-{round}"))?;
    let addr = demo.addr;
    let clock = Arc::new(Clock {
        window: std::sync::atomic::AtomicU8::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ws_lat = Arc::new(Mutex::new(Lat::default()));
    let http_lat = Arc::new(Mutex::new(Lat::default()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..args.sockets {
        let mut io = websocket(addr, "/ws").await?;
        let (clock, stop, lat, failures) = (
            Arc::clone(&clock),
            Arc::clone(&stop),
            Arc::clone(&ws_lat),
            Arc::clone(&failures),
        );
        tasks.push(tokio::spawn(async move {
            // Spread over the period.
            tokio::time::sleep(Duration::from_micros((i as u64 * 50_000) / 1000 % 50_000)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let msg = format!("{i}-{n}");
                let t = Instant::now();
                let r = async {
                    io.get_mut().write_all(&frame(msg.as_bytes())).await?;
                    let back = read_frame(&mut io).await?;
                    if back != msg.as_bytes() {
                        bail!("echo {:?} for {msg:?}", String::from_utf8_lossy(&back));
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    failures.lock().unwrap().push(format!("ws {i}: {e}"));
                    return;
                }
                clock.record(&lat, t);
            }
        }));
    }
    for i in 0..args.http {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut io = BufReader::new(s);
        let (clock, stop, lat, failures) = (
            Arc::clone(&clock),
            Arc::clone(&stop),
            Arc::clone(&http_lat),
            Arc::clone(&failures),
        );
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                match get(&mut io, "/").await {
                    Ok((200, _)) => clock.record(&lat, t),
                    other => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("http {i}: {other:?}"));
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.window.store(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.steady)).await;
    clock.window.store(2, Ordering::Relaxed);
    let mut pid = demo.pid().context("no pid")?;
    for _ in 0..args.upgrades {
        let new = demo.upgrade(pid).await?;
        reap(pid).await;
        pid = new;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    clock.window.store(3, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let failures = failures.lock().unwrap().clone();
    if !failures.is_empty() {
        bail!(
            "{} clients failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
    demo.stop(pid).await;
    let summary = |l: &mut Lat| {
        let s = format!(
            "{:.0} / {:.0} / {:.0}",
            pct(&mut l.steady, 0.5),
            pct(&mut l.steady, 0.99),
            pct(&mut l.steady, 1.0)
        );
        let b = format!(
            "{:.0} / {:.0} / {:.0}",
            pct(&mut l.burst, 0.5),
            pct(&mut l.burst, 0.99),
            pct(&mut l.burst, 1.0)
        );
        let ratio = pct(&mut l.burst, 0.99) / pct(&mut l.steady, 0.99);
        (s, b, ratio, l.steady.len() + l.burst.len())
    };
    let (ws_s, ws_b, ws_r, ws_n) = summary(&mut ws_lat.lock().unwrap());
    let (h_s, h_b, h_r, h_n) = summary(&mut http_lat.lock().unwrap());
    eprintln!(
        "round {}: WS p99 ratio {ws_r:.2}, HTTP p99 ratio {h_r:.2}",
        round + 1
    );
    Ok((ws_s, ws_b, ws_r, h_s, h_b, h_r, ws_n, h_n))
}
