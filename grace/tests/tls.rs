//! TLS through real sockets and a real TLS client that verifies the certificate: ALPN
//! (HTTP/1.1 and HTTP/2), the drain (in-flight requests, `close_notify` to idle
//! connections, clients that never send a ClientHello), forcing, certificate reload, plain
//! HTTP on the TLS port, and the peer address as axum's `ConnectInfo` sees it.
#![cfg(feature = "tls")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use common::{SOON, start};
use grace_http::tls::{TlsConfig, TlsError, TlsInfo};
use grace_http::{ConnState, PeerAddr};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for `localhost`, as PEM (certificate, key) and DER.
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn cert() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Cert {
        cert_pem: c.cert.pem(),
        key_pem: c.key_pair.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

fn tls_config(cert: &Cert) -> TlsConfig {
    TlsConfig::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap()
}

/// A client that trusts `root` only and offers `alpn`.
fn connector(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect_tls(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector(root, alpn).connect(name, tcp).await
}

/// The end-entity certificate the server presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// The test app, plus `/tls` (what was negotiated) and `/whoami` (the peer, two ways).
fn app() -> axum::Router {
    common::app()
        .route(
            "/tls",
            get(
                |axum::Extension(info): axum::Extension<TlsInfo>| async move {
                    format!(
                        "{} {}",
                        String::from_utf8_lossy(info.alpn_protocol().unwrap_or(b"-")),
                        info.server_name().unwrap_or("-"),
                    )
                },
            ),
        )
        .route(
            "/whoami",
            get(
                |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 axum::Extension(PeerAddr(addr)): axum::Extension<PeerAddr>| async move {
                    format!("{peer} {addr}")
                },
            ),
        )
}

/// A raw HTTP/1.1 exchange over TLS: what went over the wire, decrypted.
struct H1(common::Client<TlsStream<TcpStream>>);

impl H1 {
    async fn connect(addr: SocketAddr, root: &CertificateDer<'static>) -> H1 {
        let tls = connect_tls(addr, root, &[b"http/1.1"]).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        H1(common::Client::over(tls))
    }

    async fn send(&mut self, path: &str) {
        self.0.send(path).await;
    }

    async fn read(&mut self) -> Option<common::Resp> {
        self.0.read().await
    }

    async fn get(&mut self, path: &str) -> common::Resp {
        self.0.get(path).await.expect("no response")
    }

    /// How the server ended the connection: `Ok(())` for `close_notify` then EOF, the
    /// error otherwise (a FIN without `close_notify` is `UnexpectedEof`).
    async fn end(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(SOON, self.0.io.read(&mut buf)).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(n)) => panic!("{n} more bytes instead of the end"),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("the connection was not closed"),
        }
    }
}

