//! TLS termination with rustls (crate feature `tls`): your own rustls configuration or one
//! made from PEM files, replaced while serving.
//!
//! Three ways to make a [`TlsConfig`]:
//!
//! - [`TlsConfig::from_pem_files`] / [`from_pem`](TlsConfig::from_pem): a certificate chain
//!   and its key; TLS 1.2 and 1.3, no client certificates, ALPN `h2` then `http/1.1`.
//! - [`TlsConfig::from_server_config`]: your own `Arc<rustls::ServerConfig>`, used as it is:
//!   its crypto provider, client certificate verifier (mutual TLS), certificate resolver,
//!   session storage, protocol versions and ALPN list. One exception, ALPN: a configuration
//!   with *no* ALPN protocols gets `h2` and `http/1.1` (see below).
//! - [`TlsConfig::from_cert_resolver`]: your own `Arc<dyn ResolvesServerCert>` (an SNI
//!   resolver, certificates from a store), with the rest as for PEM.
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
//! Mutual TLS: a rustls configuration that requires client certificates signed by your CA
//! (the whole program: `examples/mtls.rs`). Each request's [`TlsInfo`] carries the client's
//! certificate chain ([`TlsInfo::peer_certificates`]).
//!
//! ```no_run
//! # fn doc(ca: rustls::pki_types::CertificateDer<'static>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use grace_http::tls::{TlsConfig, rustls};
//! use rustls::pki_types::pem::PemObject;
//! use rustls::pki_types::{CertificateDer, PrivateKeyDer};
//!
//! // The provider grace would use (the process default, else *ring*), or any other.
//! let provider = grace_http::tls::default_crypto_provider()?;
//! let mut roots = rustls::RootCertStore::empty();
//! roots.add(ca)?;
//! let verifier =
//!     rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
//!         .build()?;
//! let chain = CertificateDer::pem_file_iter("cert.pem")?.collect::<Result<Vec<_>, _>>()?;
//! let key = PrivateKeyDer::from_pem_file("key.pem")?;
//! let config = rustls::ServerConfig::builder_with_provider(provider)
//!     .with_safe_default_protocol_versions()?
//!     .with_client_cert_verifier(verifier)
//!     .with_single_cert(chain, key)?;
//! let tls = TlsConfig::from_server_config(Arc::new(config)); // ALPN: h2, http/1.1 added
//! // Swap the certificate, keeping the client verification (and the rest of the config):
//! tls.reload_from_pem_files("cert.pem", "key.pem")?;
//! # Ok(()) }
//! ```
//!
//! # Reload
//!
//! A [`TlsConfig`] holds the configuration new handshakes use; every clone shares it. Two
//! ways to replace it while serving, neither of which touches an established connection
//! (its keys do not depend on the certificate any more) or the listening socket:
//!
//! - [`reload_from_pem_files`](TlsConfig::reload_from_pem_files) /
//!   [`reload_from_pem`](TlsConfig::reload_from_pem): a new certificate and key, checked
//!   (parsed, the key loaded by the configuration's crypto provider and matched against the
//!   certificate) before they take the place of the configuration's certificates; the rest
//!   of the configuration is kept, client verification and session storage included. On a
//!   configuration of yours this replaces its certificate resolver (an SNI resolver too)
//!   by the one certificate. A pair that fails the checks is refused: the error says why,
//!   it is logged, and the previous certificate keeps serving.
//! - [`reload_server_config`](TlsConfig::reload_server_config): a whole new configuration
//!   (a new CA for client certificates, a new resolver, another provider).
//!
//! Both take effect for every connection accepted after they return. A client that resumes
//! a TLS session made before a reload is not sent a certificate (resumption skips it);
//! `reload_from_pem*` keeps the session storage, so such resumptions go on working, while a
//! configuration of your own given to `reload_server_config` brings its own storage.
//!
//! # ALPN
//!
//! grace serves HTTP/1.1 and HTTP/2 on every connection (HTTP/2 is recognised by its
//! preface, whatever ALPN said), so it offers both: `h2` then `http/1.1`. A configuration
//! of yours whose `alpn_protocols` is empty (what rustls' builder makes) gets that list, so
//! that browsers and other clients that only speak HTTP/2 after ALPN chose it get HTTP/2; a
//! non-empty list is never changed (`vec![b"http/1.1".to_vec()]` keeps clients on
//! HTTP/1.1). A client that offers no ALPN gets HTTP/1.1, or HTTP/2 with prior knowledge.
//!
//! # Crypto provider
//!
//! A configuration of yours keeps its provider: aws-lc-rs, *ring*, or any other. For the
//! configurations grace makes (`from_pem*`, `from_cert_resolver`) the provider is the
//! process default if one is installed (`CryptoProvider::install_default`, e.g. aws-lc-rs
//! for its post-quantum key exchange: enable rustls' `aws_lc_rs` feature in your own
//! `Cargo.toml`), else *ring*, which the crate feature `ring` (on by default) builds without
//! cmake. With `default-features = false, features = ["tls"]` rustls is built with no
//! provider from grace: those constructors then need an installed default
//! ([`TlsError::NoCryptoProvider`] otherwise), while `from_server_config` needs none.
//! [`default_crypto_provider`] is that choice, for configurations of your own.
//!
//! rustls 0.23.48 deprecated `rustls::crypto::ring::default_provider` (*ring* has no
//! post-quantum key exchange) and offers no other way to make the *ring* provider; grace
//! calls it in one place only, when no default is installed, and its users need not call
//! it at all.
//!
//! # Connections
//!
//! A TLS connection takes part in everything the server does: it is `New` during its
//! handshake (bounded by [`Timeouts::handshake`](crate::Timeouts::handshake),
//! 10 s by default), the first *decrypted* byte makes it `Active`, a drain gives a
//! connection still in its handshake the same first-byte grace as a silent plain one,
//! closes idle connections with `close_notify` before the FIN, and forcing shuts the TCP
//! socket down (`shutdown(2)`) like any other. A handshake that fails (a client without
//! the certificate the configuration requires, an unknown CA, plain HTTP) closes the
//! connection, logged at debug level. Every request carries a [`TlsInfo`] in its
//! extensions.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The rustls crate grace is built with, for making a `ServerConfig` of the same version.
pub use rustls;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::accept::{Accepted, Acceptor, BoxFuture, Socket};

