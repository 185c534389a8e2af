//! TLS through real sockets and a real TLS client that verifies the certificate: ALPN
//! (HTTP/1.1 and HTTP/2), the drain (in-flight requests, `close_notify` to idle
//! connections, clients that never send a ClientHello), forcing, certificate reload, plain
//! HTTP on the TLS port, the peer address as axum's `ConnectInfo` sees it, and a rustls
//! configuration of the user's own: mutual TLS, its crypto provider and ALPN list kept, an
//! SNI resolver, and reloads under load.
#![cfg(feature = "tls")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use common::{SOON, start};
use grace_http::tls::{TlsConfig, TlsError, TlsInfo, default_crypto_provider};
use grace_http::{ConnState, PeerAddr};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
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
    connector_with(default_crypto_provider().unwrap(), root, alpn)
}

/// Like [`connector`], with the client's crypto provider.
fn connector_with(
    provider: Arc<CryptoProvider>,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
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
            .drain_policy(
                grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_millis(300)),
            )
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
            .timeouts(grace_http::Timeouts::default().handshake(Duration::from_millis(300)))
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
    let mut s = start(app(), |s| {
        s.tls(tls_config(&cert))
            .limits(grace_http::Limits::default().max_connections(1))
    })
    .await;
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

// --- A rustls configuration of the user's own ---

/// A certificate authority of the test's own, and the certificates it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    der: CertificateDer<'static>,
}

/// A certificate signed by a [`Ca`], with its key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        Ca { cert, key, der }
    }

    /// A server certificate for `names`.
    fn server(&self, names: &[&str]) -> Leaf {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for `name`.
    fn client(&self, name: &str) -> Leaf {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: rcgen::CertificateParams) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }
}

/// The user's own configuration for mutual TLS: client certificates signed by `ca` are
/// required; `server` is presented. No ALPN list (rustls' builder sets none).
fn mtls_server_config(ca: &Ca, server: &Leaf) -> rustls::ServerConfig {
    let provider = default_crypto_provider().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.der.clone()], server.key.clone_key())
        .unwrap()
}

