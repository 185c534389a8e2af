//! `tls-bench`: grace against axum-server, both with rustls (ring) and the same `Router`,
//! side by side in interleaved rounds (issue 11). Progress goes to stderr, the medians as
//! markdown to stdout:
//!
//! 1. instructions per keep-alive HTTPS request (callgrind): `bench-server --tls` under
//!    `valgrind --tool=callgrind` on CPU 0, `h2load --h1 -c4` on CPU 1,
//!    `(Ir at N requests − Ir at N/10) / (0.9 N)`;
//! 2. instructions per handshake + one request (callgrind): the same with
//!    `tls-bench handshakes` as the client (a fresh TLS connection per request, no
//!    resumption, one request each);
//! 3. handshakes per second (each with one request) and the server's CPU time per
//!    handshake, the server natively on CPU 0 and `tls-bench handshakes` on CPU 1;
//! 4. memory per idle TLS connection: the server's `VmRSS` before and with N idle TLS
//!    connections (`tls-bench hold`: handshake done, one request answered on each).
//!
//! The client subcommands (`handshakes`, `hold`) offer ALPN `http/1.1` only, disable
//! session resumption and do not verify the server's certificate (it is self-signed).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use grace_bench::{list, median};
use rustix::process::{Pid, Signal, kill_process};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "TLS benchmarks: grace against axum-server (rustls, ring), same Router")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Interleaved rounds; every figure is the median over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep-alive requests under callgrind (the baseline run sends a tenth as many).
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Handshakes (one request each) under callgrind (the baseline run makes a tenth).
    #[arg(long, default_value_t = 1_000)]
    cg_handshakes: u64,
    /// Length of each handshakes-per-second run, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent handshaking clients in the handshakes-per-second run.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Idle TLS connections for the memory run.
    #[arg(long, default_value_t = 2_000)]
    conns: usize,
    /// Skip the callgrind runs.
    #[arg(long)]
    skip_callgrind: bool,
    /// Keep the callgrind profiles of the last round here (`MODE.KIND.N.out`).
    #[arg(long)]
    callgrind_keep: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Client: TLS handshakes, each followed by one `GET /`, then the connection is dropped.
    /// Prints `handshakes N seconds S`.
    Handshakes {
        #[arg(long)]
        addr: SocketAddr,
        /// Stop after this many handshakes (over all clients) ...
        #[arg(long)]
        count: Option<u64>,
        /// ... or after this many seconds.
        #[arg(long)]
        seconds: Option<f64>,
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Client: opens N TLS connections, one `GET /` answered on each, prints
    /// `established N`, and holds them until stdin closes.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
}

const MODES: [&str; 2] = ["grace", "axum-server"];

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Cmd::Handshakes {
            addr,
            count,
            seconds,
            parallel,
        }) => client_runtime()?.block_on(handshakes(addr, count, seconds, parallel)),
        Some(Cmd::Hold {
            addr,
            conns,
            parallel,
        }) => client_runtime()?.block_on(hold(addr, conns, parallel)),
        None => orchestrate(&args),
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime> {
    if let Err(e) = grace_bench::raise_nofile() {
        eprintln!("tls-bench: cannot raise RLIMIT_NOFILE: {e}");
    }
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------
// Client

/// Accepts any certificate: the server's is self-signed, and verifying it is not what is
/// measured.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS handshake and one `GET /` whose whole response (`hello`) is read.
async fn open(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(256);
    while !buf.ends_with(b"\r\n\r\nhello") {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the response ended");
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("unexpected response: {}", String::from_utf8_lossy(&buf));
    }
    Ok(s)
}

async fn handshakes(
    addr: SocketAddr,
    count: Option<u64>,
    seconds: Option<f64>,
    parallel: usize,
) -> Result<()> {
    let connector = connector();
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = seconds.map(|s| start + Duration::from_secs_f64(s));
    let limit = count.unwrap_or(u64::MAX);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (connector, done) = (connector.clone(), Arc::clone(&done));
        tasks.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d)
                    || done.fetch_add(1, Ordering::Relaxed) >= limit
                {
                    return Ok::<_, anyhow::Error>(());
                }
                drop(open(&connector, addr).await?);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let n = done.load(Ordering::Relaxed).min(limit);
    let n = if count.is_some() {
        n
    } else {
        n - parallel as u64
    };
    println!(
        "handshakes {n} seconds {:.6}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn hold(addr: SocketAddr, conns: usize, parallel: usize) -> Result<()> {
    let connector = connector();
    let mut held = Vec::with_capacity(conns);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < conns {
        while started < conns && pending.len() < parallel {
            let connector = connector.clone();
            pending.spawn(async move { open(&connector, addr).await });
            started += 1;
        }
        held.push(pending.join_next().await.context("no task")???);
    }
    println!("established {}", held.len());
    // Hold until stdin closes.
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await??;
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Orchestration

fn sibling(program: &str) -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("no parent")?
        .join(program))
}

