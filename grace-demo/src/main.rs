//! `grace-demo`: a small service built on grace, to watch it drain, restart and upgrade.
//!
//! SIGTERM/SIGINT drain (a second one forces); SIGUSR1 reloads the TLS certificate
//! (`--tls-cert`, `--tls-key`); SIGHUP upgrades with zero downtime: the
//! program at the path it was started from starts with the same arguments, takes over the
//! listening socket, re-reads `--config`, and this process drains once it is ready (see
//! `docs/restart.md`).
//!
//! Exit codes: 0 when everything drained cleanly; 3 when connections (or jobs, or resources)
//! had to be cut; 1 on a start-up error.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

mod config;
mod debug;
// The workspace's one duration syntax (`500ms`, `1.5s`, `2h`, `0`), shared with grace-check.
#[path = "../../grace-check/src/duration.rs"]
mod duration;
mod ledger;
mod lines;
mod routes;
mod upgraded;
mod ws;

use duration::parse_duration;

/// Exit code when the shutdown had to cut something (see the report on stderr).
const EXIT_FORCED: i32 = 3;

/// The name the `--admin-listen` socket is passed on under at upgrades (`LISTEN_FDNAMES`),
/// and under which systemd's socket activation may pass it (`FileDescriptorName=admin`).
const ADMIN_LISTENER: &str = "admin";

