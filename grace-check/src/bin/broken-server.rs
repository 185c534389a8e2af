//! `broken-server`: a small hyper server with a textbook drain, and flags that break it one
//! piece at a time. The grace-check tests run each scenario against the matching defect and
//! assert that it fails (a check that cannot fail is a defect), and run every scenario
//! against the unbroken server and assert that it passes.
//!
//! Routes: `GET /`, `GET /sleep/{ms}`, `GET /stream/{n}` (n chunks 100 ms apart), `GET /ws`
//! (WebSocket echo; close 1001 on drain). SIGTERM/SIGINT drain, a second one forces; exit 0
//! when nothing was cut, 3 when the deadline or a second signal cut something.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};
use tower::BoxError;

// The workspace's one duration syntax, and grace-check's one stream wrapper.
#[path = "../duration.rs"]
mod duration;
#[path = "../tap.rs"]
mod tap;

use duration::parse_duration;
use tap::ReadTap;

#[derive(Parser, Debug, Clone)]
struct Flags {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How long the drain waits before forcing.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Serve TLS with this certificate chain (PEM)…
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// …and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Defect: keep-alive connections are never closed by the drain (it waits for them).
    #[arg(long)]
    never_close_idle: bool,
    /// Defect: keep accepting and serving new connections while draining.
    #[arg(long)]
    keep_accepting: bool,
    /// Defect: in-flight HTTP/1 responses are not told to close; exit once none is running.
    #[arg(long)]
    no_connection_close: bool,
    /// Defect: wait this long after the drain before exiting.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    linger: Duration,
    /// Defect: the drain waits for connections that have sent nothing.
    #[arg(long)]
    wait_silent: bool,
    /// Defect: the drain waits for connections whose request head is incomplete.
    #[arg(long)]
    wait_partial_heads: bool,
    /// Defect: no deadline: the drain waits for ever.
    #[arg(long)]
    no_deadline: bool,
    /// Defect: a second signal does nothing.
    #[arg(long)]
    ignore_second_signal: bool,
    /// Defect: no SIGINT handler (the default action kills the process).
    #[arg(long)]
    sigint_kills: bool,
    /// Defect: HTTP/2 connections get no GOAWAY.
    #[arg(long)]
    no_goaway: bool,
    /// Defect: streaming responses are cut when the drain starts.
    #[arg(long)]
    cut_streams: bool,
    /// Defect: WebSockets get no close frame.
    #[arg(long)]
    ws_no_close: bool,
    /// Defect: exit at the first signal, dropping what is in flight.
    #[arg(long)]
    exit_immediately: bool,
    /// Defect: a request that does not parse makes the process exit 1.
    #[arg(long)]
    die_on_bad_request: bool,
    /// Defect: accept errors (out of descriptors) are retried at once, in a busy loop.
    #[arg(long)]
    spin_on_accept_error: bool,
    /// Defect: SIGHUP closes the listener and starts a new process that binds the port anew
    /// (after 300 ms of start-up), instead of handing the socket over.
    #[arg(long)]
    naive_restart: bool,
}

type Body = BoxBody<Bytes, BoxError>;

struct Shared {
    flags: Flags,
    draining: watch::Receiver<bool>,
    /// Live connections and upgraded sockets.
    live: watch::Sender<usize>,
    /// Requests being answered.
    inflight: watch::Sender<usize>,
}

/// Counts one live connection (or upgraded socket) while it exists.
struct Live(Arc<Shared>);

impl Live {
    fn new(s: &Arc<Shared>) -> Live {
        s.live.send_modify(|n| *n += 1);
        Live(Arc::clone(s))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n -= 1);
    }
}

/// What a connection has done so far.
#[derive(Default)]
struct ConnState {
    seen_bytes: AtomicBool,
    requests: AtomicUsize,
    h2: AtomicBool,
}