/// Why a TLS configuration could not be made, or a certificate not loaded. A failed reload
/// leaves the previous configuration in place.
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
    /// The private key is not one the crypto provider can sign with (with *ring*: RSA,
    /// ECDSA P-256/P-384, Ed25519).
    #[error("unsupported private key: {0}")]
    UnsupportedKey(#[source] rustls::Error),
    /// The private key is not the certificate's.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The certificate cannot be parsed.
    #[error("bad certificate: {0}")]
    BadCertificate(#[source] rustls::Error),
    /// No crypto provider to make a configuration with: none is installed as the process
    /// default (`rustls::crypto::CryptoProvider::install_default`) and grace was built
    /// without its `ring` feature.
    #[error(
        "no rustls crypto provider: install one as the process default or enable grace-http's `ring` feature"
    )]
    NoCryptoProvider,
    /// The crypto provider cannot make a configuration (it supports neither TLS 1.2 nor
    /// TLS 1.3, say).
    #[error("the crypto provider cannot make a TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Server-side TLS: the rustls configuration new handshakes use, replaceable while serving
/// (see the [module docs](self)).
///
/// Cloning is cheap and every clone is the same configuration: keep one to reload
/// ([`reload_from_pem_files`](Self::reload_from_pem_files),
/// [`reload_server_config`](Self::reload_server_config)) and give another to
/// [`Server::tls`](crate::Server::tls).
#[derive(Clone)]
pub struct TlsConfig {
    current: Arc<RwLock<Current>>,
}

/// The configuration new handshakes use.
#[derive(Clone)]
struct Current {
    server: Arc<ServerConfig>,
    /// The certificate, when it is one grace loaded (PEM); `None` when a resolver of the
    /// user's chooses per handshake.
    loaded: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current();
        f.debug_struct("TlsConfig")
            .field("alpn", &current.server.alpn_protocols)
            .field("certificate_from_pem", &current.loaded.is_some())
            .finish_non_exhaustive()
    }
}