/// One request with hyper's client over an established TLS stream (HTTP/1.1 or HTTP/2,
/// whatever ALPN chose).
async fn hyper_get(tls: TlsStream<TcpStream>, path: &str) -> (http::Version, String) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let uri = format!("https://localhost{path}");
    let req = http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    assert_eq!(resp.status(), 200);
    let version = resp.version();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (version, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn http1_and_http2_are_chosen_by_alpn_with_a_verified_certificate() {
    let cert = cert();
    let mut s = start(app(), |s| s.tls(tls_config(&cert))).await;

    let tls = connect_tls(s.addr, &cert.der, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (version, body) = hyper_get(tls, "/tls").await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(body, "h2 localhost");

    let tls = connect_tls(s.addr, &cert.der, &[b"http/1.1"])
        .await
        .unwrap();
    let (version, body) = hyper_get(tls, "/tls").await;
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(body, "http/1.1 localhost");

    // A client that offers no ALPN at all gets HTTP/1.1 (and may still speak HTTP/2 with
    // prior knowledge).
    let tls = connect_tls(s.addr, &cert.der, &[]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let (version, body) = hyper_get(tls, "/tls").await;
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(body, "- localhost");

    // A client that does not trust the certificate refuses it.
    let other = self::cert();
    let refused = connect_tls(s.addr, &other.der, &[b"h2"]).await;
    assert!(
        refused.is_err(),
        "a certificate from elsewhere was accepted"
    );

    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn a_tls_connection_is_new_during_its_handshake_and_active_on_its_first_decrypted_byte() {
    let cert = cert();
    let s = start(app(), |s| s.tls(tls_config(&cert))).await;
    // TCP open, no ClientHello: tracked, and New.
    let silent = TcpStream::connect(s.addr).await.unwrap();
    s.wait_counts(|c| c.new == 1).await;
    // A finished handshake is not a request: still New.
    let mut c = H1::connect(s.addr, &cert.der).await;
    s.wait_counts(|c| c.new == 2).await;
    c.send("/sleep/300").await;
    s.wait_counts(|c| c.new == 1 && c.active == 1).await;
    assert_eq!(c.read().await.unwrap().status, 200);
    s.wait_counts(|c| c.new == 1 && c.idle == 1).await;
    drop(silent);
    s.wait_counts(|c| c.new == 0 && c.idle == 1).await;
    drop(c);
    s.wait_counts(|c| c.total() == 0).await;
    let seen: Vec<_> = s.states.lock().unwrap().iter().map(|(_, st)| *st).collect();
    assert!(seen.contains(&ConnState::Active) && seen.contains(&ConnState::Idle));
}

#[tokio::test]
async fn drain_over_tls_finishes_requests_says_close_notify_to_idle_and_ignores_silent_sockets() {
    let cert = cert();
    let mut s = start(app(), |s| s.tls(tls_config(&cert))).await;
    let mut busy = H1::connect(s.addr, &cert.der).await;
    let mut idle = H1::connect(s.addr, &cert.der).await;
    assert_eq!(idle.get("/").await.status, 200);
    // Opened TCP, never sent a ClientHello: must not hold the drain.
    let _silent = TcpStream::connect(s.addr).await.unwrap();
    busy.send("/sleep/600").await;
    s.wait_counts(|c| c.active == 1 && c.idle == 1 && c.new == 1)
        .await;

    let started = Instant::now();
    s.handle.shutdown();
    // The idle connection: close_notify, then EOF (a clean end, not a truncation).
    idle.end()
        .await
        .expect("the idle TLS connection was truncated (no close_notify)");
    // The request in flight completes, with `Connection: close`.
    let resp = busy.read().await.expect("the in-flight request was cut");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "slept 600");
    assert_eq!(resp.header("connection"), Some("close"));
    busy.end()
        .await
        .expect("the drained TLS connection was truncated (no close_notify)");

    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert_eq!(report.at_start.new, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the silent socket held the drain: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn forcing_cuts_tls_connections_on_their_socket_and_the_report_names_them() {
    let cert = cert();
    let mut s = start(app(), |s| {
        s.tls(tls_config(&cert))
            .shutdown_timeout(Duration::from_millis(300))
            .record_requests(true)
    })
    .await;
    let mut c = H1::connect(s.addr, &cert.der).await;
    c.send("/sleep/20000").await;
    s.wait_counts(|c| c.active == 1).await;
    s.handle.shutdown();
    let report = s.report(Duration::from_millis(300)).await;
    assert_eq!(report.forced.len(), 1, "{}", report.to_json());
    let forced = &report.forced[0];
    assert_eq!(forced.state, ConnState::Active);
    assert_eq!(forced.request.as_ref().unwrap().path, "/sleep/20000");
    assert!(c.read().await.is_none(), "a response after the force");
}

#[tokio::test]
async fn a_handshake_that_does_not_finish_in_time_is_cut() {
    let cert = cert();
    let mut s = start(app(), |s| {
        s.tls(tls_config(&cert))
            .handshake_timeout(Duration::from_millis(300))
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(SOON, silent.read(&mut buf))
        .await
        .expect("not cut");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(started.elapsed() < Duration::from_secs(3));
    s.wait_counts(|c| c.total() == 0).await;
    s.handle.shutdown();
    assert!(s.report(Duration::ZERO).await.is_clean());
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_cut_and_the_server_keeps_serving() {
    let cert = cert();
    let mut s = start(app(), |s| s.tls(tls_config(&cert))).await;
    let mut plain = TcpStream::connect(s.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(SOON, plain.read_to_end(&mut got))
        .await
        .expect("the plain client was not cut");
    // At most a TLS alert record, never an HTTP response.
    assert!(read.is_ok() || got.is_empty(), "{read:?}");
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    s.wait_counts(|c| c.total() == 0).await;

    let mut c = H1::connect(s.addr, &cert.der).await;
    assert_eq!(c.get("/").await.body, "hello");
    drop(c);
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn a_reload_serves_new_handshakes_keeps_old_connections_and_refuses_bad_pairs() {
    let (a, b) = (cert(), cert());
    let tls = tls_config(&a);
    let mut s = start(app(), |s| s.tls(tls.clone())).await;
    let mut old = H1::connect(s.addr, &a.der).await;
    assert_eq!(old.get("/").await.status, 200);

    tls.reload_from_pem(b.cert_pem.as_bytes(), b.key_pem.as_bytes())
        .unwrap();
    // New handshakes present B at once; a client trusting only A now refuses.
    let fresh = connect_tls(s.addr, &b.der, &[b"h2"]).await.unwrap();
    assert_eq!(presented(&fresh), b.der);
    assert!(connect_tls(s.addr, &a.der, &[b"h2"]).await.is_err());
    // The connection made with A is untouched.
    assert_eq!(old.get("/").await.body, "hello");
    assert_eq!(presented(old.0.io.get_ref()), a.der);

    // Each bad reload is refused with its reason, and B keeps serving.
    let dir = std::env::temp_dir().join(format!("grace-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, &a.cert_pem).unwrap();
    std::fs::write(&key_file, &b.key_pem).unwrap();
    let refusals = [
        tls.reload_from_pem_files(dir.join("missing.pem"), &key_file),
        tls.reload_from_pem_files(&cert_file, &key_file),
        tls.reload_from_pem(b"not a certificate", b.key_pem.as_bytes()),
        tls.reload_from_pem(b.cert_pem.as_bytes(), b"-----BEGIN PRIVATE KEY-----\nxx"),
        tls.reload_from_pem(b.cert_pem.as_bytes(), b""),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(refusals[0], Err(TlsError::Read { .. })),
        "{refusals:?}"
    );
    assert!(
        matches!(refusals[1], Err(TlsError::KeyMismatch)),
        "{refusals:?}"
    );
    assert!(
        matches!(refusals[2], Err(TlsError::NoCertificate)),
        "{refusals:?}"
    );
    assert!(
        matches!(refusals[3], Err(TlsError::Pem { .. })),
        "{refusals:?}"
    );
    assert!(
        matches!(refusals[4], Err(TlsError::NoPrivateKey)),
        "{refusals:?}"
    );
    let still = connect_tls(s.addr, &b.der, &[b"http/1.1"]).await.unwrap();
    assert_eq!(presented(&still), b.der);
    assert_eq!(tls.certificate_chain(), vec![b.der.clone()]);
    let (_, body) = hyper_get(still, "/").await;
    assert_eq!(body, "hello");
    drop((old, fresh));

    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn connect_info_and_peer_addr_report_the_real_client_address() {
    // Plain TCP: `ConnectInfo<SocketAddr>` works without `into_make_service_with_connect_info`
    // once asked for (as axum asks for it).
    let mut plain = start(app(), |s| s.peer_addr_in_requests(true)).await;
    let mut c = common::Client::connect(plain.addr).await;
    let local = c.io.get_ref().local_addr().unwrap();
    let resp = c.get("/whoami").await.unwrap();
    assert_eq!(resp.body, format!("{local} {local}"));
    drop(c);
    plain.handle.shutdown();
    plain.report(Duration::ZERO).await;

    // TLS, over HTTP/2.
    let cert = cert();
    let mut s = start(app(), |s| {
        s.tls(tls_config(&cert)).peer_addr_in_requests(true)
    })
    .await;
    let tls = connect_tls(s.addr, &cert.der, &[b"h2"]).await.unwrap();
    let local = tls.get_ref().0.local_addr().unwrap();
    let (_, body) = hyper_get(tls, "/whoami").await;
    assert_eq!(body, format!("{local} {local}"));
    s.handle.shutdown();
    s.report(Duration::ZERO).await;
}

#[tokio::test]
async fn a_websocket_over_http2_is_hijacked_noticed_at_the_drain_and_drained() {
    use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
    use futures_util::{SinkExt, StreamExt};
    use grace_http::ShutdownNotice;
    use tokio_tungstenite::tungstenite;

    // `any`: over HTTP/2 a WebSocket opens with CONNECT (RFC 8441), not GET.
    let ws = axum::routing::any(
        |ws: WebSocketUpgrade, axum::Extension(notice): axum::Extension<ShutdownNotice>| async move {
            ws.on_upgrade(move |mut socket| async move {
                loop {
                    tokio::select! {
                        msg = socket.recv() => match msg {
                            Some(Ok(Message::Text(t))) => {
                                let _ = socket.send(Message::Text(t)).await;
                            }
                            _ => return,
                        },
                        _ = notice.wait() => {
                            let bye = CloseFrame { code: 1001, reason: "draining".into() };
                            let _ = socket.send(Message::Close(Some(bye))).await;
                            return;
                        }
                    }
                }
            })
        },
    );
    let cert = cert();
    let mut s = start(app().route("/ws", ws), |s| s.tls(tls_config(&cert))).await;
    let tls = connect_tls(s.addr, &cert.der, &[b"h2"]).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A first request, so the server's SETTINGS (ENABLE_CONNECT_PROTOCOL) have arrived.
    let resp = send
        .send_request(
            http::Request::get("https://localhost/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("https://localhost/ws")
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "extended CONNECT refused");
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    socket
        .send(tungstenite::Message::text("over h2"))
        .await
        .unwrap();
    let echo = socket.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "over h2");
    s.wait_counts(|c| c.hijacked == 1).await;

    s.handle.shutdown();
    let goodbye = tokio::time::timeout(SOON, socket.next())
        .await
        .expect("no goodbye")
        .unwrap()
        .unwrap();
    match goodbye {
        tungstenite::Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("{other:?}"),
    }
    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert_eq!(report.at_start.hijacked, 1, "{}", report.to_json());
}

#[tokio::test]
async fn at_max_connections_a_tls_client_waits_for_a_place_and_closing_one_makes_it() {
    let cert = cert();
    let mut s = start(app(), |s| s.tls(tls_config(&cert)).max_connections(1)).await;
    let mut first = H1::connect(s.addr, &cert.der).await;
    assert_eq!(first.get("/").await.status, 200);
    // Busy (a request in flight): it keeps its place (an idle one would make room).
    first.send("/sleep/1000").await;
    s.wait_counts(|c| c.active == 1).await;
    // Not accepted yet: its ClientHello waits in the kernel, the handshake does not finish.
    let (addr, root) = (s.addr, cert.der.clone());
    let second = tokio::spawn(async move { connect_tls(addr, &root, &[b"http/1.1"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "accepted over the limit");
    assert_eq!(first.read().await.expect("cut").status, 200);
    drop(first);
    let tls = tokio::time::timeout(SOON, second)
        .await
        .expect("never accepted")
        .unwrap()
        .unwrap();
    let (_, body) = hyper_get(tls, "/").await;
    assert_eq!(body, "hello");
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn a_handshake_begun_as_the_drain_starts_is_served_within_the_grace() {
    let cert = cert();
    let mut s = start(app(), |s| s.tls(tls_config(&cert))).await;
    // Accepted before the drain, handshake and request right after it started.
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    s.wait_counts(|c| c.new == 1).await;
    s.handle.shutdown();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector(&cert.der, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("the handshake was cut inside the grace");
    let mut c = H1(common::Client::over(tls));
    let resp = c.get("/").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    c.end().await.expect("truncated: no close_notify");
    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
}
