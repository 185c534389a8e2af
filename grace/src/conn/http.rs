//! The HTTP protocol of one connection: which version it speaks (told by its first bytes, as
//! hyper-util's `auto` builder does), and hyper's connection for it. Unlike hyper-util's,
//! an HTTP/1 connection here can give its socket back between requests, with the bytes read
//! but not yet parsed, for a hand-over to the next generation (see `crate::handover`).

use std::future::Future;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::Rewind;
use super::task::{BoxError, ResponseBody};

/// HTTP/2's connection preface: a connection whose first bytes are these speaks HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's connection builders (HTTP/1.1 and HTTP/2), as
/// [`Server::configure_hyper`](crate::Server::configure_hyper) gives them.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let server = grace_http::Server::bind("127.0.0.1:8080").await?.configure_hyper(|b| {
///     b.http1().max_buf_size(64 * 1024).title_case_headers(true);
///     b.http2().max_concurrent_streams(100);
/// });
/// # let _ = server; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct HyperBuilder {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HyperBuilder {
    /// grace's settings: hyper's defaults, except that the header-read timeout is kept by
    /// the server's coarse clock (one timer per server, not one per request), HTTP/2 has a
    /// timer (for its keep-alive pings), and RFC 8441's extended CONNECT is on (WebSocket
    /// over HTTP/2).
    pub(crate) fn new() -> Self {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(None);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).enable_connect_protocol();
        HyperBuilder { http1, http2 }
    }

    /// The HTTP/1.1 settings.
    pub fn http1(&mut self) -> &mut http1::Builder {
        &mut self.http1
    }

    /// The HTTP/2 settings.
    pub fn http2(&mut self) -> &mut http2::Builder<TokioExecutor> {
        &mut self.http2
    }
}

type Io<I> = TokioIo<Rewind<I>>;

/// A connection's HTTP, from its first bytes to its end.
// The variants differ in size, and the largest (hyper's HTTP/1 connection) is what a
// connection spends most of its life in: boxing it would cost every connection an
// allocation and save none of them memory.
#[allow(clippy::large_enum_variant)]
pub(crate) enum HttpConn<I, S>
where
    S: HttpService<Incoming>,
{
    /// Reading the first bytes, to tell HTTP/2's preface from an HTTP/1 request.
    Sniff {
        io: Option<I>,
        buf: [u8; 24],
        len: usize,
        service: Option<S>,
        builder: Arc<HyperBuilder>,
        /// Asked to close gracefully before its protocol was known: it closes the way that
        /// protocol does once it is told (its request, begun, is answered).
        closing: bool,
    },
    H1(http1::UpgradeableConnection<Io<I>, S>),
    /// Boxed: hyper's HTTP/2 connection may not be `Unpin`, and an HTTP/1 one must move out
    /// of this whole for a hand-over.
    H2(Pin<Box<http2::Connection<Io<I>, S, TokioExecutor>>>),
    /// Ended (closed before a protocol was known, or handed over).
    Done,
}

/// What an HTTP/1 connection gives back between requests (see [`HttpConn::take_for_handover`]).
#[cfg(unix)]
pub(crate) struct Released<I> {
    pub(crate) io: I,
    /// HTTP/1, or not told yet.
    pub(crate) kind: crate::handover::Kind,
    /// The bytes read from `io` but not parsed yet, in order.
    pub(crate) buffered: [Bytes; 2],
}