/// A client that trusts `ca`, presents `identity` if any, offers `alpn`, and never resumes
/// a session (each connection is a full handshake, which shows the server's certificate).
fn mtls_connector(ca: &Ca, identity: Option<&Leaf>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(default_crypto_provider().unwrap())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect_named(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    connector.connect(name, tcp).await
}

/// The TLS error that refused a client: the alert the server sent, during the handshake or
/// right after the client's part of it (a TLS 1.3 client has finished its handshake before
/// the server has checked its certificate, and learns of the refusal on its first read).
async fn refusal(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> rustls::Error {
    let err = match connect_named(addr, connector, "localhost").await {
        Err(e) => e,
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await;
            let mut buf = vec![0u8; 4096];
            match tokio::time::timeout(SOON, tls.read(&mut buf))
                .await
                .expect("neither served nor refused")
            {
                Ok(0) => panic!("closed without an alert"),
                Ok(n) => panic!("served: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e) => e,
            }
        }
    };
    let shown = format!("{err:?}");
    *err.into_inner()
        .and_then(|e| e.downcast::<rustls::Error>().ok())
        .unwrap_or_else(|| panic!("not a TLS error: {shown}"))
}

/// One request on a fresh connection: the certificate the server presented, or what failed.
async fn fetch_fresh(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> Result<CertificateDer<'static>, String> {
    let tls = connect_named(addr, connector, "localhost")
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = presented(&tls);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = http::Request::get("https://localhost/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != 200 || body != "hello" {
        return Err(format!("{status} {body:?}"));
    }
    Ok(cert)
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_ca_signed_certificate_at_the_handshake_and_serves_one_with()
 {
    let ca = Ca::new("grace test CA");
    let server = ca.server(&["localhost"]);
    let alice = ca.client("alice");
    let mallory = Ca::new("another CA").client("mallory");
    let tls = TlsConfig::from_server_config(Arc::new(mtls_server_config(&ca, &server)));
    // The handler sees the client's certificate.
    let expected = alice.der.clone();
    let app = app().route(
        "/client",
        get(move |axum::Extension(info): axum::Extension<TlsInfo>| {
            let expected = expected.clone();
            async move {
                match info.peer_certificates() {
                    Some(chain) => format!("{} {}", chain.len(), chain[0] == expected),
                    None => "none".to_string(),
                }
            }
        }),
    );
    let mut s = start(app, |s| s.tls(tls)).await;

    // No certificate: refused at the handshake, the handler never runs.
    let err = refusal(s.addr, &mtls_connector(&ca, None, &[b"h2"])).await;
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
    );
    // A certificate from another CA: refused too.
    let err = refusal(s.addr, &mtls_connector(&ca, Some(&mallory), &[b"h2"])).await;
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)
    );
    s.wait_counts(|c| c.total() == 0).await;

    // Signed by the CA: served, over HTTP/2 (the configuration had no ALPN list).
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let tls = connect_named(
            s.addr,
            &mtls_connector(&ca, Some(&alice), &[alpn]),
            "localhost",
        )
        .await
        .expect("a client with a certificate of the CA was refused");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        assert_eq!(presented(&tls), server.der);
        let (_, body) = hyper_get(tls, "/client").await;
        assert_eq!(body, "1 true");
    }

    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_swaps_the_certificate_for_new_handshakes_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    const CLIENTS: usize = 4;
    const EACH: usize = 10; // requests each client makes in a generation before the next one
    let ca = Arc::new(Ca::new("grace test CA"));
    let certs = [
        ca.server(&["localhost"]),
        ca.server(&["localhost"]),
        ca.server(&["localhost"]),
    ];
    let alice = Arc::new(ca.client("alice"));
    let tls = TlsConfig::from_server_config(Arc::new(mtls_server_config(&ca, &certs[0])));
    let mut s = start(app(), |s| s.tls(tls.clone())).await;

    // A keep-alive connection from before the reloads, used again after them.
    let kept = connect_named(
        s.addr,
        &mtls_connector(&ca, Some(&alice), &[b"h2"]),
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(presented(&kept), certs[0].der);
    let (mut kept, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(kept))
            .await
            .unwrap();
    tokio::spawn(conn);

    // The clients: a fresh connection (a full handshake) per request, until told to stop.
    // Each notes the generation before it connects: a connection begun after a reload
    // returned must see that reload's certificate.
    let generation = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Vec<[AtomicUsize; 3]>> =
        Arc::new((0..CLIENTS).map(|_| Default::default()).collect());
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let alpn: &[&[u8]] = if i % 2 == 0 { &[b"h2"] } else { &[b"http/1.1"] };
        let connector = mtls_connector(&ca, Some(&alice), alpn);
        let (addr, generation, stop, done) =
            (s.addr, generation.clone(), stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut failed = Vec::new();
            while !stop.load(SeqCst) {
                let g = generation.load(SeqCst);
                match fetch_fresh(addr, &connector).await {
                    Ok(cert) => {
                        seen.push((g, cert));
                        done[i][g].fetch_add(1, SeqCst);
                    }
                    Err(e) => failed.push(format!("generation {g}: {e}")),
                }
            }
            (seen, failed)
        }));
    }
    let all_did = |g: usize| {
        let done = done.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                while done.iter().any(|d| d[g].load(SeqCst) < EACH) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the clients stalled in generation {g}"));
        }
    };

    all_did(0).await;
    // Generation 1: a whole new configuration (the user's, with certificate 1).
    tls.reload_server_config(Arc::new(mtls_server_config(&ca, &certs[1])));
    generation.store(1, SeqCst);
    all_did(1).await;
    // Generation 2: certificate 2 from files, the client verification kept.
    let dir = std::env::temp_dir().join(format!("grace-tls-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, &certs[2].cert_pem).unwrap();
    std::fs::write(&key_file, &certs[2].key_pem).unwrap();
    let reloaded = tls.reload_from_pem_files(&cert_file, &key_file);
    let _ = std::fs::remove_dir_all(&dir);
    reloaded.unwrap();
    generation.store(2, SeqCst);
    all_did(2).await;
    stop.store(true, SeqCst);

    let mut requests = 0;
    for client in clients {
        let (seen, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:#?}");
        for (g, cert) in seen {
            requests += 1;
            // Begun before a reload returned: the old certificate or the new one.
            let allowed = if g == 2 {
                &certs[2..]
            } else {
                &certs[g..=g + 1]
            };
            assert!(
                allowed.iter().any(|c| c.der == cert),
                "a connection begun in generation {g} saw an older certificate"
            );
        }
    }
    assert!(requests >= 3 * CLIENTS * EACH);
    eprintln!("{requests} requests, each over a fresh connection, none failed");
    assert_eq!(tls.certificate_chain(), vec![certs[2].der.clone()]);
    // The reload from files kept the client verification.
    let err = refusal(s.addr, &mtls_connector(&ca, None, &[b"h2"])).await;
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
    );
    // The connection made before both reloads still serves.
    let resp = kept
        .send_request(
            http::Request::get("https://localhost/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .expect("the connection from before the reloads was dropped");
    assert_eq!(resp.status(), 200);
    drop(kept);

    s.handle.shutdown();
    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

/// A *ring* provider that offers only ChaCha20-Poly1305 (the client's default prefers
/// AES-256-GCM, so the suite negotiated shows whose provider the server used).
fn chacha_only() -> Arc<CryptoProvider> {
    let mut provider = CryptoProvider::clone(&default_crypto_provider().unwrap());
    provider.cipher_suites =
        vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

fn suite(tls: &TlsStream<TcpStream>) -> rustls::CipherSuite {
    tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

#[tokio::test]
async fn a_users_own_config_keeps_its_crypto_provider_and_alpn_list_and_gets_h2_when_it_has_none() {
    let (cert, other) = (cert(), self::cert());
    let own = |alpn: &[&[u8]]| {
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(chacha_only())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    };
    use rustls::pki_types::pem::PemObject;
    const CHACHA: rustls::CipherSuite = rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;

    // No ALPN list: grace offers h2 and http/1.1; the provider is the user's.
    let tls = TlsConfig::from_server_config(own(&[]));
    let mut s = start(app(), |s| s.tls(tls.clone())).await;
    let stream = connect_tls(s.addr, &cert.der, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(suite(&stream), CHACHA);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(hyper_get(stream, "/").await.0, http::Version::HTTP_2);

    // An explicit list is the user's: not overridden, on a reload of the config too.
    tls.reload_server_config(own(&[b"http/1.1"]));
    let stream = connect_tls(s.addr, &cert.der, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(suite(&stream), CHACHA);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(hyper_get(stream, "/").await.0, http::Version::HTTP_11);
    assert!(tls.certificate_chain().is_empty());

    // A certificate reloaded from PEM keeps the provider and the ALPN list.
    tls.reload_from_pem(other.cert_pem.as_bytes(), other.key_pem.as_bytes())
        .unwrap();
    let stream = connect_tls(s.addr, &other.der, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(presented(&stream), other.der);
    assert_eq!(suite(&stream), CHACHA);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(tls.certificate_chain(), vec![other.der.clone()]);

    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn an_sni_resolver_of_ones_own_presents_each_names_certificate_over_h2() {
    let ca = Ca::new("grace test CA");
    let (a, b) = (ca.server(&["localhost"]), ca.server(&["grace.test"]));
    let provider = default_crypto_provider().unwrap();
    let mut by_name = rustls::server::ResolvesServerCertUsingSni::new();
    for (name, leaf) in [("localhost", &a), ("grace.test", &b)] {
        let key = rustls::sign::CertifiedKey::from_der(
            vec![leaf.der.clone()],
            leaf.key.clone_key(),
            &provider,
        )
        .unwrap();
        by_name.add(name, key).unwrap();
    }
    let tls = TlsConfig::from_cert_resolver(Arc::new(by_name)).unwrap();
    assert!(tls.certificate_chain().is_empty());
    let mut s = start(app(), |s| s.tls(tls)).await;
    let connector = mtls_connector(&ca, None, &[b"h2", b"http/1.1"]);
    for (name, leaf) in [("localhost", &a), ("grace.test", &b)] {
        let stream = connect_named(s.addr, &connector, name).await.unwrap();
        assert_eq!(presented(&stream), leaf.der, "{name}");
        let (version, body) = hyper_get(stream, "/tls").await;
        assert_eq!(version, http::Version::HTTP_2);
        assert_eq!(body, format!("h2 {name}"));
    }
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

/// The process default provider is process-wide: this test runs itself again in a child
/// process, which installs one.
#[test]
fn from_pem_uses_the_process_default_crypto_provider_when_one_is_installed() {
    const NAME: &str = "from_pem_uses_the_process_default_crypto_provider_when_one_is_installed";
    const CHILD: &str = "GRACE_TLS_TEST_INSTALL_PROVIDER";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    // The client keeps the full provider grace chose before any was installed.
    let full = default_crypto_provider().unwrap();
    let installed = chacha_only();
    CryptoProvider::install_default(CryptoProvider::clone(&installed)).unwrap();
    let cert = cert();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut s = start(app(), |s| s.tls(tls_config(&cert))).await;
            let tcp = TcpStream::connect(s.addr).await.unwrap();
            let stream = connector_with(full, &cert.der, &[b"h2"])
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            assert_eq!(
                suite(&stream),
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            );
            let (_, body) = hyper_get(stream, "/").await;
            assert_eq!(body, "hello");
            s.handle.shutdown();
            assert!(s.report(Duration::ZERO).await.is_clean());
        });
}