async fn until_draining(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await;
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
) -> Result<Response<Body>, Infallible> {
    conn.requests.fetch_add(1, Ordering::SeqCst);
    if req.version() == http::Version::HTTP_2 {
        conn.h2.store(true, Ordering::SeqCst);
    }
    shared.inflight.send_modify(|n| *n += 1);
    let resp = route(req, &shared).await;
    shared.inflight.send_modify(|n| *n -= 1);
    Ok(resp)
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/" {
        return Response::new(full("hello\n"));
    }
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Response::new(full(format!("slept {ms} ms\n")));
    }
    if let Some(n) = path
        .strip_prefix("/stream/")
        .and_then(|m| m.parse::<u32>().ok())
    {
        let cut = shared.flags.cut_streams;
        let draining = shared.draining.clone();
        let chunks = futures_util::stream::unfold(0u32, move |i| {
            let draining = draining.clone();
            async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if cut && *draining.borrow() {
                    let e: BoxError = "cut by the drain".into();
                    return Some((Err(e), n));
                }
                Some((Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))), i + 1))
            }
        });
        return Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    }
    if path == "/ws" {
        return websocket(req, shared);
    }
    let mut r = Response::new(full("not found\n"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

fn websocket(mut req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("expected a WebSocket upgrade\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _live = Live::new(&shared);
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let mut draining = shared.draining.clone();
        let notice = !shared.flags.ws_no_close;
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        if ws.send(m).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                _ = until_draining(&mut draining), if notice => break,
            }
        }
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "server shutting down".into(),
        }));
        if ws.send(close).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(""))
        .unwrap_or_else(|_| Response::new(full("")))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// How long a connection accepted just before the drain may take to send its first byte:
/// its client may be about to send (a retry after its idle connection was closed), and a
/// close now would reset its request. One silent for longer is closed at once.
const FIRST_BYTE: Duration = Duration::from_millis(200);