/// Commands besides serving.
#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Ask a running grace-demo (see `--control-socket`) for its status, an upgrade or a
    /// drain: `grace-ctl`, built in.
    Ctl(grace_ctl::Ctl),
}

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "A demo service for grace: graceful shutdown and zero-downtime restart"
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Answer `grace-ctl` and `grace-demo ctl` (status, upgrade, drain) on a Unix socket at
    /// this path, owner-only.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Address to listen on (`HOST:PORT`, or `unix:PATH`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Serve `/metrics`, `/debug` and `/debug/conns` (and the live page's event stream) on
    /// this address (`HOST:PORT`, or `unix:PATH`) instead of `--listen`, where they then
    /// answer 404. Drained with `--listen`'s connections, into the same report, and passed
    /// on with it at upgrades. The file of a `unix:` socket is left in place at exit (the
    /// next start replaces it).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Permissions of the `unix:` socket file, in octal (e.g. `660`), set before it accepts
    /// connections; by default what the umask leaves.
    #[arg(long, value_parser = parse_socket_mode)]
    socket_mode: Option<u32>,
    /// How long a drain may wait before forcing connections closed (e.g. `30s`, `500ms`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// How long a client may take to send request headers (`0` turns the guard off).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// A request body must arrive within this time of its head, plus 1 s per 500 bytes
    /// received (`0` turns the guard off).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    request_body_timeout: Duration,
    /// How long a keep-alive connection may stay idle before it is closed (`0`: forever).
    #[arg(long, default_value = "75s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// An overall bound on a stop, from the signal to exit (Kubernetes'
    /// `terminationGracePeriodSeconds`, systemd's `TimeoutStopSec`); `0`: none. In-flight
    /// work is then cut early enough to leave the resources their close timeouts.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    stop_deadline: Duration,
    /// Spread the goodbyes of WebSockets over this window after a drain starts, so their
    /// clients do not all reconnect at once (`0`: all at once).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    goodbye_spread: Duration,
    /// After SIGTERM, keep accepting and serving this long with readiness already failing,
    /// so load balancers stop routing here before the listener closes.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pre_stop_delay: Duration,
    /// The ledger's database: `sqlite://FILE?mode=rwc`, `mysql://…` (MariaDB) or
    /// `postgres://…`.
    #[arg(long, default_value = "sqlite://grace-demo.db?mode=rwc")]
    db: String,
    /// Size of the database connection pool (1 to 1000).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    db_max_connections: u32,
    /// Redis to push transfer events to (`redis://HOST:PORT`); none by default.
    #[arg(long)]
    redis: Option<String>,
    /// File every transfer is appended to, one JSON line each.
    #[arg(long, default_value = "grace-demo-audit.log")]
    audit_file: PathBuf,
    /// Prefix of the table names and of the Redis list key.
    #[arg(long, default_value = "grace_")]
    table_prefix: String,
    /// How often the settlement job runs (at least 100ms).
    #[arg(long, default_value = "1s", value_parser = parse_settle_interval)]
    settle_interval: Duration,
    /// TOML configuration (`greeting`, `shutdown_timeout`), read again by every upgrade.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the main process's PID in this file (rewritten by each upgrade).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// How long an upgrade (SIGHUP) waits for the new process before rolling back.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// At an upgrade, pass idle HTTP/1.1 connections (socket and unread bytes) to the new
    /// process instead of closing them, for at most this long (`0`: off, close them).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hand_over_window: Duration,
    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`); SIGUSR1 reads both
    /// files again: new handshakes get the new certificate, a bad pair is refused.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// At most this many connections at once (`0`: no limit); at the limit new connections
    /// wait in the kernel's accept queue until one closes, or make room by closing the
    /// connection idle longest, or those that sent nothing within 200 ms of their accept
    /// (never one with a request in flight).
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Close connections gracefully at about this age (±10 %): HTTP/1 `Connection: close`,
    /// HTTP/2 GOAWAY (`0`: never).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    max_connection_age: Duration,
}

impl Args {
    fn ledger(&self) -> ledger::Config {
        ledger::Config {
            db_url: self.db.clone(),
            redis_url: self.redis.clone(),
            audit_file: self.audit_file.clone(),
            table_prefix: self.table_prefix.clone(),
            max_connections: self.db_max_connections,
            client_name: format!("grace-demo-{}", std::process::id()),
        }
    }
}

/// The settlement interval: a pass is a database transaction, so not more often than
/// ten times a second (`0` would be a busy loop).
fn parse_settle_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is too short: at least 100ms"));
    }
    Ok(d)
}

/// A socket file's permissions in octal: `660`, `0600`.
fn parse_socket_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal permission mode like 660 (at most 777)"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Bad flags are a start-up error like any other: exit 1 (clap's own choice is 2).
    let args = Args::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    });
    if let Some(Command::Ctl(ctl)) = &args.command {
        std::process::exit(grace_ctl::run(ctl));
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let clean = runtime.block_on(run(args))?;
    // Exit at once, the runtime as it is: the tasks of connections the drain shut or forced
    // may still be unwinding, and the kernel closes what they hold faster than dropping
    // them would (shutting the runtime down first added ~10 ms with 10,000 connections).
    std::process::exit(if clean { 0 } else { EXIT_FORCED });
}

/// Reads the certificate and key again on every SIGUSR1. A failed reload is logged (by
/// grace) and the previous certificate keeps serving.
fn reload_on_sigusr1(
    tls: grace_http::tls::TlsConfig,
    cert: PathBuf,
    key: PathBuf,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let _ = tls.reload_from_pem_files(&cert, &key);
        }
    });
    Ok(())
}

/// Binds `--admin-listen`: TCP on the first address `addr` resolves to, or `unix:PATH`.
async fn bind_admin(addr: &str) -> anyhow::Result<grace_http::Listener> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok(grace_http::Listener::bind_unix(path)?);
    }
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match grace_http::Listener::bind(a) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no address"), Into::into))
}

async fn run(args: Args) -> anyhow::Result<bool> {
    // First: the program to restart into is resolved now, before anything can replace it.
    let restart = config::restart(
        args.pid_file.as_ref(),
        args.ready_timeout,
        args.hand_over_window,
    );
    let settings = config::load(args.config.as_deref())?;
    // The WebSockets the previous generation hands over, resumed here (see `ws`).
    let restart = match settings.websocket_handover {
        true => lines::resume(ws::resume(restart)),
        false => restart,
    };
    // GET /metrics, /debug: the process's metrics recorder, and the live page's wake-ups.
    let observer = debug::Observer::install().context("installing the metrics recorder")?;
    // Sockets handed over by the previous generation (or systemd), else bind --listen (and
    // --admin-listen): the admin socket is taken out by name, the rest serve the app.
    let mut inherited = grace_http::inherited_listeners()?;
    let admin = match &args.admin_listen {
        None => None,
        Some(addr) => Some(
            match inherited.as_mut().and_then(|i| i.take(ADMIN_LISTENER)) {
                Some(listener) => listener,
                None => bind_admin(addr)
                    .await
                    .with_context(|| format!("binding --admin-listen {addr}"))?,
            },
        ),
    };
    let server = match inherited {
        Some(inherited) => grace_http::Server::from_inherited(inherited),
        None => {
            // The first generation: a pid file we cannot write is a start-up error, said
            // now (an upgrade's new process writes it when ready, and rolls back if it
            // cannot).
            if let Some(path) = &args.pid_file {
                grace_http::write_pid_file(path)
                    .with_context(|| format!("writing the pid file {}", path.display()))?;
            }
            match (args.listen.strip_prefix("unix:"), args.socket_mode) {
                (Some(path), None) => grace_http::Server::bind(format!("unix:{}", path)).await?,
                (Some(path), Some(mode)) => grace_http::Server::bind_unix_with_mode(path, mode)?,
                (None, Some(_)) => anyhow::bail!("--socket-mode is for unix: listeners only"),
                (None, None) => grace_http::Server::bind(args.listen.as_str()).await?,
            }
        }
    };
    let header_read_timeout = Some(args.header_read_timeout).filter(|t| !t.is_zero());
    let idle_timeout = Some(args.idle_timeout).filter(|t| !t.is_zero());
    let server = server
        .drain_policy(
            grace_http::DrainPolicy::default()
                .shutdown_timeout(settings.shutdown_timeout.unwrap_or(args.shutdown_timeout))
                .pre_stop_delay(args.pre_stop_delay)
                .goodbye_spread(args.goodbye_spread)
                .stop_deadline(Some(args.stop_deadline).filter(|d| !d.is_zero())),
        )
        .timeouts(
            grace_http::Timeouts::default()
                .header_read(header_read_timeout)
                .idle(idle_timeout)
                .request_body(
                    Some(args.request_body_timeout).filter(|t| !t.is_zero()),
                    500,
                ),
        )
        // GET /whoami answers the peer as axum's ConnectInfo sees it.
        .peer_addr_in_requests(true)
        // The report and `ctl status` say which request a forced connection was serving.
        .record_requests(true)
        .limits(
            grace_http::Limits::default()
                .max_connections(Some(args.max_connections).filter(|&n| n > 0))
                .max_connection_age(Some(args.max_connection_age).filter(|d| !d.is_zero())),
        )
        .on_conn_state(observer.hook());
    // TLS: every generation loads the certificate itself (an upgrade hands over only the
    // listening socket); SIGUSR1 reloads it in place.
    let server = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = grace_http::tls::TlsConfig::from_pem_files(cert, key)
                .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
            reload_on_sigusr1(tls.clone(), cert.clone(), key.clone())?;
            server.tls(tls)
        }
        _ => server,
    };
    let addr = server
        .local_addrs()
        .first()
        .map(ToString::to_string)
        .context("no listener")?;
    let handle = server.handle();
    let ledger = ledger::Ledger::open(&args.ledger())
        .await
        .context("opening the ledger")?;
    // The settlement job, then the audit file, Redis and the database pool on shutdown.
    ledger.register(&handle, args.settle_interval);
    // /metrics and /debug: on the admin listener if there is one, else with the rest.
    let observe = observer.router(&handle);
    let app = routes::router(Arc::clone(&ledger), &handle);
    let app = match admin {
        None => app.merge(observe.clone()),
        Some(_) => app,
    };
    let app = app.layer(axum::Extension(settings.greeting));
    let mut serve = server.serve(app);
    let mut admin_addr = None;
    if let Some(admin) = admin {
        admin_addr = Some(admin.local_addr().context("the admin listener's address")?);
        serve = serve.also_serve(ADMIN_LISTENER, admin, observe);
    }
    let mut serve = serve.with_signals().with_restart(restart);
    if let Some(path) = &args.control_socket {
        // Refused (a live socket, a file, a link at the path) before we say we listen.
        serve = serve.try_with_control(path)?;
    }
    // Signal handlers are installed: now scripts may read the address and signal us.
    // An upgrade's new process inherits stdout, which may be gone by then (a closed
    // terminal or pipe): that must not make it fail, so a write error is ignored.
    let _ = writeln!(std::io::stdout(), "listening on {addr}");
    if let Some(admin) = admin_addr {
        let _ = writeln!(std::io::stdout(), "admin listening on {admin}");
    }
    let report = serve.await?;
    let _ = writeln!(std::io::stderr(), "{}", report.to_json());
    Ok(report.is_clean())
}
