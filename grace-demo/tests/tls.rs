//! A real `grace-demo` serving HTTPS (`--tls-cert`, `--tls-key`), a TLS client that
//! verifies the certificate, and real signals: `/whoami`, a certificate reload on SIGUSR1
//! (and a refused one), and the drain's `close_notify` on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Demo, SOON, TempDir, cert};
use rustix::process::Signal;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

async fn connect(addr: SocketAddr, root: &CertificateDer<'static>) -> std::io::Result<Tls> {
    let connector = common::tls_connector(root.clone());
    Ok(Tls(common::tls_connect(&connector, addr).await?))
}

/// HTTP/1.1 over TLS, raw.
struct Tls(BufReader<TlsStream<TcpStream>>);

impl Tls {
    fn presented(&self) -> CertificateDer<'static> {
        self.0.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    fn local_addr(&self) -> SocketAddr {
        self.0.get_ref().get_ref().0.local_addr().unwrap()
    }

    /// GET `path`: the status and the body.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let io = self.0.get_mut();
        io.write_all(req.as_bytes()).await.unwrap();
        io.flush().await.unwrap();
        let resp = common::read_response(&mut self.0).await.unwrap();
        (resp.status, resp.body)
    }

    /// `Ok` when the server ended the connection with `close_notify` then EOF.
    async fn end(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(SOON, self.0.read(&mut buf)).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(n)) => panic!("{n} bytes instead of the end"),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("not closed"),
        }
    }
}

fn args(dir: &TempDir) -> Vec<String> {
    [
        "--tls-cert",
        dir.path("cert.pem").to_str().unwrap(),
        "--tls-key",
        dir.path("key.pem").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn install(dir: &TempDir, cert: &str, key: &str) {
    std::fs::write(dir.path("cert.pem"), cert).unwrap();
    std::fs::write(dir.path("key.pem"), key).unwrap();
}

#[tokio::test]
async fn https_whoami_reload_on_sigusr1_and_close_notify_on_sigterm() {
    let dir = TempDir::new();
    let (a, b) = (cert(), cert());
    install(&dir, &a.cert_pem, &a.key_pem);
    let demo = Demo::start(&dir, &args(&dir)).await;

    // /whoami: the real client address, as axum's ConnectInfo extractor sees it.
    let mut old = connect(demo.addr, &a.der).await.unwrap();
    let (status, body) = old.get("/whoami").await;
    assert_eq!(status, 200, "{body}");
    let who: Value = serde_json::from_str(&body).unwrap();
    let me = old.local_addr().to_string();
    assert_eq!(who["connect_info"], me.as_str(), "{who}");
    assert_eq!(who["peer"], me.as_str(), "{who}");
    assert_eq!(who["tls"]["alpn"], "http/1.1", "{who}");
    assert_eq!(who["tls"]["sni"], "localhost", "{who}");

    // SIGUSR1 with new files: new handshakes present B; the old connection keeps working.
    install(&dir, &b.cert_pem, &b.key_pem);
    demo.signal(Signal::USR1);
    let fresh = tokio::time::timeout(SOON, async {
        loop {
            if let Ok(c) = connect(demo.addr, &b.der).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new certificate was never served");
    assert_eq!(fresh.presented(), b.der);
    assert_eq!(old.get("/").await.0, 200);
    assert_eq!(old.presented(), a.der);

    // A bad pair (A's certificate with B's key) is refused: B keeps serving.
    install(&dir, &a.cert_pem, &b.key_pem);
    demo.signal(Signal::USR1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut still = connect(demo.addr, &b.der)
        .await
        .expect("a refused reload changed the certificate");
    assert_eq!(still.presented(), b.der);
    assert_eq!(still.get("/").await.0, 200);
    drop(fresh);

    // SIGTERM: idle TLS connections get close_notify, then EOF.
    demo.signal(Signal::TERM);
    old.end().await.expect("truncated: no close_notify");
    still.end().await.expect("truncated: no close_notify");
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(
        exit.stderr.contains("does not match"),
        "the refused reload was not logged:\n{}",
        exit.stderr
    );
}

#[tokio::test]
async fn a_bad_certificate_at_start_is_a_start_up_error() {
    let dir = TempDir::new();
    let (a, b) = (cert(), cert());
    install(&dir, &a.cert_pem, &b.key_pem);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_grace-demo"))
        .current_dir(&dir.0)
        .args(["--listen", "127.0.0.1:0"])
        .args(args(&dir))
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(SOON, out).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not match"), "{stderr}");
    assert!(out.stdout.is_empty(), "it listened");
}

/// The children of process `pid` (from /proc).
fn children(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default()
}

#[tokio::test]
async fn an_upgrade_loads_the_certificate_anew_and_a_broken_one_rolls_back() {
    common::subreaper();
    let dir = TempDir::new();
    let (a, b) = (cert(), cert());
    install(&dir, &a.cert_pem, &a.key_pem);
    let pid_file = dir.path("demo.pid");
    let mut flags = args(&dir);
    flags.extend(["--pid-file".into(), pid_file.to_str().unwrap().into()]);
    let demo = Demo::start(&dir, &flags).await;
    let mut old = connect(demo.addr, &a.der).await.unwrap();
    assert_eq!(old.get("/").await.0, 200);

    // A broken pair: the new generation cannot load it and exits; this one keeps serving
    // (the same certificate, the same connections).
    install(&dir, &a.cert_pem, &b.key_pem);
    demo.signal(Signal::HUP);
    let t = std::time::Instant::now();
    let mut seen = false;
    loop {
        let kids = children(demo.pid);
        seen |= !kids.trim().is_empty();
        if (seen && kids.trim().is_empty()) || t.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(old.get("/").await.0, 200);
    let mut again = connect(demo.addr, &a.der).await.unwrap();
    assert_eq!(again.get("/").await.0, 200);
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(read_pid(), demo.pid);

    // A good pair: the new generation serves B on the same socket; this one drains, its
    // idle TLS connections ending with close_notify.
    install(&dir, &b.cert_pem, &b.key_pem);
    demo.signal(Signal::HUP);
    let next = tokio::time::timeout(SOON, async {
        loop {
            match read_pid() {
                p if p != demo.pid => return p,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("no new generation");
    old.end().await.expect("truncated: no close_notify");
    again.end().await.expect("truncated: no close_notify");
    let mut fresh = connect(demo.addr, &b.der).await.unwrap();
    assert_eq!(fresh.presented(), b.der);
    assert_eq!(fresh.get("/").await.0, 200);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(exit.stderr.contains("upgrade failed"), "{}", exit.stderr);
    drop(fresh);
    common::signal(next, Signal::TERM);
    let gone = tokio::task::spawn_blocking(move || common::wait_gone(next, SOON))
        .await
        .unwrap();
    assert_eq!(gone, common::Gone::Exited(Some(0)));
}
