//! Wrapping accepted connections: TLS, or anything else that turns the socket into the byte
//! stream HTTP is spoken over (a PROXY protocol header, a custom handshake).
//!
//! An [`Acceptor`] gets each accepted [`Socket`] and returns the stream to serve. The
//! connection is tracked from the moment it is accepted, before the acceptor runs: while
//! the acceptor works (a TLS handshake) it is `New`, the drain gives it the same first-byte
//! grace as any silent connection, and forcing shuts the socket's descriptor down whatever
//! the acceptor is doing. The stream it returns is then served through the tracker's
//! wrapper, so the first byte *it* delivers (the decrypted request, for TLS) is what makes
//! the connection `Active`. Connections served through an acceptor are closed by their own
//! task at a drain (hyper's graceful shutdown, then the stream's `poll_shutdown`), never
//! shut from outside while idle, so the wrapper can say goodbye first (TLS `close_notify`).
//!
//! ```no_run
//! use grace_http::accept::{Accepted, Acceptor, BoxFuture, Socket};
//!
//! /// Serves plain HTTP, tagging every request with the listener it came through.
//! struct Tag(&'static str);
//!
//! impl Acceptor for Tag {
//!     fn accept(&self, socket: Socket) -> BoxFuture<std::io::Result<Accepted>> {
//!         let tag = self.0;
//!         Box::pin(async move { Ok(Accepted::new(socket).with_extension(tag)) })
//!     }
//! }
//! # async fn doc() -> Result<(), grace_http::Error> {
//! let server = grace_http::Server::bind("127.0.0.1:8080").await?.acceptor(Tag("public"));
//! # let _ = server; Ok(()) }
//! ```

use std::future::Future;
use std::io;
#[cfg(unix)]
use std::os::fd::{AsRawFd, RawFd};
#[cfg(windows)]
use std::os::windows::io::{AsRawSocket, RawSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::base::conn::{Addr, ConnInfo};
use crate::conn::record::Conn;
use crate::listener::Stream;

/// A boxed future, as [`Acceptor::accept`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A byte stream HTTP can be served over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Turns each accepted socket into the stream that HTTP is served over (see the module
/// docs). Install one with [`Server::acceptor`](crate::Server::acceptor) (TLS:
/// `Server::tls`, crate feature `tls`).
///
/// The future is bounded by [`Timeouts::handshake`](crate::Timeouts::handshake);
/// an error or a timeout closes the connection (logged at debug level) and the server
/// goes on. The stream returned must own the [`Socket`]: the socket's descriptor is what a
/// forced shutdown acts on, and it must stay open exactly as long as the socket is alive.
pub trait Acceptor: Send + Sync + 'static {
    /// Wraps one accepted socket.
    fn accept(&self, socket: Socket) -> BoxFuture<io::Result<Accepted>>;
}

impl<A: Acceptor + ?Sized> Acceptor for Arc<A> {
    fn accept(&self, socket: Socket) -> BoxFuture<io::Result<Accepted>> {
        (**self).accept(socket)
    }
}

/// What an [`Acceptor`] made of a socket: the stream to serve, and values to put into the
/// extensions of every request served on it (for TLS, a `tls::TlsInfo`).
pub struct Accepted {
    pub(crate) io: BoxedIo,
    pub(crate) extensions: http::Extensions,
}

impl Accepted {
    /// The stream to serve HTTP over; it must own the [`Socket`] it was made from.
    pub fn new(io: impl Io) -> Accepted {
        Accepted {
            io: BoxedIo(Box::new(io)),
            extensions: http::Extensions::new(),
        }
    }

    /// Adds `value` to the extensions of every request on this connection (read it with
    /// `axum::Extension<T>` or `request.extensions().get::<T>()`).
    pub fn with_extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Accepted {
        self.extensions.insert(value);
        self
    }
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted").finish_non_exhaustive()
    }
}

/// An acceptor's stream, as hyper is given it.
pub(crate) struct BoxedIo(Box<dyn Io>);

impl AsyncRead for BoxedIo {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxedIo {
    crate::conn::io::write_through!(0);
}

/// An accepted socket, as an [`Acceptor`] receives it: a TCP or Unix-domain stream,
/// already tracked by the server.
pub struct Socket {
    stream: Stream,
    conn: Arc<Conn>,
}

impl Socket {
    pub(crate) fn new(stream: Stream, conn: Arc<Conn>) -> Socket {
        Socket { stream, conn }
    }

    /// The connection: its id, peer address and when it was accepted.
    pub fn info(&self) -> &ConnInfo {
        &self.conn.info
    }

    /// The peer's address.
    pub fn peer(&self) -> &Addr {
        &self.conn.info.peer
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("id", &self.conn.info.id)
            .field("peer", &self.conn.info.peer)
            .finish()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // Before the descriptor closes (`stream` is dropped after this): a forced shutdown
        // must never reach the number once the kernel may give it to another file.
        self.conn.socket.release();
    }
}

#[cfg(unix)]
impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(windows)]
impl AsRawSocket for Socket {
    fn as_raw_socket(&self) -> RawSocket {
        self.stream.as_raw_socket()
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            // A handshake under way is not a silent connection (see `Tracker::shed_for_new`).
            self.conn.heard();
        }
        res
    }
}

impl AsyncWrite for Socket {
    crate::conn::io::write_through!(stream);
}
