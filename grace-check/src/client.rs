//! Real clients: TCP (or TLS when asked), raw HTTP/1.1 bytes, HTTP/2 through the `h2` crate
//! with a tap that sees the GOAWAY frames, and WebSocket through tokio-tungstenite.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tap::ReadTap;

/// A byte stream to the server: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

/// Which application protocol a TLS connection asks for (ALPN).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    H2,
}

/// Where the server is and how to speak to it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
}

#[derive(Clone)]
pub struct Tls {
    pub name: rustls::pki_types::ServerName<'static>,
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// TLS that accepts the server's certificate whatever it is: grace-check checks how a
    /// server stops, not its certificate (test servers use self-signed ones).
    pub fn new(name: &str) -> Result<Tls, String> {
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("--tls-name {name:?}: {e}"))?;
        let config = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, String> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(Tls {
            name,
            h1: config(b"http/1.1")?,
            h2: config(b"h2")?,
        })
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How an attempt to reach or hear from the server went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect(2) was refused: nothing listens.
    Refused,
    /// The connection ended (FIN) before a complete response.
    Eof,
    /// The connection was reset.
    Reset,
    /// Nothing more came before our deadline.
    Timeout,
    /// Bytes that are not HTTP, a TLS failure, or another error.
    Other(String),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Refused => f.write_str("connection refused"),
            Kind::Eof => f.write_str("EOF"),
            Kind::Reset => f.write_str("reset"),
            Kind::Timeout => f.write_str("no answer"),
            Kind::Other(e) => f.write_str(e),
        }
    }
}

fn kind_of(e: &io::Error) -> Kind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Kind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Kind::Reset,
        io::ErrorKind::UnexpectedEof => Kind::Eof,
        io::ErrorKind::TimedOut => Kind::Timeout,
        _ => Kind::Other(e.to_string()),
    }
}

/// A request that got no complete response.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: Kind,
    pub at: Instant,
    /// Bytes of the response received before it ended (0: no response at all).
    pub bytes: usize,
    /// The status, when the head had arrived.
    pub status: Option<u16>,
}

impl Failure {
    fn new(kind: Kind) -> Failure {
        Failure {
            kind,
            at: Instant::now(),
            bytes: 0,
            status: None,
        }
    }

    /// Nothing of a response arrived: for an idempotent request, HTTP allows a retry.
    pub fn unanswered(&self) -> bool {
        self.bytes == 0 && self.kind != Kind::Timeout
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.bytes, self.status) {
            (0, _) => write!(f, "{} without a response", self.kind),
            (n, Some(s)) => write!(f, "{s} cut after {n} bytes ({})", self.kind),
            (n, None) => write!(f, "cut after {n} bytes of the head ({})", self.kind),
        }
    }
}

