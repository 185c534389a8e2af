//! `bench`: the harness. Runs `bench-server` in each mode (grace, bare hyper, axum, and the
//! diagnostic hyper-timer) in interleaved rounds (grace, hyper, axum, hyper-timer, grace, …)
//! and prints the medians as markdown on stdout (progress goes to stderr):
//!
//! 1. throughput and latency of keep-alive `GET /`, measured by `wrk --latency`, and the
//!    server's CPU time per request;
//! 2. shutdown latency with N idle keep-alive connections held by `hold-conns`: the time
//!    from SIGTERM to the reaped exit of the server, against the floor, the same grace
//!    server with the same connections ended by SIGKILL;
//! 3. memory per idle connection: the server's `VmRSS` before and after opening them;
//! 4. with `--callgrind`, instructions per request under `valgrind --tool=callgrind`.
//!
//! By default the server is pinned to CPU 0 and the load generators to CPU 1 (`taskset`),
//! so the server runs one tokio worker. `wrk`, `taskset` (and `h2load`, `valgrind` for
//! `--callgrind`) must be on `PATH`; the sibling binaries are found next to this one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use grace_bench::{list, median};
use rustix::process::{Pid, Signal, kill_process};

#[derive(Parser, Debug)]
#[command(about = "Benchmark grace against bare hyper-util and axum::serve")]
struct Args {
    /// Interleaved rounds; every figure is the median over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Idle keep-alive connections for the shutdown and memory runs.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// wrk: measured duration of each throughput run (after a 1 s warm-up).
    #[arg(long, default_value = "5s")]
    duration: String,
    /// wrk: connections.
    #[arg(long, default_value_t = 64)]
    wrk_conns: usize,
    /// Do not pin the server and the load generators to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Hold the idle connections with `hold-conns --quiet`: the holder sleeps through the
    /// server closing them (its sockets are outside epoll).
    #[arg(long)]
    quiet_holder: bool,
    /// Also run `grace-demo` (found next to this binary) in the shutdown and memory runs,
    /// from a scratch directory (its SQLite ledger and audit log are written there).
    #[arg(long)]
    demo: bool,
    /// Skip the wrk throughput runs.
    #[arg(long)]
    skip_throughput: bool,
    /// Skip the shutdown and memory runs.
    #[arg(long)]
    skip_shutdown: bool,
    /// Also count instructions per request with callgrind (slow).
    #[arg(long)]
    callgrind: bool,
    /// Requests sent under callgrind (the baseline run sends a tenth as many).
    #[arg(long, default_value_t = 20_000)]
    callgrind_requests: u64,
    /// Interleaved rounds of the callgrind runs (callgrind counts repeatably: few suffice).
    #[arg(long, default_value_t = 3)]
    callgrind_rounds: usize,
    /// Keep the callgrind profiles of the last round in this directory (for
    /// `callgrind_annotate`), named `MODE.HANDLER.PROTO.REQUESTS.out`.
    #[arg(long)]
    callgrind_keep: Option<PathBuf>,
}

/// One callgrind comparison: the same handler and protocol, grace first.
struct CallgrindCase {
    label: &'static str,
    handler: &'static str,
    http2: bool,
    modes: &'static [&'static str],
}

const CALLGRIND_CASES: [CallgrindCase; 3] = [
    CallgrindCase {
        label: "axum Router, HTTP/1.1 (h2load --h1 -c4)",
        handler: "router",
        http2: false,
        modes: &["grace", "axum", "hyper"],
    },
    CallgrindCase {
        label: "bare handler, HTTP/1.1 (h2load --h1 -c4)",
        handler: "bare",
        http2: false,
        modes: &["grace", "hyper"],
    },
    CallgrindCase {
        label: "bare handler, HTTP/2 cleartext (h2load -c8 -m10)",
        handler: "bare",
        http2: true,
        modes: &["grace", "hyper"],
    },
];

/// Server modes, in round order. `hyper-timer` is a diagnostic: bare hyper with grace's
/// HTTP/1 timer and header read timeout.
const MODES: [&str; 4] = ["grace", "hyper", "axum", "hyper-timer"];

/// Where the sibling binaries are, and how processes are pinned.
struct Env {
    dir: PathBuf,
    pin: bool,
}

