//! `bench-server --mode grace|hyper|axum [--handler router|bare] --listen 127.0.0.1:0`
//!
//! Serves `GET /` → `200 hello` with the same handler in every mode and prints
//! `listening on ADDR` on stdout once bound and ready for signals. The handler is
//! `--handler router` (default: a one-route axum `Router`) or `--handler bare` (a
//! `tower::service_fn` answering `hello` to any request, without axum; not for `axum`).
//! Every mode serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, as
//! hyper-util's auto builder detects the version. On SIGTERM:
//!
//! - `grace`: `grace_http::Server` with `.with_signals()` drains, then prints
//!   `drained: clean=… conns=… total_us=…` on stdout and exits;
//! - `axum`: `axum::serve(..).with_graceful_shutdown(sigterm)` drains and exits;
//! - `hyper`: a bare `hyper_util` auto-builder accept loop; it has no drain, it stops
//!   accepting and returns from `main`, which drops every connection with the runtime;
//! - `hyper-timer`: `hyper` plus the HTTP/1 settings grace's builder uses (a `TokioTimer`
//!   and a 10 s `header_read_timeout`), to tell grace's own cost from that setting's.
//!
//! Every mode uses the same listening socket (`grace_http::Listener::bind`: `SO_REUSEADDR`,
//! backlog 4096) and sets `TCP_NODELAY` on accepted connections.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::signal::unix::{SignalKind, signal};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// `grace_http::Server` with `.with_signals()`.
    Grace,
    /// Bare `hyper_util::server::conn::auto::Builder` accept loop, no drain.
    Hyper,
    /// `axum::serve` with graceful shutdown on SIGTERM.
    Axum,
    /// `hyper` with grace's HTTP/1 timer and 10 s header read timeout.
    HyperTimer,
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

    match args.mode {
        Mode::Grace => {
            let server = grace_http::Server::from_listener(listener)
                .shutdown_timeout(Duration::from_secs(30));
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
        Mode::Axum => {
            anyhow::ensure!(
                args.handler == Handler::Router,
                "axum mode serves the router only"
            );
            let app = grace_bench::router();
            let mut term = signal(SignalKind::terminate())?;
            println!("listening on {addr}");
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    term.recv().await;
                })
                .await?;
            // The same exit as grace's.
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