impl Target {
    /// A TCP connection (never TLS), within 2 s.
    pub async fn tcp(&self) -> Result<TcpStream, Failure> {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(Failure::new(kind_of(&e))),
            Err(_) => Err(Failure::new(Kind::Timeout)),
        }
    }

    /// A connection, with the TLS handshake when asked.
    pub async fn connect(&self, alpn: Alpn) -> Result<Stream, Failure> {
        let tcp = self.tcp().await?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let config = match alpn {
            Alpn::Http1 => Arc::clone(&tls.h1),
            Alpn::H2 => Arc::clone(&tls.h2),
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(
            Duration::from_secs(3),
            connector.connect(tls.name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => Ok(Box::new(s)),
            Ok(Err(e)) => Err(Failure::new(match kind_of(&e) {
                Kind::Other(m) => Kind::Other(format!("TLS handshake: {m}")),
                k => k,
            })),
            Err(_) => Err(Failure::new(Kind::Timeout)),
        }
    }

    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// A GET request as bytes.
pub fn get(path: &str, host: &str, close: bool) -> Vec<u8> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: grace-check\r\n{conn}\r\n")
        .into_bytes()
}

/// A complete HTTP/1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the last byte arrived.
    pub done: Instant,
    /// When each read of the body arrived, and how many bytes it brought.
    pub arrivals: Vec<(Instant, usize)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Connection: close` (or an HTTP/1.0 answer without keep-alive).
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn bytes_after(&self, t: Instant) -> usize {
        self.arrivals
            .iter()
            .filter(|(at, _)| *at > t)
            .map(|(_, n)| n)
            .sum()
    }
}

/// How a connection we expect to end ended.
#[derive(Debug)]
pub enum Closed {
    Eof(Instant),
    Reset(Instant),
    /// The server sent bytes instead.
    Data,
    /// Still open at our deadline.
    Open,
}

/// A raw HTTP/1.1 client connection.
pub struct H1 {
    s: Stream,
    buf: Vec<u8>,
    /// Requests written on this connection so far.
    pub requests: usize,
    host: String,
}

impl H1 {
    pub async fn connect(t: &Target) -> Result<H1, Failure> {
        Ok(H1 {
            s: t.connect(Alpn::Http1).await?,
            buf: Vec::new(),
            requests: 0,
            host: t.authority(),
        })
    }

    pub async fn send(&mut self, raw: &[u8]) -> Result<(), Failure> {
        self.requests += 1;
        self.s
            .write_all(raw)
            .await
            .map_err(|e| Failure::new(kind_of(&e)))?;
        self.s.flush().await.map_err(|e| Failure::new(kind_of(&e)))
    }

    pub async fn send_get(&mut self, path: &str, close: bool) -> Result<(), Failure> {
        let req = get(path, &self.host, close);
        self.send(&req).await
    }

    /// `GET path`, its response within `within`.
    pub async fn get(&mut self, path: &str, within: Duration) -> Result<Response, Failure> {
        self.send_get(path, false).await?;
        self.read_response(Instant::now() + within).await
    }

    /// Reads more bytes into the buffer. `Err` on EOF, reset or the deadline.
    async fn fill(&mut self, until: Instant) -> Result<usize, Kind> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(until.into(), self.s.read(&mut chunk)).await {
            Err(_) => Err(Kind::Timeout),
            Ok(Ok(0)) => Err(Kind::Eof),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(kind_of(&e)),
        }
    }

    /// Reads one response (skipping 1xx) until `until`.
    pub async fn read_response(&mut self, until: Instant) -> Result<Response, Failure> {
        let mut received = 0usize;
        let fail = |kind: Kind, received: usize, status: Option<u16>| Failure {
            kind,
            at: Instant::now(),
            bytes: received,
            status,
        };
        loop {
            // The head.
            let end = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i + 4;
                }
                if self.buf.len() > 64 * 1024 {
                    return Err(fail(
                        Kind::Other("response head too large".into()),
                        received,
                        None,
                    ));
                }
                match self.fill(until).await {
                    Ok(n) => received += n,
                    Err(k) => return Err(fail(k, received + self.buf.len(), None)),
                }
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or_default().to_owned();
            let status: u16 = match parts.next().and_then(|s| s.parse().ok()) {
                Some(s) if version.starts_with("HTTP/1.") => s,
                _ => {
                    return Err(fail(
                        Kind::Other(format!("not an HTTP/1 response: {status_line:?}")),
                        received,
                        None,
                    ));
                }
            };
            let headers: Vec<(String, String)> = lines
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    Some((k.trim().to_owned(), v.trim().to_owned()))
                })
                .collect();
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let mut resp = Response {
                status,
                headers,
                body: Vec::new(),
                done: Instant::now(),
                arrivals: Vec::new(),
            };
            if version == "HTTP/1.0"
                && !resp
                    .headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
            {
                resp.headers.push(("connection".into(), "close".into()));
            }
            if !self.buf.is_empty() {
                resp.arrivals.push((Instant::now(), self.buf.len()));
            }
            let chunked = resp
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let length: Option<usize> = resp.header("content-length").and_then(|v| v.parse().ok());
            let no_body = status == 204 || status == 304 || status == 101;
            let r = if no_body {
                Ok(())
            } else if chunked {
                self.read_chunked(&mut resp, until).await
            } else if let Some(n) = length {
                self.read_exact_body(&mut resp, n, until).await
            } else {
                // Delimited by the end of the connection.
                loop {
                    match self.fill(until).await {
                        Ok(n) => resp.arrivals.push((Instant::now(), n)),
                        Err(Kind::Eof) => break,
                        Err(k) => return Err(fail(k, received + 1, Some(status))),
                    }
                }
                resp.body = std::mem::take(&mut self.buf);
                resp.headers.push(("connection".into(), "close".into()));
                Ok(())
            };
            match r {
                Ok(()) => {
                    resp.done = Instant::now();
                    return Ok(resp);
                }
                Err(k) => {
                    let got = received.max(1) + resp.body.len();
                    return Err(fail(k, got, Some(status)));
                }
            }
        }
    }

    async fn read_exact_body(
        &mut self,
        resp: &mut Response,
        n: usize,
        until: Instant,
    ) -> Result<(), Kind> {
        while self.buf.len() < n {
            let got = self.fill(until).await?;
            resp.arrivals.push((Instant::now(), got));
        }
        resp.body = self.buf.drain(..n).collect();
        Ok(())
    }

    async fn read_line(&mut self, resp: &mut Response, until: Instant) -> Result<String, Kind> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            let got = self.fill(until).await?;
            resp.arrivals.push((Instant::now(), got));
        }
    }

    async fn read_chunked(&mut self, resp: &mut Response, until: Instant) -> Result<(), Kind> {
        loop {
            let line = self.read_line(resp, until).await?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| Kind::Other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line(resp, until).await?.is_empty() {}
                return Ok(());
            }
            while self.buf.len() < size + 2 {
                let got = self.fill(until).await?;
                resp.arrivals.push((Instant::now(), got));
            }
            resp.body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Waits for the server to close the connection.
    pub async fn wait_closed(&mut self, until: Instant) -> Closed {
        if !self.buf.is_empty() {
            return Closed::Data;
        }
        match self.fill(until).await {
            Ok(_) => Closed::Data,
            Err(Kind::Timeout) => Closed::Open,
            Err(Kind::Eof) => Closed::Eof(Instant::now()),
            Err(_) => Closed::Reset(Instant::now()),
        }
    }

    /// True when the server has closed the connection (looks without waiting long).
    pub async fn is_closed(&mut self) -> bool {
        matches!(
            self.wait_closed(Instant::now() + Duration::from_millis(2))
                .await,
            Closed::Eof(_) | Closed::Reset(_)
        )
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A GOAWAY frame the server sent.
#[derive(Clone, Copy, Debug)]
pub struct GoAway {
    pub at: Instant,
    pub last_stream_id: u32,
    pub error_code: u32,
}

/// What the tap saw of the server's HTTP/2 frames.
#[derive(Default)]
pub struct TapLog {
    pub goaways: Vec<GoAway>,
    pub closed: Option<Instant>,
    /// The first bytes the server sent (`HTTP/1.1 …` from a server without HTTP/2).
    pub first: Vec<u8>,
    head: Vec<u8>,
    /// Payload bytes still to pass in the current frame.
    left: usize,
    kind: u8,
    payload: Vec<u8>,
}

impl TapLog {
    fn feed(&mut self, mut bytes: &[u8]) {
        if self.first.len() < 8 {
            let take = (8 - self.first.len()).min(bytes.len());
            self.first.extend_from_slice(&bytes[..take]);
        }
        while !bytes.is_empty() {
            if self.left == 0 && self.head.len() < 9 {
                let take = (9 - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.head.len() == 9 {
                    self.left =
                        u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.kind = self.head[3];
                    self.payload.clear();
                    if self.left == 0 {
                        self.frame_done();
                    }
                }
                continue;
            }
            let take = self.left.min(bytes.len());
            if self.kind == 0x7 && self.payload.len() < 8 {
                let want = (8 - self.payload.len()).min(take);
                self.payload.extend_from_slice(&bytes[..want]);
            }
            bytes = &bytes[take..];
            self.left -= take;
            if self.left == 0 {
                self.frame_done();
            }
        }
    }

    fn frame_done(&mut self) {
        if self.kind == 0x7 && self.payload.len() == 8 {
            let p = &self.payload;
            self.goaways.push(GoAway {
                at: Instant::now(),
                last_stream_id: u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                error_code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            });
        }
        self.head.clear();
    }
}

/// `inner`, passed through, with every read of it fed to `log` (the frames the server sends,
/// and when the connection ended).
pub fn tap(
    inner: Stream,
    log: Arc<Mutex<TapLog>>,
) -> ReadTap<Stream, impl FnMut(&io::Result<()>, &[u8]) + Unpin + Send + 'static> {
    ReadTap::new(inner, move |res: &io::Result<()>, new: &[u8]| {
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if new.is_empty() || res.is_err() {
            log.closed.get_or_insert(Instant::now());
        } else {
            log.feed(new);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_reads_goaways_split_anywhere() {
        let mut bytes = Vec::new();
        // SETTINGS (empty), a DATA frame of 3 bytes, GOAWAY(max, 0), GOAWAY(1, 0) + debug.
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 3, 0, 0, 0, 0, 0, 1, b'a', b'b', b'c']);
        bytes.extend_from_slice(&[
            0, 0, 8, 7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        bytes.extend_from_slice(&[
            0, 0, 10, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, b'h', b'i',
        ]);
        for split in 1..bytes.len() {
            let mut log = TapLog::default();
            for piece in bytes.chunks(split) {
                log.feed(piece);
            }
            let ids: Vec<u32> = log.goaways.iter().map(|g| g.last_stream_id).collect();
            assert_eq!(ids, [0x7fff_ffff, 1], "split {split}");
        }
    }
}
