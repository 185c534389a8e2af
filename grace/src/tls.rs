//! TLS termination with rustls (crate feature `tls`), with certificate reload.
//!
//! ```no_run
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! use grace_http::tls::TlsConfig;
//!
//! let tls = TlsConfig::from_pem_files("cert.pem", "key.pem")?;
//! let server = grace_http::Server::bind("0.0.0.0:8443").await?.tls(tls.clone());
//! // Later, on SIGUSR1 or when the files change: new handshakes get the new certificate,
//! // connections already established keep theirs, and a bad pair is refused.
//! if let Err(e) = tls.reload_from_pem_files("cert.pem", "key.pem") {
//!     eprintln!("still serving the previous certificate: {e}");
//! }
//! # let _ = server; Ok(()) }
//! ```
//!
//! A TLS connection takes part in everything the server does: it is `New` during its
//! handshake (bounded by [`Server::handshake_timeout`](crate::Server::handshake_timeout),
//! 10 s by default), the first *decrypted* byte makes it `Active`, a drain gives a
//! connection still in its handshake the same first-byte grace as a silent plain one,
//! closes idle connections with `close_notify` before the FIN, and forcing shuts the TCP
//! socket down (`shutdown(2)`) like any other. ALPN offers `h2` and `http/1.1`; every
//! request carries a [`TlsInfo`] in its extensions.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::accept::{Accepted, Acceptor, BoxFuture, Socket};

/// Why a certificate could not be loaded. A failed reload leaves the previous certificate
/// in place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The certificate PEM holds no `CERTIFICATE` block.
    #[error("no certificate in the certificate PEM")]
    NoCertificate,
    /// The key PEM holds no private key block.
    #[error("no private key in the key PEM")]
    NoPrivateKey,
    /// The PEM data is malformed.
    #[error("malformed {what} PEM: {message}")]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// What the parser said.
        message: String,
    },
    /// The private key is not one rustls can sign with (RSA, ECDSA P-256/P-384, Ed25519).
    #[error("unsupported private key: {0}")]
    UnsupportedKey(#[source] rustls::Error),
    /// The private key is not the certificate's.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The certificate cannot be parsed.
    #[error("bad certificate: {0}")]
    BadCertificate(#[source] rustls::Error),
}

/// Server-side TLS: a certificate chain and key that can be replaced while serving, and the
/// rustls configuration around it (TLS 1.2 and 1.3, the `ring` provider, ALPN `h2` then
/// `http/1.1`).
///
/// Cloning is cheap and every clone is the same configuration: keep one to
/// [`reload`](Self::reload_from_pem_files) and give another to
/// [`Server::tls`](crate::Server::tls).
#[derive(Clone)]
pub struct TlsConfig {
    certs: Arc<Certs>,
    server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("alpn", &self.server.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// From a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1).
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = certified_key(cert_chain, key, &provider)?;
        let certs = Arc::new(Certs {
            current: RwLock::new(Arc::new(key)),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certs) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsConfig {
            certs,
            server: Arc::new(server),
        })
    }

    /// From PEM files: the certificate chain and the private key.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsError> {
        let (cert_chain, key) = read_pair(cert_chain.as_ref(), key.as_ref())?;
        TlsConfig::from_pem(&cert_chain, &key)
    }

    /// Replaces the certificate and key: every handshake from now on presents the new
    /// certificate; established connections are not touched. On an error (malformed PEM,
    /// a key that is not the certificate's) nothing changes: the previous certificate keeps
    /// serving, and the error says why (it is also logged).
    pub fn reload_from_pem(&self, cert_chain: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let loaded = certified_key(cert_chain, key, self.server.crypto_provider());
        self.install(loaded)
    }

    /// Like [`reload_from_pem`](Self::reload_from_pem), reading both files first (a missing
    /// or unreadable file is an error, and the previous certificate stays).
    pub fn reload_from_pem_files(
        &self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<(), TlsError> {
        let loaded = read_pair(cert_chain.as_ref(), key.as_ref())
            .and_then(|(c, k)| certified_key(&c, &k, self.server.crypto_provider()));
        self.install(loaded)
    }

    fn install(&self, loaded: Result<CertifiedKey, TlsError>) -> Result<(), TlsError> {
        match loaded {
            Ok(key) => {
                *self
                    .certs
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                tracing::info!("TLS certificate reloaded: new handshakes present it");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload refused; the previous certificate keeps serving");
                Err(e)
            }
        }
    }

    /// The certificate chain new handshakes present (DER, leaf first).
    pub fn certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        self.certs.current().cert.clone()
    }

    /// The rustls configuration (read-only: the certificate comes from this `TlsConfig`).
    pub fn server_config(&self) -> &Arc<rustls::ServerConfig> {
        &self.server
    }
}

impl Acceptor for TlsConfig {
    fn accept(&self, socket: Socket) -> BoxFuture<io::Result<Accepted>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.server));
        Box::pin(async move {
            let stream = acceptor.accept(socket).await?;
            let session = stream.get_ref().1;
            let info = TlsInfo(Arc::new(Negotiated {
                alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                server_name: session.server_name().map(str::to_owned),
                version: session.protocol_version().and_then(|v| v.as_str()),
            }));
            Ok(Accepted::new(stream).with_extension(info))
        })
    }
}

/// What was negotiated on a TLS connection, in the extensions of each of its requests
/// (`axum::Extension<TlsInfo>`).
///
/// Shared by the connection's requests: each carries a reference, not a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo(Arc<Negotiated>);

#[derive(Debug, PartialEq, Eq)]
struct Negotiated {
    alpn: Option<Vec<u8>>,
    server_name: Option<String>,
    version: Option<&'static str>,
}

impl TlsInfo {
    /// The ALPN protocol agreed on (`b"h2"`, `b"http/1.1"`), if the client offered any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.0.alpn.as_deref()
    }

    /// The host name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.0.server_name.as_deref()
    }

    /// The protocol version, like `TLSv1_3`.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.0.version
    }
}

/// The certificate new handshakes present, swapped by a reload.
#[derive(Debug)]
struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pair(cert_chain: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok((read(cert_chain)?, read(key)?))
}

/// Parses and checks a certificate chain and its key.
fn certified_key(
    cert_chain: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem = |what| {
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            message: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificate"))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = match PrivateKeyDer::from_pem_slice(key) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(TlsError::NoPrivateKey),
        Err(e) => return Err(pem("key")(e)),
    };
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::UnsupportedKey)?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch),
        Err(e) => Err(TlsError::BadCertificate(e)),
    }
}
