//! Mutual TLS: an axum `Router` served only to clients with a certificate signed by your CA.
//!
//! `cargo run -p grace-http --example mtls -- CA CERT KEY` (PEM files: the CA that signs
//! client certificates, the server's certificate chain and key). Without them, a CA, a
//! server certificate for `localhost` and a client certificate are made and written to the
//! temporary directory, and the commands to try are printed:
//!
//! ```sh
//! curl --cacert ca.pem --cert client.pem --key client-key.pem https://localhost:8443/
//! curl --cacert ca.pem https://localhost:8443/   # no client certificate: refused at the handshake
//! kill -USR1 <pid>    # re-read CERT and KEY: new handshakes present them, clients still checked
//! kill -TERM <pid>    # drain: idle TLS connections get close_notify
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::routing::get;
use grace_http::tls::{TlsConfig, TlsInfo, default_crypto_provider, rustls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (ca, cert, key) = match (args.next(), args.next(), args.next()) {
        (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
        _ => make_pki(&std::env::temp_dir().join("grace-mtls"))?,
    };

    // The rustls configuration is ours: client certificates are required and checked
    // against the CA. grace serves it as it is, adding ALPN h2 and http/1.1 (it has none).
    let provider = default_crypto_provider()?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&ca)? {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()?;
    let chain = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(&key)?)?;
    let tls = TlsConfig::from_server_config(Arc::new(config));

    // SIGUSR1: the server certificate from the files again; the client verification stays.
    // A bad pair is refused (and logged); the previous one keeps serving.
    let reloader = tls.clone();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let _ = reloader.reload_from_pem_files(&cert, &key);
        }
    });

    let app = axum::Router::new().route(
        "/",
        get(|Extension(tls): Extension<TlsInfo>| async move {
            // The verifier only lets a verified client through, so a chain is always there.
            let chain = tls.peer_certificates().unwrap_or_default();
            let alpn = tls.alpn_protocol().map(String::from_utf8_lossy);
            format!(
                "hello, client with a {}-byte certificate (chain of {}), over {}\n",
                chain.first().map_or(0, |c| c.len()),
                chain.len(),
                alpn.as_deref().unwrap_or("no ALPN"),
            )
        }),
    );
    let report = grace_http::Server::bind("127.0.0.1:8443")
        .await?
        .tls(tls)
        .drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(10)))
        .serve(app)
        .with_signals()
        .await?;
    eprintln!("{}", report.to_json());
    Ok(())
}

/// A CA, a server certificate for `localhost` and a client certificate, written to `dir`.
fn make_pki(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "grace example CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca.self_signed(&ca_key)?;

    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server = server.signed_by(&server_key, &ca, &ca_key)?;

    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(DnType::CommonName, "grace example client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client = client.signed_by(&client_key, &ca, &ca_key)?;

    let ca_file = write("ca.pem", ca.pem())?;
    let cert = write("cert.pem", server.pem())?;
    let key = write("key.pem", server_key.serialize_pem())?;
    let client_cert = write("client.pem", client.pem())?;
    let client_key = write("client-key.pem", client_key.serialize_pem())?;
    eprintln!(
        "made in {dir}:\n  curl --cacert {ca} --cert {cc} --key {ck} https://localhost:8443/\n  \
         curl --cacert {ca} https://localhost:8443/   # refused: no client certificate",
        dir = dir.display(),
        ca = ca_file.display(),
        cc = client_cert.display(),
        ck = client_key.display(),
    );
    Ok((ca_file, cert, key))
}