async fn serve_conn(io: Box<dyn Io>, shared: Arc<Shared>, _live: Live) {
    let accepted = tokio::time::Instant::now();
    let state = Arc::new(ConnState::default());
    // The connection is marked when its first byte arrives.
    let seen = Arc::clone(&state);
    let io = ReadTap::new(io, move |_: &std::io::Result<()>, new: &[u8]| {
        if !new.is_empty() {
            seen.seen_bytes.store(true, Ordering::SeqCst);
        }
    });
    let svc = {
        let (shared, state) = (Arc::clone(&shared), Arc::clone(&state));
        hyper::service::service_fn(move |req| handle(req, Arc::clone(&shared), Arc::clone(&state)))
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = shared.draining.clone();
    let mut told = false;
    // Silent at the drain, accepted just now: closed at this instant unless a byte came.
    let mut silent_until: Option<tokio::time::Instant> = None;
    let f = &shared.flags;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(silent_until.unwrap_or(accepted)), if silent_until.is_some() => {
                silent_until = None;
                if !state.seen_bytes.load(Ordering::SeqCst) {
                    return; // still silent: closed now
                }
                // A request came meanwhile: answered, then closed.
                conn.as_mut().graceful_shutdown();
            }
            r = conn.as_mut() => {
                if let Err(e) = r {
                    let parse = e
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
                    if parse && f.die_on_bad_request {
                        eprintln!("broken-server: bad request ({e}): exiting");
                        std::process::exit(1);
                    }
                }
                return;
            }
            _ = until_draining(&mut draining), if !told => {
                told = true;
                let requests = state.requests.load(Ordering::SeqCst);
                let seen = state.seen_bytes.load(Ordering::SeqCst);
                if requests == 0 && !seen {
                    if !f.wait_silent {
                        if accepted.elapsed() >= FIRST_BYTE {
                            return; // a silent connection: closed now
                        }
                        silent_until = Some(accepted + FIRST_BYTE);
                    }
                } else if requests == 0 {
                    if !f.wait_partial_heads {
                        return; // a head still arriving: closed now
                    }
                } else if state.h2.load(Ordering::SeqCst) {
                    if !f.no_goaway {
                        conn.as_mut().graceful_shutdown();
                    }
                } else if !f.never_close_idle && !f.no_connection_close {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn tls_acceptor(f: &Flags) -> Option<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = (f.tls_cert.as_ref()?, f.tls_key.as_ref()?);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("reading --tls-cert")
        .collect::<Result<_, _>>()
        .expect("parsing --tls-cert");
    let key = PrivateKeyDer::from_pem_file(key).expect("reading --tls-key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("TLS certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

const NEXT_GENERATION: &str = "BROKEN_SERVER_NEXT_GENERATION";

#[tokio::main]
async fn main() {
    let flags = Flags::parse();
    if std::env::var_os(NEXT_GENERATION).is_some() {
        // The naive restart's new process: start-up work before it binds.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let listener = match TcpListener::bind(flags.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("broken-server: binding {}: {e}", flags.listen);
            std::process::exit(1);
        }
    };
    let (drain_tx, draining) = watch::channel(false);
    let shared = Arc::new(Shared {
        flags: flags.clone(),
        draining,
        live: watch::channel(0).0,
        inflight: watch::channel(0).0,
    });
    let tls = tls_acceptor(&flags);
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = if flags.sigint_kills {
        None
    } else {
        Some(signal(SignalKind::interrupt()).expect("SIGINT handler"))
    };
    let mut hup = if flags.naive_restart {
        Some(signal(SignalKind::hangup()).expect("SIGHUP handler"))
    } else {
        None
    };
    println!("listening on {}", listener.local_addr().expect("address"));

    let accept = {
        let shared = Arc::clone(&shared);
        let mut draining = shared.draining.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = until_draining(&mut draining), if !shared.flags.keep_accepting => return,
                    r = listener.accept() => match r {
                        Ok((tcp, _)) => {
                            let _ = tcp.set_nodelay(true);
                            let live = Live::new(&shared);
                            let shared = Arc::clone(&shared);
                            let tls = tls.clone();
                            tokio::spawn(async move {
                                let io: Box<dyn Io> = match tls {
                                    None => Box::new(tcp),
                                    Some(tls) => {
                                        // A handshake still pending when the drain starts
                                        // is a silent connection: closed, unless broken.
                                        let mut draining = shared.draining.clone();
                                        let wait = shared.flags.wait_silent;
                                        tokio::select! {
                                            r = tls.accept(tcp) => match r {
                                                Ok(s) => Box::new(s),
                                                Err(_) => return,
                                            },
                                            _ = until_draining(&mut draining), if !wait => return,
                                        }
                                    }
                                };
                                serve_conn(io, shared, live).await;
                            });
                        }
                        Err(_) if shared.flags.spin_on_accept_error => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        })
    };

    let restart = async {
        match hup.as_mut() {
            Some(h) => {
                h.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let signalled = async {
        match int.as_mut() {
            Some(i) => tokio::select! { _ = term.recv() => {}, _ = i.recv() => {} },
            None => {
                term.recv().await;
            }
        }
    };
    tokio::select! {
        _ = signalled => {}
        _ = restart => {
            // Close the listener, then start the next process, which binds anew.
            let _ = drain_tx.send(true);
            let _ = accept.await;
            let exe = std::env::current_exe().expect("current exe");
            let _ = std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(NEXT_GENERATION, "1")
                .spawn();
        }
    }
    if flags.exit_immediately {
        std::process::exit(0);
    }
    let _ = drain_tx.send(true);

    let mut live = shared.live.subscribe();
    let mut inflight = shared.inflight.subscribe();
    let drained = async {
        if flags.no_connection_close {
            let _ = inflight.wait_for(|n| *n == 0).await;
        } else {
            let _ = live.wait_for(|n| *n == 0).await;
        }
    };
    let deadline = async {
        if flags.no_deadline {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(flags.shutdown_timeout).await
        }
    };
    let second = async {
        if flags.ignore_second_signal {
            return std::future::pending::<()>().await;
        }
        match int.as_mut() {
            Some(i) => tokio::select! { _ = term.recv() => {}, _ = i.recv() => {} },
            None => {
                term.recv().await;
            }
        }
    };
    let clean = tokio::select! {
        _ = drained => true,
        _ = deadline => false,
        _ = second => false,
    };
    if !flags.linger.is_zero() {
        tokio::time::sleep(flags.linger).await;
    }
    std::process::exit(if clean { 0 } else { 3 });
}