/// `program args` pinned to `cpu`.
fn pinned(cpu: u32, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program).args(args);
    c
}

struct Server {
    child: Child,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
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
            addr,
            _stdout: stdout,
        })
    }

    fn native(mode: &str) -> Result<Server> {
        Server::spawn(pinned(
            0,
            sibling("bench-server")?,
            &["--mode", mode, "--tls"],
        ))
    }

    fn stop(mut self) -> Result<()> {
        kill_process(Pid::from_child(&self.child), Signal::TERM)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("server exited with {status}");
        }
        Ok(())
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

fn run_checked(mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// Total `Ir` of `bench-server --mode MODE --tls` under callgrind while `load` runs
/// against it (`load` gets the server's address).
fn callgrind_ir(
    mode: &str,
    name: &str,
    keep: Option<&std::path::Path>,
    load: impl FnOnce(SocketAddr) -> Result<()>,
) -> Result<u64> {
    let file = match keep {
        Some(dir) => dir.join(format!("{mode}.{name}.out")),
        None => std::env::temp_dir().join(format!(
            "tls-bench.callgrind.{mode}.{name}.{}",
            std::process::id()
        )),
    };
    let out_arg = format!("--callgrind-out-file={}", file.display());
    let server_bin = sibling("bench-server")?;
    let server_bin = server_bin.to_str().context("path is not UTF-8")?;
    let server = Server::spawn(pinned(
        0,
        "valgrind",
        &[
            "-q",
            "--tool=callgrind",
            &out_arg,
            server_bin,
            "--mode",
            mode,
            "--tls",
        ],
    ))?;
    load(server.addr)?;
    server.stop()?;
    grace_bench::callgrind_total(&file, keep.is_some())
}

fn h2load(addr: SocketAddr, requests: u64) -> Result<()> {
    let (url, n) = (format!("https://{addr}/"), requests.to_string());
    let text = run_checked(pinned(
        1,
        "h2load",
        &["--h1", "-n", &n, "-c", "4", "-t", "1", &url],
    ))?;
    if !text.contains(&format!("{requests} succeeded")) {
        bail!("h2load did not complete {requests} requests:\n{text}");
    }
    Ok(())
}

/// Runs `tls-bench handshakes` on CPU 1: returns (handshakes, seconds).
fn client_handshakes(addr: SocketAddr, extra: &[&str]) -> Result<(u64, f64)> {
    let addr = addr.to_string();
    let mut args = vec!["handshakes", "--addr", &addr];
    args.extend_from_slice(extra);
    let text = run_checked(pinned(1, std::env::current_exe()?, &args))?;
    let mut words = text.split_whitespace();
    let (Some("handshakes"), Some(n), Some("seconds"), Some(s)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        bail!("unexpected client output: {text}");
    };
    Ok((n.parse()?, s.parse()?))
}

/// Per mode, per round: one figure.
type Figures = [Vec<f64>; 2];

fn table(title: &str, unit: &str, figs: &Figures, digits: usize) {
    println!("\n### {title}\n\n| mode | {unit} (median) | by round |\n|---|---:|---|");
    for (mode, xs) in MODES.iter().zip(figs) {
        println!(
            "| {mode} | {:.digits$} | {} |",
            median(xs),
            list(xs, digits)
        );
    }
    let ratios: Vec<f64> = figs[0].iter().zip(&figs[1]).map(|(g, a)| g / a).collect();
    println!(
        "\ngrace ÷ axum-server: {:.3}× (ratio of medians; median of per-round ratios {:.3}×)",
        median(&figs[0]) / median(&figs[1]),
        median(&ratios)
    );
}

fn orchestrate(args: &Args) -> Result<()> {
    if let Err(e) = grace_bench::raise_nofile() {
        eprintln!("tls-bench: cannot raise RLIMIT_NOFILE: {e}");
    }
    if let Some(dir) = &args.callgrind_keep {
        std::fs::create_dir_all(dir)?;
    }
    let mut ka: Figures = Default::default();
    let mut hs_ir: Figures = Default::default();
    let mut hs_rate: Figures = Default::default();
    let mut hs_cpu: Figures = Default::default();
    let mut mem: Figures = Default::default();
    let (n1, n2) = (args.requests / 10, args.requests);
    let (h1, h2) = (args.cg_handshakes / 10, args.cg_handshakes);
    for round in 1..=args.rounds {
        let keep = (round == args.rounds)
            .then_some(args.callgrind_keep.as_deref())
            .flatten();
        for (i, mode) in MODES.iter().enumerate() {
            if !args.skip_callgrind {
                let small = callgrind_ir(mode, &format!("ka.{n1}"), keep, |a| h2load(a, n1))?;
                let big = callgrind_ir(mode, &format!("ka.{n2}"), keep, |a| h2load(a, n2))?;
                let per = (big - small) as f64 / (n2 - n1) as f64;
                eprintln!("round {round} {mode}: keep-alive {per:.0} Ir/request");
                ka[i].push(per);
                let hs = |n: u64| {
                    move |a| {
                        let count = n.to_string();
                        client_handshakes(a, &["--count", &count]).map(drop)
                    }
                };
                let small = callgrind_ir(mode, &format!("hs.{h1}"), keep, hs(h1))?;
                let big = callgrind_ir(mode, &format!("hs.{h2}"), keep, hs(h2))?;
                let per = (big - small) as f64 / (h2 - h1) as f64;
                eprintln!("round {round} {mode}: {per:.0} Ir/(handshake + request)");
                hs_ir[i].push(per);
            }

            // Handshakes per second, natively; 0.5 s of warm-up first.
            let server = Server::native(mode)?;
            client_handshakes(
                server.addr,
                &["--seconds", "0.5", "--parallel", &args.parallel.to_string()],
            )?;
            let cpu0 = grace_bench::cpu_ns(server.child.id())?;
            let (n, s) = client_handshakes(
                server.addr,
                &[
                    "--seconds",
                    &args.seconds.to_string(),
                    "--parallel",
                    &args.parallel.to_string(),
                ],
            )?;
            let cpu = grace_bench::cpu_ns(server.child.id())? - cpu0;
            server.stop()?;
            let (rate, cpu_us) = (n as f64 / s, cpu as f64 / 1e3 / n as f64);
            eprintln!(
                "round {round} {mode}: {rate:.0} handshakes/s, {cpu_us:.1} server CPU µs each"
            );
            hs_rate[i].push(rate);
            hs_cpu[i].push(cpu_us);

            // Memory per idle TLS connection.
            let server = Server::native(mode)?;
            std::thread::sleep(Duration::from_millis(200));
            let before = grace_bench::rss(server.child.id())?;
            let addr = server.addr.to_string();
            let conns = args.conns.to_string();
            let mut holder = pinned(
                1,
                std::env::current_exe()?,
                &["hold", "--addr", &addr, "--conns", &conns],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
            let mut line = String::new();
            BufReader::new(holder.stdout.take().context("no stdout")?).read_line(&mut line)?;
            if line.trim() != format!("established {}", args.conns) {
                let _ = holder.kill();
                bail!("holder: {line:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
            let with = grace_bench::rss(server.child.id())?;
            drop(holder.stdin.take());
            let _ = holder.wait();
            server.stop()?;
            let per = (with as f64 - before as f64) / args.conns as f64;
            eprintln!(
                "round {round} {mode}: RSS {} → {} KiB, {per:.0} B per idle TLS connection",
                before / 1024,
                with / 1024
            );
            mem[i].push(per);
        }
    }
    println!("## TLS: grace against axum-server (rustls, ring), same Router, HTTP/1.1\n");
    println!(
        "{} rounds, interleaved (grace, axum-server, …).",
        args.rounds
    );
    if !args.skip_callgrind {
        table(
            &format!(
                "Keep-alive requests: Ir per request ((Ir at {n2} − Ir at {n1}) / {})",
                n2 - n1
            ),
            "Ir / request",
            &ka,
            0,
        );
        table(
            &format!(
                "Handshake + one request: Ir each ((Ir at {h2} − Ir at {h1}) / {})",
                h2 - h1
            ),
            "Ir / (handshake + request)",
            &hs_ir,
            0,
        );
    }
    table(
        &format!(
            "Handshakes (+ one request) per second, {} clients, {} s",
            args.parallel, args.seconds
        ),
        "handshakes / s",
        &hs_rate,
        0,
    );
    table("Server CPU time per handshake + request", "µs", &hs_cpu, 1);
    table(
        &format!(
            "Memory per idle TLS connection ({} connections)",
            args.conns
        ),
        "bytes / conn",
        &mem,
        0,
    );
    Ok(())
}