impl<I, S, B> HttpConn<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Send + 'static,
    B: ResponseBody,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    /// A new connection: its protocol is told by its first bytes.
    pub(crate) fn new(io: I, service: S, builder: Arc<HyperBuilder>) -> Self {
        Self::sniffing(io, &[], service, builder)
    }

    /// A connection whose protocol is still to be told, `read` already read from it (the
    /// start of HTTP/2's preface at most: see [`take_for_handover`](Self::take_for_handover)).
    pub(crate) fn sniffing(io: I, read: &[u8], service: S, builder: Arc<HyperBuilder>) -> Self {
        let mut buf = [0; 24];
        let len = read.len().min(buf.len());
        buf[..len].copy_from_slice(&read[..len]);
        HttpConn::Sniff {
            io: Some(io),
            buf,
            len,
            service: Some(service),
            builder,
            closing: false,
        }
    }

    /// A connection known to speak HTTP/1 (handed over), with the bytes that came with it.
    pub(crate) fn http1(io: I, prefix: Bytes, service: S, builder: &HyperBuilder) -> Self {
        let io = TokioIo::new(Rewind::new(io, prefix));
        HttpConn::H1(builder.http1.serve_connection(io, service).with_upgrades())
    }

    /// HTTP/2, as told by its preface.
    #[cfg(unix)]
    pub(crate) fn is_http2(&self) -> bool {
        matches!(self, HttpConn::H2(_))
    }

    /// Gives back an HTTP/1 connection's stream and unparsed bytes, or one whose protocol
    /// is not told yet (silent, or the start of HTTP/2's preface: the receiver tells it).
    /// Only between requests: the caller checks that no request is in flight and that the
    /// last response is fully written (see `Conn::hand_over`); hyper is not polled in
    /// between, so nothing moves meanwhile. `None` for HTTP/2, or after an upgrade.
    #[cfg(unix)]
    pub(crate) fn take_for_handover(&mut self) -> Option<Released<I>> {
        match self {
            HttpConn::Sniff { io, buf, len, .. } => {
                let io = io.take()?;
                let buffered = [Bytes::copy_from_slice(&buf[..*len]), Bytes::new()];
                *self = HttpConn::Done;
                Some(Released {
                    io,
                    kind: crate::handover::Kind::Unknown,
                    buffered,
                })
            }
            HttpConn::H1(_) => {
                let HttpConn::H1(conn) = std::mem::replace(self, HttpConn::Done) else {
                    unreachable!("matched above")
                };
                let parts = conn.into_parts()?;
                let (io, rest) = parts.io.into_inner().into_parts();
                Some(Released {
                    io,
                    kind: crate::handover::Kind::Http1,
                    buffered: [parts.read_buf, rest],
                })
            }
            HttpConn::H2(_) | HttpConn::Done => None,
        }
    }

    /// Asks the connection to close gracefully: hyper's own graceful shutdown. A connection
    /// that has sent nothing ends at once; one that sent the first bytes of HTTP/2's
    /// preface (`P`, `PR`… which could as well begin `POST`) closes as its protocol does
    /// once told (HTTP/2: GOAWAY; HTTP/1: its answer says `Connection: close`), so the
    /// request it began is answered.
    pub(crate) fn graceful_shutdown(&mut self) {
        match self {
            HttpConn::Sniff { len: 0, .. } => *self = HttpConn::Done,
            HttpConn::Sniff { closing, .. } => *closing = true,
            HttpConn::H1(conn) => Pin::new(conn).graceful_shutdown(),
            HttpConn::H2(conn) => conn.as_mut().graceful_shutdown(),
            HttpConn::Done => {}
        }
    }
}

impl<I, S, B> Future for HttpConn<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Send + 'static,
    B: ResponseBody,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match this {
                HttpConn::Sniff {
                    io,
                    buf,
                    len,
                    service,
                    builder,
                    closing,
                } => {
                    let Some(stream) = io.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let h2 = loop {
                        if *len == H2_PREFACE.len() {
                            break true;
                        }
                        if buf[..*len] != H2_PREFACE[..*len] {
                            break false; // what came with a connection handed over
                        }
                        let mut read = ReadBuf::new(&mut buf[*len..]);
                        ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
                        let n = read.filled().len();
                        *len += n;
                        // A mismatch (or the end of the stream) is HTTP/1, or nothing hyper
                        // will make sense of: it answers or closes.
                        if n == 0 || buf[..*len] != H2_PREFACE[..*len] {
                            break false;
                        }
                    };
                    let builder = Arc::clone(builder);
                    let (Some(stream), Some(service)) = (io.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let read = Bytes::copy_from_slice(&buf[..*len]);
                    let closing = *closing;
                    *this = if h2 {
                        let io = TokioIo::new(Rewind::new(stream, read));
                        HttpConn::H2(Box::pin(builder.http2.serve_connection(io, service)))
                    } else {
                        HttpConn::http1(stream, read, service, &builder)
                    };
                    // HTTP/2 says GOAWAY now. HTTP/1 is not told here: hyper, which has not
                    // read the head yet, would close at once; its answer carries
                    // `Connection: close` instead (the drain was asked for: `request.rs`).
                    if closing && h2 {
                        this.graceful_shutdown();
                    }
                }
                HttpConn::H1(conn) => return Pin::new(conn).poll(cx).map_err(Into::into),
                HttpConn::H2(conn) => return conn.as_mut().poll(cx).map_err(Into::into),
                HttpConn::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}
