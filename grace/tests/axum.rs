//! The axum path with nothing to ask for (issue 22, item 1): axum's `ConnectInfo` extractor
//! and the local address in every request, `Serve::with_shutdown` as axum's
//! `with_graceful_shutdown`, and jobs written for a `CancellationToken`. Real sockets, real
//! HTTP clients (hyper's, HTTP/1.1 and HTTP/2), the crate with its default features.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::routing::get;
use bytes::Bytes;
use grace_http::{Addr, ConnAddrs, Outcome, Server, Trigger};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Anything that should be immediate: never flakes, still catches a hang.
const SOON: Duration = Duration::from_secs(10);

/// An app as axum users write it: `ConnectInfo<SocketAddr>`, and grace's `ConnAddrs`.
fn app() -> axum::Router {
    axum::Router::new()
        .route(
            "/ip",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .route(
            "/local",
            get(|Extension(addrs): Extension<ConnAddrs>| async move {
                addrs.local().expect("the local address").to_string()
            }),
        )
        .route(
            "/any",
            get(
                |tcp: Option<Extension<ConnectInfo<SocketAddr>>>,
                 Extension(addrs): Extension<ConnAddrs>| async move {
                    format!("tcp={} peer={}", tcp.is_some(), addrs.peer())
                },
            ),
        )
}

/// `GET path` over HTTP/1.1 with hyper's client on `stream`: status and body.
async fn get_h1<S>(stream: S, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(SOON, send.send_request(req))
        .await
        .expect("no response")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The same over HTTP/2 (cleartext, prior knowledge).
async fn get_h2(stream: TcpStream, path: &str) -> (u16, String) {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://localhost{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(SOON, send.send_request(req))
        .await
        .expect("no response")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An axum `Router` taking `ConnectInfo<SocketAddr>`, served with `Server::bind(..).serve(app)`
/// and nothing else, answers 200 with the client's own address (it answered 500, "Missing
/// request extension", when the address had to be asked for); so does the local address,
/// the connection's own even on a listener bound to `0.0.0.0`; over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn connect_info_and_the_local_address_are_in_every_request_with_nothing_asked() {
    let server = Server::bind("0.0.0.0:0").await.unwrap();
    let port = server.local_addrs()[0].as_tcp().unwrap().port();
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());
    let to = SocketAddr::from(([127, 0, 0, 1], port));

    let stream = TcpStream::connect(to).await.unwrap();
    let me = stream.local_addr().unwrap();
    assert_eq!(get_h1(stream, "/ip").await, (200, me.to_string()));
    let stream = TcpStream::connect(to).await.unwrap();
    // The connection's local end, not the listener's 0.0.0.0.
    assert_eq!(get_h1(stream, "/local").await, (200, to.to_string()));
    let stream = TcpStream::connect(to).await.unwrap();
    let me = stream.local_addr().unwrap();
    assert_eq!(
        get_h1(stream, "/any").await,
        (200, format!("tcp=true peer={me}"))
    );

    let stream = TcpStream::connect(to).await.unwrap();
    let me = stream.local_addr().unwrap();
    assert_eq!(get_h2(stream, "/ip").await, (200, me.to_string()));

    handle.shutdown();
    let report = tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(report.is_clean(), "{}", report.to_json());
}

/// A Unix-domain peer has no `SocketAddr`: it gets `ConnAddrs` (a `unix:` peer, the socket's
/// path as the local address), and no `ConnectInfo<SocketAddr>`.
#[cfg(unix)]
#[tokio::test]
async fn a_unix_socket_peer_gets_conn_addrs_with_the_socket_path() {
    let path = std::env::temp_dir().join(format!("grace-{}-axum.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let server = Server::bind(format!("unix:{}", path.display()))
        .await
        .unwrap();
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_eq!(
        get_h1(stream, "/any").await,
        (200, "tcp=false peer=unix:(unnamed)".to_owned())
    );
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let local = Addr::Unix(Some(path.clone()));
    assert_eq!(get_h1(stream, "/local").await, (200, local.to_string()));
    // axum's own extractor fails as under `axum::serve` on a Unix socket.
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_eq!(get_h1(stream, "/ip").await.0, 500);

    handle.shutdown();
    tokio::time::timeout(SOON, served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `with_shutdown(fut)` serves until `fut` resolves, then drains as any stop does: the
/// request in flight finishes, the report says `Trigger::ShutdownFuture`.
#[tokio::test]
async fn with_shutdown_drains_when_its_future_resolves() {
    let app = axum::Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        );
    let server = Server::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addrs()[0].as_tcp().unwrap();
    let handle = server.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(
        server
            .serve(app)
            .with_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );

    // Serving while the future is pending.
    let stream = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_h1(stream, "/").await, (200, "hello".to_owned()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!handle.notice().is_draining());

    let slow = tokio::spawn(get_h1(TcpStream::connect(addr).await.unwrap(), "/slow"));
    tokio::time::timeout(SOON, async {
        while handle.counts().active == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the slow request never started");
    stop.send(()).unwrap();
    let report = tokio::time::timeout(SOON, served)
        .await
        .expect("the drain did not end")
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::ShutdownFuture);
    assert_eq!(report.trigger.to_string(), "shutdown future");
    assert!(report.is_clean(), "{}", report.to_json());
    assert_eq!(slow.await.unwrap(), (200, "slow".to_owned()));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is still open"
    );
}

/// A job written for a `CancellationToken` (`token.cancelled().await`, or a function taking
/// one) runs until the drain and stops there, cleanly; cancelling the token a job was given
/// stops that job only.
#[tokio::test]
async fn jobs_stop_at_the_drain_through_cancelled_and_their_cancellation_token() {
    let server = Server::bind("127.0.0.1:0").await.unwrap();
    let handle = server.handle();
    let (a, b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (a_stopped, b_stopped) = (Arc::clone(&a), Arc::clone(&b));
    handle.spawn_job("cancelled", |token: grace_http::JobToken| async move {
        token.cancelled().await;
        assert!(token.is_cancelled());
        a_stopped.store(true, Ordering::SeqCst);
        Ok::<_, std::io::Error>(())
    });
    async fn consume(stop: CancellationToken, stopped: Arc<AtomicBool>) -> std::io::Result<()> {
        stop.cancelled().await;
        stopped.store(true, Ordering::SeqCst);
        Ok(())
    }
    handle.spawn_job("token", |token: grace_http::JobToken| {
        consume(token.into(), b_stopped)
    });
    // A job that cancels its own token, at once: the others go on.
    handle.spawn_job("cancels-itself", |token: grace_http::JobToken| async move {
        token.cancellation_token().cancel();
        Ok::<_, std::io::Error>(())
    });

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(
        server
            .serve(axum::Router::new())
            .with_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.load(Ordering::SeqCst) && !b.load(Ordering::SeqCst));
    stop.send(()).unwrap();
    let report = tokio::time::timeout(SOON, served)
        .await
        .expect("the drain did not end")
        .unwrap()
        .unwrap();
    assert!(a.load(Ordering::SeqCst) && b.load(Ordering::SeqCst));
    let jobs: Vec<_> = report
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.outcome))
        .collect();
    assert_eq!(
        jobs,
        [
            ("cancelled", Outcome::Closed),
            ("token", Outcome::Closed),
            ("cancels-itself", Outcome::Closed)
        ],
        "{}",
        report.to_json()
    );
    assert_eq!(report.trigger, Trigger::ShutdownFuture);
}

/// The addresses are on by default for an `axum::Router` only: a bare `tower` service (which
/// would pay for a map it never reads) gets none unless it asks, and then gets them.
#[tokio::test]
async fn a_service_that_is_not_a_router_gets_the_addresses_only_when_it_asks() {
    let bare = tower::service_fn(|req: http::Request<grace_http::RequestBody>| async move {
        let has = req.extensions().get::<ConnAddrs>().is_some();
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            Bytes::from(format!("addrs={has}")),
        )))
    });
    for (ask, expected) in [(None, "addrs=false"), (Some(true), "addrs=true")] {
        let mut server = Server::bind("127.0.0.1:0").await.unwrap();
        if let Some(ask) = ask {
            server = server.peer_addr_in_requests(ask);
        }
        let to = server.local_addrs()[0].as_tcp().unwrap();
        let handle = server.handle();
        let served = tokio::spawn(server.serve(bare).into_future());
        let stream = TcpStream::connect(to).await.unwrap();
        assert_eq!(
            get_h1(stream, "/").await,
            (200, expected.to_owned()),
            "{ask:?}"
        );
        handle.shutdown();
        let report = tokio::time::timeout(SOON, served).await.unwrap().unwrap();
        assert!(report.unwrap().is_clean());
    }
}
