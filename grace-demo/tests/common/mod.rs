//! Helpers for the process-level tests: a real `grace-demo` child process on 127.0.0.1:0, a
//! service followed across upgrades, a keep-alive HTTP/1.1 client speaking the demo's JSON
//! (and a TLS one), the store URLs from the environment, and a look at what the stores hold
//! afterwards. The raw HTTP/1 client and reader, the process helpers and the scratch
//! directories are the workspace's test kit's (`grace-testkit`), re-exported here.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use sqlx::{Connection as _, Row as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

// Each test uses some of these, as with `dead_code` above.
#[allow(unused_imports)]
pub use grace_testkit::http1::{
    Client, Response, parse_head, read_chunk, read_head, read_response, read_response_blocking,
};
#[allow(unused_imports)]
pub use grace_testkit::process::{
    Gone, alive, pid, read, replace_file, signal, subreaper, unique_prefix, wait_gone,
};

/// The demo binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_grace-demo");

/// Loose bound for anything that should be prompt: never flakes on a loaded machine.
pub const SOON: Duration = Duration::from_secs(10);

/// Looser still, for the upgrade tests' waits on things that should take milliseconds: never
/// flakes on a loaded 2-core machine, still catches a hang.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Tests that touch the shared database servers run one at a time: server-wide counters
/// (`Aborted_clients`, `sessions_abandoned`) must only move because of the test reading them.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The URL in `var`, or `None` after printing why the test is skipped.
pub fn env_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: {var} not set");
            None
        }
    }
}

// `TempDir`: scratch directories under `target/tmp`, on the disk of the demo binary, which
// the upgrade tests hard-link into them.
grace_testkit::target_tmpdir!();