/// What grace offers by ALPN when a configuration offers nothing.
const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl TlsConfig {
    /// From a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1): TLS 1.2 and 1.3, no client certificates, ALPN `h2` then `http/1.1`, the
    /// process's default crypto provider or else *ring* (see the [module docs](self)).
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<TlsConfig, TlsError> {
        let provider = default_crypto_provider()?;
        let key = Arc::new(certified_key(cert_chain, key, &provider)?);
        let server = grace_server_config(provider, Arc::new(Fixed(Arc::clone(&key))))?;
        Ok(TlsConfig::with(Current {
            server: Arc::new(server),
            loaded: Some(key),
        }))
    }

    /// From PEM files: the certificate chain and the private key.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsError> {
        let (cert_chain, key) = read_pair(cert_chain.as_ref(), key.as_ref())?;
        TlsConfig::from_pem(&cert_chain, &key)
    }

    /// Your own rustls configuration, used as it is (its crypto provider, client
    /// certificate verifier, certificate resolver, versions, session storage), except that
    /// an empty ALPN list becomes `h2`, `http/1.1` (see the [module docs](self#alpn)).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use grace_http::tls::{TlsConfig, rustls};
    /// use rustls::pki_types::pem::PemObject;
    /// use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    ///
    /// let chain = CertificateDer::pem_file_iter("cert.pem")?.collect::<Result<Vec<_>, _>>()?;
    /// let key = PrivateKeyDer::from_pem_file("key.pem")?;
    /// // Any provider: `Arc::new(rustls::crypto::aws_lc_rs::default_provider())` with
    /// // rustls' `aws_lc_rs` feature, or grace's choice:
    /// let provider = grace_http::tls::default_crypto_provider()?;
    /// let mut config = rustls::ServerConfig::builder_with_provider(provider)
    ///     .with_protocol_versions(&[&rustls::version::TLS13])?
    ///     .with_no_client_auth()
    ///     .with_single_cert(chain, key)?;
    /// config.alpn_protocols = vec![b"http/1.1".to_vec()]; // kept as it is: no h2
    /// let tls = TlsConfig::from_server_config(Arc::new(config));
    /// let server = grace_http::Server::bind("0.0.0.0:8443").await?.tls(tls);
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn from_server_config(config: Arc<ServerConfig>) -> TlsConfig {
        TlsConfig::with(Current {
            server: with_http_alpn(config),
            loaded: None,
        })
    }

    /// Your own certificate resolver (which certificate each handshake presents: by SNI,
    /// from a store), with the rest as [`from_pem`](Self::from_pem) makes it: TLS 1.2 and
    /// 1.3, no client certificates, ALPN `h2` then `http/1.1`, the process's default
    /// provider or else *ring*. Replace the resolver with
    /// [`reload_server_config`](Self::reload_server_config), or swap certificates inside
    /// it yourself.
    ///
    /// ```no_run
    /// # fn doc(a: grace_http::tls::rustls::sign::CertifiedKey, b: grace_http::tls::rustls::sign::CertifiedKey) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use grace_http::tls::{TlsConfig, rustls};
    ///
    /// let mut by_name = rustls::server::ResolvesServerCertUsingSni::new();
    /// by_name.add("a.example", a)?;
    /// by_name.add("b.example", b)?;
    /// let tls = TlsConfig::from_cert_resolver(Arc::new(by_name))?;
    /// # let _ = tls; Ok(()) }
    /// ```
    pub fn from_cert_resolver(
        resolver: Arc<dyn ResolvesServerCert>,
    ) -> Result<TlsConfig, TlsError> {
        let server = grace_server_config(default_crypto_provider()?, resolver)?;
        Ok(TlsConfig::with(Current {
            server: Arc::new(server),
            loaded: None,
        }))
    }

    fn with(current: Current) -> TlsConfig {
        TlsConfig {
            current: Arc::new(RwLock::new(current)),
        }
    }

    /// Replaces the certificate and key: every connection accepted from now on presents the
    /// new certificate; established connections are not touched. The rest of the
    /// configuration stays (client verification, provider, ALPN, session storage); on a
    /// configuration of yours the new certificate replaces its certificate resolver. On an
    /// error (malformed PEM, a key that is not the certificate's) nothing changes: the
    /// previous certificate keeps serving, and the error says why (it is also logged).
    pub fn reload_from_pem(&self, cert_chain: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let provider = Arc::clone(self.server_config().crypto_provider());
        let loaded = certified_key(cert_chain, key, &provider);
        self.install(loaded)
    }

    /// Like [`reload_from_pem`](Self::reload_from_pem), reading both files first (a missing
    /// or unreadable file is an error, and the previous certificate stays).
    pub fn reload_from_pem_files(
        &self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<(), TlsError> {
        let provider = Arc::clone(self.server_config().crypto_provider());
        let loaded = read_pair(cert_chain.as_ref(), key.as_ref())
            .and_then(|(c, k)| certified_key(&c, &k, &provider));
        self.install(loaded)
    }

    fn install(&self, loaded: Result<CertifiedKey, TlsError>) -> Result<(), TlsError> {
        match loaded {
            Ok(key) => {
                let key = Arc::new(key);
                let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
                // A copy of the configuration in use (its `Arc`s shared: verifier, session
                // storage, ticketer), with the new certificate as its only one.
                let mut server = ServerConfig::clone(&current.server);
                server.cert_resolver = Arc::new(Fixed(Arc::clone(&key)));
                *current = Current {
                    server: Arc::new(server),
                    loaded: Some(key),
                };
                drop(current);
                tracing::info!("TLS certificate reloaded: new handshakes present it");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload refused; the previous certificate keeps serving");
                Err(e)
            }
        }
    }

    /// Replaces the whole configuration: every connection accepted from now on is served
    /// with `config` (ALPN as in [`from_server_config`](Self::from_server_config));
    /// established connections keep the configuration they were made with.
    ///
    /// ```no_run
    /// # fn doc(tls: grace_http::tls::TlsConfig, new: grace_http::tls::rustls::ServerConfig) {
    /// use std::sync::Arc;
    /// tls.reload_server_config(Arc::new(new)); // e.g. a new client CA, or a new resolver
    /// # }
    /// ```
    pub fn reload_server_config(&self, config: Arc<ServerConfig>) {
        let server = with_http_alpn(config);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current {
            server,
            loaded: None,
        };
        tracing::info!("TLS configuration replaced: new handshakes use it");
    }

    /// The certificate chain new handshakes present (DER, leaf first), when it was loaded by
    /// grace (`from_pem*`, `reload_from_pem*`); empty when a resolver of yours chooses the
    /// certificate per handshake (`from_server_config`, `from_cert_resolver`,
    /// `reload_server_config`).
    pub fn certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current()
            .loaded
            .map(|key| key.cert.clone())
            .unwrap_or_default()
    }

    /// The rustls configuration new handshakes use (a reload replaces it).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .server,
        )
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Acceptor for TlsConfig {
    fn accept(&self, socket: Socket) -> BoxFuture<io::Result<Accepted>> {
        // Chosen at accept: a reload that returned before the connection was accepted
        // applies to it.
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        Box::pin(async move {
            let stream = acceptor.accept(socket).await?;
            let session = stream.get_ref().1;
            let info = TlsInfo(Arc::new(Negotiated {
                alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                server_name: session.server_name().map(str::to_owned),
                version: session.protocol_version().and_then(|v| v.as_str()),
                peer_certificates: session.peer_certificates().map(<[_]>::to_vec),
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
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
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

    /// The client's certificate chain (DER, its own first), verified by the configuration's
    /// client certificate verifier: present under mutual TLS, `None` when the configuration
    /// asks for no client certificate or the client sent none where one is optional.
    ///
    /// ```no_run
    /// use grace_http::tls::TlsInfo;
    ///
    /// async fn handler(axum::Extension(tls): axum::Extension<TlsInfo>) -> String {
    ///     match tls.peer_certificates() {
    ///         Some(chain) => format!("client certificate: {} bytes", chain[0].len()),
    ///         None => "no client certificate".to_string(),
    ///     }
    /// }
    /// # let _ = axum::Router::<()>::new().route("/", axum::routing::get(handler));
    /// ```
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.0.peer_certificates.as_deref()
    }
}

/// One certificate, whatever the client asks for: the certificate grace loaded from PEM.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// `config`, with `h2` and `http/1.1` offered if it offers no ALPN protocol at all.
fn with_http_alpn(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    tracing::debug!("the TLS configuration offers no ALPN protocol: offering h2 and http/1.1");
    let mut config = ServerConfig::clone(&config);
    config.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The configuration grace makes: TLS 1.2 and 1.3, no client certificates, ALPN.
fn grace_server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, TlsError> {
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    server.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(server)
}

/// The crypto provider grace makes its configurations with (`from_pem*`,
/// `from_cert_resolver`): the process default if one is installed
/// (`CryptoProvider::install_default`), else *ring* (crate feature `ring`, on by default),
/// else [`TlsError::NoCryptoProvider`]. For a configuration of your own with the same
/// provider, without choosing one.
///
/// ```
/// # fn main() -> Result<(), grace_http::tls::TlsError> {
/// let provider = grace_http::tls::default_crypto_provider()?;
/// assert!(!provider.cipher_suites.is_empty());
/// # Ok(()) }
/// ```
pub fn default_crypto_provider() -> Result<Arc<CryptoProvider>, TlsError> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Ok(Arc::clone(installed));
    }
    #[cfg(feature = "ring")]
    {
        Ok(Arc::new(ring_provider()))
    }
    #[cfg(not(feature = "ring"))]
    {
        Err(TlsError::NoCryptoProvider)
    }
}

/// rustls' *ring* provider. rustls 0.23.48 deprecates its constructor ("no support for
/// post-quantum algorithms") without offering another way to make it (its own
/// crate-feature default calls it the same way), so the deprecation is allowed here, the
/// one place grace makes it; installing a default provider avoids it.
#[cfg(feature = "ring")]
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
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
