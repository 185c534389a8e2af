//! HTTPS with certificate reload: `cargo run -p grace-http --example tls -- CERT KEY`
//! (PEM files; without them, a self-signed certificate for `localhost` is made and written
//! to the temporary directory).
//!
//! ```sh
//! curl -k --http2 https://localhost:8443/      # hello over h2 (ALPN)
//! curl -k https://localhost:8443/whoami        # the peer address, ALPN and SNI
//! kill -USR1 <pid>                             # re-read CERT and KEY: new handshakes use them
//! kill -TERM <pid>                             # drain: idle TLS connections get close_notify
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::routing::get;
use grace_http::tls::{TlsConfig, TlsInfo};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (cert, key) = match (args.next(), args.next()) {
        (Some(cert), Some(key)) => (cert, key),
        _ => self_signed()?,
    };
    let tls = TlsConfig::from_pem_files(&cert, &key)?;

    // SIGUSR1: reload. A bad pair is refused (and logged); the previous one keeps serving.
    let reloader = tls.clone();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let _ = reloader.reload_from_pem_files(&cert, &key);
        }
    });

    let app =
        axum::Router::new()
            .route("/", get(|| async { "hello over TLS\n" }))
            .route(
                "/whoami",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     Extension(tls): Extension<TlsInfo>| async move {
                        let alpn = tls.alpn_protocol().map(String::from_utf8_lossy);
                        format!(
                            "{peer} alpn={} sni={}\n",
                            alpn.as_deref().unwrap_or("-"),
                            tls.server_name().unwrap_or("-")
                        )
                    },
                ),
            );
    let report = grace_http::Server::bind("127.0.0.1:8443")
        .await?
        .tls(tls)
        // `/whoami`'s `ConnectInfo`: the peer address is in requests only when asked for.
        .peer_addr_in_requests(true)
        .drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(10)))
        .serve(app)
        .with_signals()
        .await?;
    eprintln!("{}", report.to_json());
    Ok(())
}

/// A self-signed certificate for `localhost`, written to the temporary directory.
fn self_signed() -> anyhow::Result<(PathBuf, PathBuf)> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let dir = std::env::temp_dir();
    let (cert, key) = (
        dir.join("grace-example-cert.pem"),
        dir.join("grace-example-key.pem"),
    );
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.key_pair.serialize_pem())?;
    eprintln!("self-signed: {} {}", cert.display(), key.display());
    Ok((cert, key))
}
