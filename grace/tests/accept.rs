//! The open acceptor hook without TLS: a PROXY protocol (v1) reader, through real sockets.
//! What it reads is not a request (the connection stays `New`), what it adds reaches every
//! request, a client that never finishes it is cut, and the drain closes its connections.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use common::{Client, start};
use grace_http::accept::{Accepted, Acceptor, BoxFuture, Socket};
use grace_http::{ConnState, PeerAddr};
use tokio::io::AsyncReadExt;

/// The client's address as the proxy in front of us saw it.
#[derive(Clone, Debug)]
struct ClientAddr(SocketAddr);

/// Reads `PROXY TCP4 SRC DST SPORT DPORT\r\n`, then serves HTTP on the rest.
struct ProxyV1;

impl Acceptor for ProxyV1 {
    fn accept(&self, mut socket: Socket) -> BoxFuture<io::Result<Accepted>> {
        Box::pin(async move {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                if line.len() > 107 {
                    return Err(io::Error::other("PROXY header too long"));
                }
                let mut byte = [0u8];
                if socket.read(&mut byte).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                line.push(byte[0]);
            }
            let line = String::from_utf8_lossy(&line);
            let f: Vec<_> = line.split_whitespace().collect();
            let ["PROXY", "TCP4" | "TCP6", src, _, sport, _] = f[..] else {
                return Err(io::Error::other(format!("not a PROXY header: {line:?}")));
            };
            let addr = format!("{src}:{sport}")
                .parse()
                .map_err(|e| io::Error::other(format!("{e}")))?;
            Ok(Accepted::new(socket).with_extension(ClientAddr(addr)))
        })
    }
}

fn app() -> axum::Router {
    common::app().route(
        "/who",
        get(
            |axum::Extension(ClientAddr(client)): axum::Extension<ClientAddr>,
             axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>| async move {
                format!("{client} via {peer}")
            },
        ),
    )
}

#[tokio::test]
async fn an_acceptor_wraps_connections_and_they_are_tracked_and_drained() {
    let mut s = start(app(), |s| s.acceptor(ProxyV1).peer_addr_in_requests(true)).await;
    let mut c = Client::connect(s.addr).await;
    let me = c.io.get_ref().local_addr().unwrap();
    // The header alone is not a request: still New.
    c.write(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.handle.counts().new, 1);
    let resp = c.get("/who").await.unwrap();
    assert_eq!(resp.body, format!("203.0.113.7:56324 via {me}"));
    s.wait_counts(|c| c.idle == 1).await;
    let id = s.states.lock().unwrap()[0].0;
    assert_eq!(
        s.states_of(id),
        [ConnState::New, ConnState::Active, ConnState::Idle]
    );

    // A client that is not a proxy is refused; the server goes on.
    let mut bad = Client::connect(s.addr).await;
    bad.send("/").await;
    assert!(bad.closed().await);

    // The drain closes the idle connection (from its own task) and returns at once.
    let t = Instant::now();
    s.handle.shutdown();
    assert!(c.closed().await);
    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn an_acceptor_that_never_finishes_is_cut_by_the_handshake_timeout_or_forced() {
    let mut s = start(app(), |s| {
        s.acceptor(ProxyV1)
            .timeouts(grace_http::Timeouts::default().handshake(Duration::from_millis(300)))
    })
    .await;
    let mut slow = Client::connect(s.addr).await;
    slow.write(b"PROXY TCP4 ").await;
    let t = Instant::now();
    assert!(slow.closed().await);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    s.wait_counts(|c| c.total() == 0).await;
    s.handle.shutdown();
    assert!(s.report(Duration::ZERO).await.is_clean());

    // Forcing reaches a connection in the acceptor through its socket's descriptor.
    let mut s = start(app(), |s| {
        s.acceptor(ProxyV1).drain_policy(
            grace_http::DrainPolicy::default()
                .shutdown_timeout(Duration::from_millis(200))
                .new_connection_grace(Duration::from_secs(60)),
        )
    })
    .await;
    let mut stuck = Client::connect(s.addr).await;
    stuck.write(b"PROXY").await;
    s.wait_counts(|c| c.new == 1).await;
    s.handle.shutdown();
    let report = s.report(Duration::from_millis(200)).await;
    assert_eq!(report.forced.len(), 1, "{}", report.to_json());
    assert_eq!(report.forced[0].state, ConnState::New);
    assert!(stuck.closed().await);
}

#[tokio::test]
async fn the_peer_address_can_be_left_out_of_requests() {
    let app = axum::Router::new().route(
        "/peer",
        get(|peer: Option<axum::Extension<PeerAddr>>| async move { format!("{}", peer.is_some()) }),
    );
    let mut s = start(app.clone(), |s| s.peer_addr_in_requests(false)).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.get("/peer").await.unwrap().body, "false");
    drop(c);
    s.handle.shutdown();
    s.report(Duration::ZERO).await;

    let mut s = start(app.clone(), |s| s).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(
        c.get("/peer").await.unwrap().body,
        "false",
        "off by default"
    );
    drop(c);
    s.handle.shutdown();
    s.report(Duration::ZERO).await;

    let mut s = start(app, |s| s.peer_addr_in_requests(true)).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.get("/peer").await.unwrap().body, "true");
    drop(c);
    s.handle.shutdown();
    s.report(Duration::ZERO).await;
}
