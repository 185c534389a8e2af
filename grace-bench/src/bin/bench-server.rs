//! `bench-server --mode grace|grace-no-conn-info|hyper|axum|axum-connect-info|axum-server [--handler router|bare] [--tls] --listen 127.0.0.1:0`
//!
//! Serves `GET /` → `200 hello` with the same handler in every mode and prints
//! `listening on ADDR` on stdout once bound and ready for signals. The handler is
//! `--handler router` (default: a one-route axum `Router`) or `--handler bare` (a
//! `tower::service_fn` answering `hello` to any request, without axum; not for `axum`).
//! Every mode serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, as
//! hyper-util's auto builder detects the version. On SIGTERM:
//!
//! - `grace`: `grace_http::Server` with `.with_signals()` drains, then prints
//!   `drained: clean=… conns=… total_us=…` on stdout and exits; `grace-no-conn-info` the
//!   same with `.peer_addr_in_requests(false)` (no `ConnectInfo`, `ConnAddrs` in
//!   requests);
//! - `axum-connect-info`: `axum` serving `into_make_service_with_connect_info::<SocketAddr>()`;
//! - `axum`: `axum::serve(..).with_graceful_shutdown(sigterm)` drains and exits;
//! - `hyper`: a bare `hyper_util` auto-builder accept loop; it has no drain, it stops
//!   accepting and returns from `main`, which drops every connection with the runtime;
//! - `hyper-timer`: `hyper` plus the HTTP/1 settings grace's builder uses (a `TokioTimer`
//!   and a 10 s `header_read_timeout`), to tell grace's own cost from that setting's.
//!
//! - `axum-server`: `axum_server` (its own accept loop, hyper-util's auto builder) serving
//!   the router, with a graceful shutdown on SIGTERM; with `--tls`, its `RustlsAcceptor`.
//!
//! `--tls` (modes `grace` and `axum-server`): a self-signed certificate for `localhost`
//! (ECDSA P-256, made by rcgen at start) and one rustls `ServerConfig` (ring provider,
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`), made by `grace_http::tls::TlsConfig` and
//! given as it is to axum-server (`RustlsConfig::from_config`): both servers run the very
//! same rustls configuration.
//!
//! Every mode uses the same listening socket (`grace_http::Listener::bind`: `SO_REUSEADDR`,
//! backlog 4096) and sets `TCP_NODELAY` on accepted connections.

use std::net::SocketAddr;
use std::time::Duration;

use axum_server::accept::NoDelayAcceptor;
use clap::{Parser, ValueEnum};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::signal::unix::{SignalKind, signal};
use tower::BoxError;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// `grace_http::Server` with `.with_signals()`.
    Grace,
    /// `grace` with `.peer_addr_in_requests(false)`: requests without the connection's
    /// addresses (`ConnectInfo`, `ConnAddrs`), to measure what they cost.
    GraceNoConnInfo,
    /// Bare `hyper_util::server::conn::auto::Builder` accept loop, no drain.
    Hyper,
    /// `axum::serve` with graceful shutdown on SIGTERM.
    Axum,
    /// `axum` serving `into_make_service_with_connect_info::<SocketAddr>()`: axum's
    /// `ConnectInfo` in every request, as grace puts it there by default.
    AxumConnectInfo,
    /// `hyper` with grace's HTTP/1 timer and 10 s header read timeout.
    HyperTimer,
    /// `axum_server` (with `--tls`: `axum_server::tls_rustls`), graceful shutdown on SIGTERM.
    AxumServer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Handler {
    /// A one-route `axum::Router`.
    Router,
    /// `tower::service_fn` answering `hello` (no axum).
    Bare,
}

#[derive(Parser, Debug)]
#[command(about = "HTTP server for grace-bench: GET / -> 200 hello")]
struct Args {
    /// Which server to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Which handler to serve.
    #[arg(long, value_enum, default_value = "router")]
    handler: Handler,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve HTTPS (modes `grace` and `axum-server`) with a self-signed certificate.
    #[arg(long)]
    tls: bool,
}

/// The TLS configuration both TLS modes serve: a fresh self-signed certificate.
fn tls_config() -> anyhow::Result<grace_http::tls::TlsConfig> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    Ok(grace_http::tls::TlsConfig::from_pem(
        cert.cert.pem().as_bytes(),
        cert.key_pair.serialize_pem().as_bytes(),
    )?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = grace_bench::raise_nofile() {
        eprintln!("bench-server: cannot raise RLIMIT_NOFILE: {e}");
    }
    let grace_http::Listener::Tcp(listener) = grace_http::Listener::bind(args.listen)? else {
        unreachable!("Listener::bind makes a TCP listener");
    };
    let addr = listener.local_addr()?;
    let tls = args.tls.then(tls_config).transpose()?;
    anyhow::ensure!(
        tls.is_none()
            || matches!(
                args.mode,
                Mode::Grace | Mode::GraceNoConnInfo | Mode::AxumServer
            ),
        "--tls is for modes grace and axum-server"
    );

    match args.mode {
        Mode::Grace | Mode::GraceNoConnInfo => {
            // `grace`: the defaults, as a newcomer gets them (addresses in requests for the
            // Router, none for the bare handler); `grace-no-conn-info`: none for either.
            let mut server = grace_http::Server::from_listener(listener).drain_policy(
                grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(30)),
            );
            if let Mode::GraceNoConnInfo = args.mode {
                server = server.peer_addr_in_requests(false);
            }
            if let Some(tls) = tls {
                server = server.tls(tls);
            }
            let report = match args.handler {
                Handler::Router => {
                    let serve = server.serve(grace_bench::router()).with_signals();
                    println!("listening on {addr}");
                    serve.await?
                }
                Handler::Bare => {
                    let serve = server.serve(grace_bench::bare()).with_signals();
                    println!("listening on {addr}");
                    serve.await?
                }
            };
            let phases: Vec<String> = report
                .phases
                .iter()
                .map(|p| format!("{:?}:{}us", p.phase, p.took.as_micros()))
                .collect();
            println!(
                "drained: clean={} conns={} total_us={} phases={}",
                report.is_clean(),
                report.at_start.total(),
                report.total.as_micros(),
                phases.join(",")
            );
            // Drained: exit at once, as a service does (grace-demo too), rather than
            // dropping the runtime and whatever tasks are still unwinding.
            std::process::exit(0);
        }
        Mode::Axum | Mode::AxumConnectInfo => {
            anyhow::ensure!(
                args.handler == Handler::Router,
                "axum modes serve the router only"
            );
            let app = grace_bench::router();
            let mut term = signal(SignalKind::terminate())?;
            println!("listening on {addr}");
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|s| {
                let _ = s.set_nodelay(true);
            });
            let stop = async move {
                term.recv().await;
            };
            if let Mode::AxumConnectInfo = args.mode {
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?;
            } else {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?;
            }
            // The same exit as grace's.
            std::process::exit(0);
        }
        Mode::AxumServer => {
            anyhow::ensure!(
                args.handler == Handler::Router,
                "axum-server mode serves the router only"
            );
            let app = grace_bench::router().into_make_service();
            let mut term = signal(SignalKind::terminate())?;
            let handle = axum_server::Handle::new();
            let on_term = handle.clone();
            tokio::spawn(async move {
                term.recv().await;
                on_term.graceful_shutdown(Some(Duration::from_secs(30)));
            });
            let server = axum_server::Server::<SocketAddr>::from_listener(listener)
                .handle(handle)
                .acceptor(NoDelayAcceptor::new());
            println!("listening on {addr}");
            match tls {
                Some(tls) => {
                    let config =
                        axum_server::tls_rustls::RustlsConfig::from_config(tls.server_config());
                    server
                        .acceptor(
                            axum_server::tls_rustls::RustlsAcceptor::new(config)
                                .acceptor(NoDelayAcceptor::new()),
                        )
                        .serve(app)
                        .await?
                }
                None => server.serve(app).await?,
            }
            std::process::exit(0);
        }
        Mode::Hyper | Mode::HyperTimer => match args.handler {
            Handler::Router => {
                let service = TowerToHyperService::new(grace_bench::router());
                hyper_loop(args.mode, listener, addr, service).await?
            }
            Handler::Bare => {
                let service = TowerToHyperService::new(grace_bench::bare());
                hyper_loop(args.mode, listener, addr, service).await?
            }
        },
    }
    Ok(())
}

/// The bare hyper-util accept loop (`hyper` and `hyper-timer` modes). It has no drain: on
/// SIGTERM it stops accepting and returns, and the runtime drops every connection.
async fn hyper_loop<S, B>(
    mode: Mode,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    service: S,
) -> anyhow::Result<()>
where
    S: hyper::service::Service<Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut term = signal(SignalKind::terminate())?;
    println!("listening on {addr}");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if let Mode::HyperTimer = mode {
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
    }
    loop {
        let accepted = tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("bench-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (builder, service) = (builder.clone(), service.clone());
        tokio::spawn(async move {
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
    Ok(())
}