impl Env {
    /// A command for `program`, pinned to `cpu` when pinning.
    fn command(&self, cpu: u32, program: &str, args: &[&str]) -> Command {
        let local = self.dir.join(program);
        let program = if local.exists() {
            local.into_os_string()
        } else {
            program.into()
        };
        let mut cmd = if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args);
        cmd
    }
}

/// A running `bench-server` (optionally under valgrind). Killed if dropped while running.
struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Server {
    fn start(env: &Env, mode: &str) -> Result<Server> {
        if mode == "demo" {
            let scratch =
                std::env::temp_dir().join(format!("grace-bench-demo.{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            // Its default SQLite file and audit log go to the scratch directory.
            let mut cmd = env.command(0, "grace-demo", &["--listen", "127.0.0.1:0"]);
            cmd.current_dir(&scratch).env("RUST_LOG", "warn");
            return Server::spawn(cmd);
        }
        Server::spawn(env.command(0, "bench-server", &["--mode", mode]))
    }

    fn spawn(mut cmd: Command) -> Result<Server> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let (addr, stdout) = grace_bench::listening(&mut child)?;
        Ok(Server {
            child,
            stdout,
            addr,
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// Sends `sig` and waits for the exit: returns the time from the signal to the reaped
    /// exit, and what the server printed meanwhile.
    fn stop(mut self, sig: Signal) -> Result<(Duration, String)> {
        let t = Instant::now();
        kill_process(self.pid(), sig)?;
        let status = self.child.wait()?;
        let took = t.elapsed();
        if sig == Signal::TERM && !status.success() {
            bail!("server exited with {status}");
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest)?;
        Ok((took, rest))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `hold-conns` whose connections are all established and idle.
struct Holder(Child);

impl Holder {
    fn start(env: &Env, addr: SocketAddr, conns: usize, quiet: bool) -> Result<Holder> {
        let (addr, conns) = (addr.to_string(), conns.to_string());
        let mut args = vec!["--addr", &addr, "--conns", &conns];
        if quiet {
            args.push("--quiet");
        }
        let mut child = env
            .command(1, "hold-conns", &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning hold-conns")?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().context("no stdout")?).read_line(&mut line)?;
        let holder = Holder(child);
        if line.trim() != format!("established {conns}") {
            bail!("hold-conns did not establish its connections: {line:?}");
        }
        Ok(holder)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One wrk run.
#[derive(Clone, Copy, Debug)]
struct Throughput {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Requests wrk completed.
    requests: f64,
    /// Server CPU time (all threads) per request, in µs: less sensitive to other load
    /// on the machine than req/s.
    cpu_us: f64,
}

/// Parses wrk's duration format: `123.45us`, `1.20ms`, `2.00s`, `1.00m`.
fn wrk_duration_us(s: &str) -> Result<f64> {
    let units = [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ];
    for (suffix, scale) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            return Ok(n.parse::<f64>()? * scale);
        }
    }
    bail!("unknown wrk duration {s:?}")
}

fn wrk(env: &Env, addr: SocketAddr, conns: usize, duration: &str) -> Result<Throughput> {
    let url = format!("http://{addr}/");
    let conns = conns.to_string();
    let args = ["-t1", "-c", &conns, "-d", duration, "--latency", &url];
    let out = env
        .command(1, "wrk", &args)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk failed or saw errors:\n{text}");
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no {prefix:?} in wrk output:\n{text}"))
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("no request count in wrk output")?;
    Ok(Throughput {
        rps: field("Requests/sec:")?.parse()?,
        p50_us: wrk_duration_us(field("50%")?)?,
        p99_us: wrk_duration_us(field("99%")?)?,
        requests: requests.parse()?,
        cpu_us: f64::NAN,
    })
}

fn throughput_run(env: &Env, args: &Args, mode: &str) -> Result<Throughput> {
    let server = Server::start(env, mode)?;
    wrk(env, server.addr, args.wrk_conns, "1s")?; // warm-up
    let cpu = grace_bench::cpu_ns(server.child.id())?;
    let mut t = wrk(env, server.addr, args.wrk_conns, &args.duration)?;
    t.cpu_us = (grace_bench::cpu_ns(server.child.id())? - cpu) as f64 / 1e3 / t.requests;
    server.stop(Signal::TERM)?;
    Ok(t)
}

/// Runs `f` up to three times: on a shared machine a run can fail for reasons that are
/// not the server's (wrk timeouts while another job takes every CPU).
fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    for attempt in 1.. {
        match f() {
            Ok(t) => return Ok(t),
            Err(e) if attempt < 3 => {
                eprintln!("  {what}: attempt {attempt} failed, retrying: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!()
}

/// One shutdown run with idle connections.
#[derive(Clone, Debug)]
struct ShutdownRun {
    exit: Duration,
    rss_before: u64,
    rss_after: u64,
    /// grace's own `ShutdownReport::total`, when it printed one.
    drain: Option<Duration>,
}

fn shutdown_run(
    env: &Env,
    conns: usize,
    quiet: bool,
    mode: &str,
    sig: Signal,
) -> Result<ShutdownRun> {
    let server = Server::start(env, mode)?;
    std::thread::sleep(Duration::from_millis(100));
    let rss_before = grace_bench::rss(server.child.id())?;
    let holder = Holder::start(env, server.addr, conns, quiet)?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = grace_bench::rss(server.child.id())?;
    let (exit, printed) = server.stop(sig)?;
    drop(holder);
    let drain = printed.lines().find_map(|l| {
        let us = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("total_us="))?;
        if !l.contains("clean=true") {
            eprintln!("  warning: grace drain was not clean: {l}");
        }
        us.parse().ok().map(Duration::from_micros)
    });
    Ok(ShutdownRun {
        exit,
        rss_before,
        rss_after,
        drain,
    })
}

/// Total instructions (`Ir`) of `bench-server --mode mode --handler handler` under callgrind
/// while `requests` keep-alive requests are sent by `h2load`: over HTTP/1.1 on 4
/// connections, or over HTTP/2 cleartext on 8 connections with 10 streams each.
fn callgrind_ir(
    env: &Env,
    mode: &str,
    case: &CallgrindCase,
    requests: u64,
    keep: Option<&std::path::Path>,
) -> Result<u64> {
    let proto = if case.http2 { "h2c" } else { "h1" };
    let name = format!("{mode}.{}.{proto}.{requests}", case.handler);
    let file = match keep {
        Some(dir) => dir.join(format!("{name}.out")),
        None => std::env::temp_dir().join(format!(
            "grace-bench.callgrind.{name}.{}",
            std::process::id()
        )),
    };
    let out_arg = format!("--callgrind-out-file={}", file.display());
    let server_bin = env.dir.join("bench-server");
    let server_bin = server_bin.to_str().context("binary path is not UTF-8")?;
    let valgrind = [
        "-q",
        "--tool=callgrind",
        &out_arg,
        server_bin,
        "--mode",
        mode,
        "--handler",
        case.handler,
    ];
    let server = Server::spawn(env.command(0, "valgrind", &valgrind))?;
    let (url, n) = (format!("http://{}/", server.addr), requests.to_string());
    let h2load: &[&str] = if case.http2 {
        &["-n", &n, "-c", "8", "-m", "10", "-t", "1", &url]
    } else {
        &["--h1", "-n", &n, "-c", "4", "-t", "1", &url]
    };
    let out = env.command(1, "h2load", h2load).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = format!("{requests} succeeded");
    if !out.status.success() || !text.contains(&ok) {
        bail!("h2load did not complete {requests} requests:\n{text}");
    }
    server.stop(Signal::TERM)?;
    grace_bench::callgrind_total(&file, keep.is_some())
}

fn main() -> Result<()> {
    let args = Args::parse();
    grace_bench::raise_nofile()?;
    let exe = std::env::current_exe()?;
    let env = Env {
        dir: exe.parent().context("no binary directory")?.to_path_buf(),
        pin: !args.no_pin,
    };
    let pinning = if env.pin {
        "server on CPU 0, load generator on CPU 1"
    } else {
        "no CPU pinning"
    };
    println!(
        "# grace-bench: {} rounds, interleaved, medians ({pinning})\n",
        args.rounds
    );
    println!("Load average at start: {}\n", loadavg());

    if !args.skip_throughput {
        let mut runs: Vec<Vec<Throughput>> = vec![Vec::new(); MODES.len()];
        for round in 1..=args.rounds {
            for (i, mode) in MODES.iter().enumerate() {
                let t = retry(mode, || throughput_run(&env, &args, mode))?;
                eprintln!("throughput round {round} {mode}: {t:?}");
                runs[i].push(t);
            }
        }
        let stat = |i: usize, f: fn(&Throughput) -> f64| -> (f64, Vec<f64>) {
            let xs: Vec<f64> = runs[i].iter().map(f).collect();
            (median(&xs), xs)
        };
        println!(
            "## Throughput: `wrk -t1 -c{} -d{} --latency`, keep-alive `GET /`\n",
            args.wrk_conns, args.duration
        );
        println!("| mode | req/s | p50 (µs) | p99 (µs) | server CPU µs / req | req/s by round |");
        println!("|---|---:|---:|---:|---:|---|");
        let mut med = Vec::new();
        for (i, mode) in MODES.iter().enumerate() {
            let (rps, all) = stat(i, |t| t.rps);
            let (p50, _) = stat(i, |t| t.p50_us);
            let (p99, _) = stat(i, |t| t.p99_us);
            let (cpu, _) = stat(i, |t| t.cpu_us);
            println!(
                "| {mode} | {rps:.0} | {p50:.0} | {p99:.0} | {cpu:.2} | {} |",
                list(&all, 0)
            );
            med.push((rps, p99, cpu));
        }
        println!();
        for (i, other) in MODES.iter().enumerate().skip(1) {
            let (g, o) = (med[0], med[i]);
            let paired: Vec<f64> = runs[0]
                .iter()
                .zip(&runs[i])
                .map(|(g, o)| g.rps / o.rps)
                .collect();
            println!(
                "- grace / {other}: throughput {:.3}× (median of per-round ratios {:.3}×), \
                 p99 {:.2}×, CPU per request {:.3}×",
                g.0 / o.0,
                median(&paired),
                g.1 / o.1,
                g.2 / o.2
            );
        }
        println!();
    }

    if !args.skip_shutdown {
        // (label, mode, signal)
        let runs_of = [
            ("grace, SIGTERM (drain)", "grace", Signal::TERM),
            ("axum, SIGTERM (drain)", "axum", Signal::TERM),
            ("axum-server, SIGTERM (drain)", "axum-server", Signal::TERM),
            (
                "hyper, SIGTERM (no drain: runtime dropped)",
                "hyper",
                Signal::TERM,
            ),
            (
                "hyper-timer, SIGTERM (no drain)",
                "hyper-timer",
                Signal::TERM,
            ),
            ("grace, SIGKILL (floor)", "grace", Signal::KILL),
        ];
        let mut runs_of = runs_of.to_vec();
        if args.demo {
            runs_of.insert(1, ("grace-demo, SIGTERM (drain)", "demo", Signal::TERM));
        }
        let floor_run = runs_of.len() - 1;
        let mut runs: Vec<Vec<ShutdownRun>> = vec![Vec::new(); runs_of.len()];
        for round in 1..=args.rounds {
            for (i, (label, mode, sig)) in runs_of.iter().enumerate() {
                let r = retry(label, || {
                    shutdown_run(&env, args.conns, args.quiet_holder, mode, *sig)
                })?;
                eprintln!("shutdown round {round} {label}: {r:?}");
                runs[i].push(r);
            }
        }
        let ms = |r: &ShutdownRun| r.exit.as_secs_f64() * 1e3;
        let floor = median(&runs[floor_run].iter().map(ms).collect::<Vec<_>>());
        println!(
            "## Shutdown with {} idle keep-alive connections ({} holder): signal → reaped exit\n",
            args.conns,
            if args.quiet_holder { "quiet" } else { "epoll" }
        );
        // Paired: each run against the floor of its own round (the machine's state drifts
        // between rounds more than it does within one), then the median of those ratios.
        println!("| run | exit (ms) | × floor | × floor, paired by round | by round (ms) |");
        println!("|---|---:|---:|---:|---|");
        for (i, (label, ..)) in runs_of.iter().enumerate() {
            let xs: Vec<f64> = runs[i].iter().map(ms).collect();
            let m = median(&xs);
            let paired: Vec<f64> = runs[i]
                .iter()
                .zip(&runs[floor_run])
                .map(|(r, f)| ms(r) / ms(f))
                .collect();
            println!(
                "| {label} | {m:.1} | {:.2} | {:.2} | {} |",
                m / floor,
                median(&paired),
                list(&xs, 1)
            );
        }
        let drains: Vec<f64> = runs[0]
            .iter()
            .filter_map(|r| r.drain)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        println!(
            "\ngrace's own `ShutdownReport::total` (signal handled → drained): median {:.1} ms ({})\n",
            median(&drains),
            list(&drains, 1)
        );

        // Memory: every run of a mode is a sample (grace has two per round).
        println!(
            "## Memory per idle keep-alive connection: server VmRSS before and with {} connections\n",
            args.conns
        );
        println!("| mode | RSS before (KiB) | RSS with conns (KiB) | bytes / conn | × hyper |");
        println!("|---|---:|---:|---:|---:|");
        let samples = |mode: &str| -> Vec<&ShutdownRun> {
            runs_of
                .iter()
                .zip(&runs)
                .filter(|((_, m, _), _)| *m == mode)
                .flat_map(|(_, rs)| rs)
                .collect()
        };
        let per_conn = |mode: &str| {
            let rs = samples(mode);
            let f =
                |g: fn(&ShutdownRun) -> f64| median(&rs.iter().map(|r| g(r)).collect::<Vec<_>>());
            (
                f(|r| r.rss_before as f64 / 1024.0),
                f(|r| r.rss_after as f64 / 1024.0),
                f(|r| r.rss_after as f64 - r.rss_before as f64) / args.conns as f64,
            )
        };
        let hyper = per_conn("hyper").2;
        let demo: &[&str] = if args.demo { &["demo"] } else { &[] };
        for mode in MODES.iter().chain(demo) {
            let (before, after, per) = per_conn(mode);
            println!(
                "| {mode} | {before:.0} | {after:.0} | {per:.0} | {:.2} |",
                per / hyper
            );
        }
        println!();
    }

    if args.callgrind {
        let (n1, n2) = (args.callgrind_requests / 10, args.callgrind_requests);
        println!(
            "## Instructions per request (callgrind; (Ir at {n2} − Ir at {n1} requests) / {}; \
             median of {} interleaved rounds)\n",
            n2 - n1,
            args.callgrind_rounds
        );
        if let Some(dir) = &args.callgrind_keep {
            std::fs::create_dir_all(dir)?;
        }
        println!("| handler, protocol | mode | Ir / request | by round | grace ÷ mode |");
        println!("|---|---|---:|---|---|");
        for case in &CALLGRIND_CASES {
            let mut per: Vec<Vec<f64>> = vec![Vec::new(); case.modes.len()];
            for round in 1..=args.callgrind_rounds {
                let keep = (round == args.callgrind_rounds)
                    .then_some(args.callgrind_keep.as_deref())
                    .flatten();
                for (i, mode) in case.modes.iter().enumerate() {
                    let small = callgrind_ir(&env, mode, case, n1, keep)?;
                    let big = callgrind_ir(&env, mode, case, n2, keep)?;
                    let ir = (big as f64 - small as f64) / (n2 - n1) as f64;
                    eprintln!(
                        "callgrind round {round} {} {mode}: {small} @ {n1}, {big} @ {n2}: \
                         {ir:.0} Ir/request",
                        case.label
                    );
                    per[i].push(ir);
                }
            }
            let grace = median(&per[0]);
            for (i, mode) in case.modes.iter().enumerate() {
                let m = median(&per[i]);
                let ratio = if i == 0 {
                    String::new()
                } else {
                    format!("{:.3}×", grace / m)
                };
                println!(
                    "| {} | {mode} | {m:.0} | {} | {ratio} |",
                    case.label,
                    list(&per[i], 0)
                );
            }
        }
        println!();
    }
    println!("Load average at end: {}", loadavg());
    Ok(())
}

/// `/proc/loadavg`: how busy the (shared) machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|e| e.to_string(), |s| s.trim().into())
}