/// Points `path` at the real demo binary again (a fresh hard link, renamed over it).
pub fn install_real_binary(path: &Path) {
    let tmp = path.with_extension("link");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(BIN, &tmp).is_err() {
        std::fs::copy(BIN, &tmp).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
}

/// A `grace-demo` service (a pid file, every generation's stderr in one log file) and every
/// generation it went through, for the upgrade tests.
///
/// Its waits block (they poll the pid file, the log, `waitpid`): an async test calls them
/// from the main task of a multi-thread runtime, which `#[tokio::test]` runs on its own
/// thread, so the tasks it spawned keep running meanwhile.
pub struct Service {
    pub scratch: TempDir,
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when the service was given one.
    pub admin: Option<SocketAddr>,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    /// Every generation, oldest first.
    pub pids: Vec<u32>,
    /// Generations seen to exit (reaped here).
    pub retired: HashSet<u32>,
}

impl Service {
    /// Starts `program` (the demo, or a link to it) in `scratch` with `--listen 127.0.0.1:0`,
    /// an SQLite ledger and a pid file there, then `args`; waits until it serves.
    // Every generation, this first one included, is reaped by pid (`wait_gone`).
    #[allow(clippy::zombie_processes)]
    pub fn start(scratch: TempDir, program: &Path, args: &[&str]) -> Service {
        subreaper();
        let pid_file = scratch.path("grace-demo.pid");
        let log = scratch.path("stderr.log");
        let db = format!("sqlite://{}?mode=rwc", scratch.path("ledger.db").display());
        let mut child = std::process::Command::new(program)
            .current_dir(&scratch.0)
            .args(["--listen", "127.0.0.1:0", "--db", &db, "--pid-file"])
            .arg(&pid_file)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn grace-demo");
        // Every generation writes its `listening on` line to this pipe: keep draining it.
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("no `listening on` line; stderr:\n{}", read(&log))
        });
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        // With `--admin-listen`, the next line says where.
        let admin = args.contains(&"--admin-listen").then(|| {
            let line = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("no `admin listening on` line; stderr:\n{}", read(&log))
            });
            admin_addr(&line)
        });
        let service = Service {
            scratch,
            addr,
            admin,
            pid_file,
            log,
            pids: vec![child.id()],
            retired: HashSet::new(),
        };
        // The first generation writes the pid file before it binds: it serves now.
        assert_eq!(
            service.pid(),
            Some(child.id()),
            "stderr:\n{}",
            service.stderr()
        );
        service
    }

    /// The pid in the pid file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    pub fn current(&self) -> u32 {
        *self.pids.last().unwrap()
    }

    pub fn stderr(&self) -> String {
        read(&self.log)
    }

    /// Waits until the pid file names a pid that is `ok`.
    fn wait_pid(&self, ok: impl Fn(u32) -> bool) -> u32 {
        let t = Instant::now();
        loop {
            if let Some(p) = self.pid().filter(|&p| ok(p)) {
                return p;
            }
            assert!(
                t.elapsed() < PATIENCE,
                "pid file not updated within {PATIENCE:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGHUP to the current generation (the start of an upgrade); returns its pid.
    pub fn hup(&self) -> u32 {
        let old = self.current();
        signal(old, Signal::HUP);
        old
    }

    /// After [`hup`](Self::hup) to `old`: waits until the pid file names a new generation (it
    /// is ready); records and returns its pid.
    pub fn next(&mut self, old: u32) -> u32 {
        let new = self.wait_pid(|p| p != old);
        self.pids.push(new);
        new
    }

    /// SIGHUP to the current generation; waits for the next one and returns its pid (the old
    /// one may still be draining).
    pub fn upgrade(&mut self) -> u32 {
        let old = self.hup();
        self.next(old)
    }

    /// After [`hup`](Self::hup) to `old`: waits until a new generation is ready and the old
    /// one has exited with status 0 (it drained cleanly); returns the new pid.
    pub fn upgraded(&mut self, old: u32) -> u32 {
        let new = self.next(old);
        self.retire_old();
        new
    }

    /// SIGHUP to the current generation, expecting the upgrade to fail: waits until the old
    /// process says so (its `n`th failure), then checks it still is the main process.
    pub fn failed_upgrade(&self, n: usize) -> String {
        self.hup();
        let line = self.wait_log("upgrade failed", n);
        assert_eq!(self.pid(), Some(self.current()), "the pid file changed");
        assert!(alive(self.current()), "the old process died");
        line
    }

    /// Waits until the log holds `needle` `n` times; returns the `n`th line.
    pub fn wait_log(&self, needle: &str, n: usize) -> String {
        let t = Instant::now();
        loop {
            let log = self.stderr();
            if let Some(line) = log.lines().filter(|l| l.contains(needle)).nth(n - 1) {
                return line.to_owned();
            }
            assert!(
                t.elapsed() < PATIENCE,
                "no {n}th {needle:?} in the log within {PATIENCE:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every generation before the current one has exited with status 0 (each
    /// is our child by then: the first one, or re-parented here once its parent exited).
    pub fn retire_old(&mut self) {
        let old = self.pids.len() - 1;
        self.retire(old);
    }

    /// Like [`retire_old`](Self::retire_old), for the first `generations`.
    pub fn retire(&mut self, generations: usize) {
        for (i, &p) in self.pids[..generations].iter().enumerate() {
            if self.retired.contains(&p) {
                continue;
            }
            let gone = wait_gone(p, PATIENCE);
            self.retired.insert(p);
            // A generation whose drain ends before its parent's (an older generation still
            // closing its resources) is reaped by that parent: its status is not ours to see
            // then, only that it is gone. The first generation is always our child.
            let reaped_by_parent = i > 0 && gone == Gone::Elsewhere;
            if gone != Gone::Exited(Some(0)) && !reaped_by_parent {
                panic!(
                    "generation {i} ({p}) ended with {gone:?}; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// SIGTERM to the current generation; checks that it and every older one exited
    /// cleanly (status 0).
    pub fn stop(mut self) {
        signal(self.current(), Signal::TERM);
        self.retire(self.pids.len());
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Only after a failure: leave nothing running.
        for &p in &self.pids {
            if !self.retired.contains(&p) && alive(p) {
                let _ = rustix::process::kill_process(pid(p), Signal::KILL);
                let _ = wait_gone(p, PATIENCE);
            }
        }
        if std::thread::panicking() {
            let log = self.stderr();
            // The tail: the log of many upgrades (of a thousand connections) is long.
            let mut from = log.len().saturating_sub(20_000);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            let cut = if from > 0 { "…" } else { "" };
            eprintln!(
                "service log ({}):\n{cut}{}",
                self.scratch.0.display(),
                &log[from..]
            );
        }
    }
}

/// The address in the demo's `admin listening on ADDR` line.
fn admin_addr(line: &str) -> SocketAddr {
    line.strip_prefix("admin listening on ")
        .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
        .trim()
        .parse()
        .unwrap()
}

/// A running `grace-demo`.
pub struct Demo {
    pub child: Child,
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when it was given one.
    pub admin: Option<SocketAddr>,
    pub pid: u32,
    stderr: Arc<Mutex<String>>,
    _stdout: tokio::process::ChildStdout,
}

/// How a demo ended.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub report: Value,
    pub stderr: String,
    /// From the call to [`Demo::wait_exit`] to the exit.
    pub took: Duration,
}

impl Exit {
    /// The names of the report's resource lines, in closing order, with their outcome.
    pub fn resources(&self) -> Vec<(String, String)> {
        task_lines(&self.report["resources"])
    }

    pub fn jobs(&self) -> Vec<(String, String)> {
        task_lines(&self.report["jobs"])
    }
}

fn task_lines(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["name"].as_str().unwrap_or_default().to_owned(),
                        t["outcome"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Demo {
    /// Starts `grace-demo --listen 127.0.0.1:0 ARGS…` in `dir` and waits for its address.
    pub async fn start(dir: &TempDir, args: &[String]) -> Demo {
        Demo::start_with(Command::new(env!("CARGO_BIN_EXE_grace-demo")), dir, args).await
    }

    /// Like [`Demo::start`], through `cmd` (a wrapper such as `sh -c 'ulimit …; exec …'`).
    pub async fn start_with(cmd: Command, dir: &TempDir, args: &[String]) -> Demo {
        Demo::start_at(cmd, dir, "127.0.0.1:0", args).await
    }

    /// Like [`Demo::start_with`], listening on `listen`.
    pub async fn start_at(mut cmd: Command, dir: &TempDir, listen: &str, args: &[String]) -> Demo {
        let mut child = cmd
            .current_dir(&dir.0)
            .args(["--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn grace-demo");
        let pid = child.id().expect("pid");
        // Keep reading stderr so a chatty demo never blocks on a full pipe.
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut line = String::new();
            while err.read_line(&mut line).await.unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line)).await;
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(addr) if read.is_ok() => addr.parse().unwrap(),
            _ => {
                let _ = child.kill().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "grace-demo did not start: {line:?}\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let admin = match args.iter().any(|a| a == "--admin-listen") {
            false => None,
            true => {
                line.clear();
                let read =
                    tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
                        .await;
                if read.is_err() {
                    let _ = child.kill().await;
                    panic!("no `admin listening on` line\n{}", stderr.lock().unwrap());
                }
                Some(admin_addr(&line))
            }
        };
        Demo {
            child,
            addr,
            admin,
            pid,
            stderr,
            _stdout: stdout.into_inner(),
        }
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        signal(self.pid, sig);
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit, at most `limit`; returns the exit code and the JSON report.
    pub async fn wait_exit(mut self, limit: Duration) -> Exit {
        let t = Instant::now();
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "grace-demo did not exit within {limit:?}\n{}",
                    self.stderr()
                );
            }
        };
        let took = t.elapsed();
        // The stderr reader may still be copying the last lines.
        let mut stderr = String::new();
        for _ in 0..100 {
            stderr = self.stderr();
            if stderr.lines().any(|l| l.starts_with('{')) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        Exit {
            code: status.code().unwrap_or(-1),
            report,
            stderr,
            took,
        }
    }
}

/// A raw keep-alive HTTP/1.1 client connection (`TCP_NODELAY`): the kit's [`Client`], with
/// the demo's JSON requests and a bound of 60 s on each response.
pub struct Http(Client);

impl Http {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        Ok(Http(Client::try_connect(addr).await?))
    }

    /// Sends a request and reads its response; an error means the connection closed (or
    /// broke) before a whole response came back.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<Response> {
        self.send(method, path, body).await?;
        self.read().await
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<()> {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: grace\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        self.0.try_write(head.as_bytes()).await?;
        self.0.try_write(body.as_bytes()).await
    }

    /// The connection itself, to read what follows a head (a stream's raw chunks).
    pub fn raw(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.0.io
    }

    pub async fn read(&mut self) -> std::io::Result<Response> {
        within_a_minute(self.0.read_response()).await
    }

    /// Reads a response's status line and headers only (its body may still be streaming).
    pub async fn read_head(&mut self) -> std::io::Result<Response> {
        within_a_minute(self.0.read_head()).await
    }
}

async fn within_a_minute<T>(read: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))?
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    Http::connect(addr).await?.request(method, path, body).await
}

/// A self-signed certificate for `localhost`.
pub struct Cert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

pub fn cert() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Cert {
        cert_pem: c.cert.pem(),
        key_pem: c.key_pair.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

/// A TLS client that trusts only `root` and offers ALPN `http/1.1`.
pub fn tls_connector(root: CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` through `connector`, for the name `localhost`.
pub async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<BufReader<TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    Ok(BufReader::new(connector.connect(name, tcp).await?))
}

/// A small deterministic random source for load generators.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A transfer row as the database holds it.
#[derive(Debug, Clone)]
pub struct TransferRow {
    pub id: String,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub settlement: Option<String>,
}

/// Everything the ledger tables hold.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accounts: Vec<(String, i64)>,
    pub transfers: Vec<TransferRow>,
    /// `(id, transfers, total)`.
    pub settlements: Vec<(String, i64, i64)>,
}

/// Reads the ledger tables with `prefix` through one connection, closed cleanly; drops
/// them afterwards when `drop_tables`.
pub async fn snapshot(url: &str, prefix: &str, drop_tables: bool) -> Snapshot {
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let mut snap = Snapshot::default();
    for row in sqlx::query(&format!("SELECT id, balance FROM {prefix}accounts"))
        .fetch_all(&mut db)
        .await
        .unwrap()
    {
        snap.accounts.push((row.get(0), row.get(1)));
    }
    for row in sqlx::query(&format!(
        "SELECT id, from_id, to_id, amount, settlement_id FROM {prefix}transfers"
    ))
    .fetch_all(&mut db)
    .await
    .unwrap()
    {
        snap.transfers.push(TransferRow {
            id: row.get(0),
            from: row.get(1),
            to: row.get(2),
            amount: row.get(3),
            settlement: row.get(4),
        });
    }
    for row in sqlx::query(&format!(
        "SELECT id, transfers, total FROM {prefix}settlements"
    ))
    .fetch_all(&mut db)
    .await
    .unwrap()
    {
        snap.settlements.push((row.get(0), row.get(1), row.get(2)));
    }
    if drop_tables {
        drop_ledger_tables(&mut db, prefix).await;
    }
    db.close().await.unwrap();
    snap
}

async fn drop_ledger_tables(db: &mut sqlx::AnyConnection, prefix: &str) {
    for t in ["transfers", "accounts", "settlements"] {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {prefix}{t}"))
            .execute(&mut *db)
            .await;
    }
}

/// Drops the ledger tables with `prefix` (for tests that fail half-way, call it first).
pub async fn cleanup(url: &str, prefix: &str) {
    sqlx::any::install_default_drivers();
    if let Ok(mut db) = sqlx::AnyConnection::connect(url).await {
        drop_ledger_tables(&mut db, prefix).await;
        let _ = db.close().await;
    }
}

/// The transfer ids in an audit file (one JSON line each).
pub fn audit_ids(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l:?}"))["id"]
                .as_str()
                .expect("audit line without id")
                .to_owned()
        })
        .collect()
}

/// The transfer ids in the Redis list `key`, which is deleted afterwards.
pub async fn redis_ids(url: &str, key: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let events: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `CLIENT LIST` lines of the connections named `name`.
pub async fn redis_clients(url: &str, name: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let needle = format!(" name={name} ");
    list.lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}
