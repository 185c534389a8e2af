//! The socket wrapper every connection is served through.
//!
//! It sees each read (to move `New → Active`, and `Idle → Active` on HTTP/1) and, when it
//! drops, unregisters the connection. It stays with the socket if hyper hands it to an
//! upgrade handler, so an upgraded connection is tracked until it really closes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Addr;
use super::record::Conn;
use super::tracker::Tracker;
use crate::sys::AsRawFd;

pub(crate) struct TrackedIo<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsRawFd> TrackedIo<S> {
    pub(crate) fn new(inner: S, peer: Addr, tracker: &Arc<Tracker>) -> Self {
        let conn = tracker.register(peer, &inner);
        TrackedIo { inner, conn }
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl<S> TrackedIo<S> {
    /// The stream.
    #[cfg(unix)]
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Around a stream whose connection was registered before (when it was accepted, before
    /// an acceptor's handshake): `conn`'s socket slot holds the underlying socket.
    pub(crate) fn registered(inner: S, conn: Arc<Conn>) -> Self {
        TrackedIo { inner, conn }
    }
}

impl<S> Drop for TrackedIo<S> {
    fn drop(&mut self) {
        // Runs before `inner` (the socket) is dropped and closed.
        self.conn.tracker().unregister(&self.conn);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    // Always: otherwise hyper's read path calls it out of line on every read.
    #[inline(always)]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(_)) = res {
            // A socket the drain closed in place is no socket any more (see
            // `SocketSlot::close_in_place`): its task parks as at an end of stream.
            if self.conn.shut_by_drain() && self.conn.tracker().park(cx.waker()) {
                return Poll::Pending;
            }
        } else if let Poll::Ready(Ok(())) = res {
            if buf.filled().len() == before {
                // The end of the stream. On a socket the drain shut, the task waits for the
                // stop to be over before it unwinds (see `Tracker::park`).
                if buf.remaining() > 0
                    && self.conn.shut_by_drain()
                    && self.conn.tracker().park(cx.waker())
                {
                    return Poll::Pending;
                }
            } else if !self.conn.on_read(&buf.filled()[before..]) {
                // A request began as the connection was closed while idle: it is not read,
                // and hyper sees the end of the connection instead (see `Conn::on_read`).
                buf.set_filled(before);
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    write_through!(inner, except flush);

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            self.conn.on_flush();
        }
        res
    }
}

/// A stream with bytes put back in front of it: those read to tell the protocol, or those
/// that came with a connection handed over.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(inner: I, prefix: Bytes) -> Self {
        Rewind { prefix, inner }
    }

    /// The stream, and what of the prefix was not read yet.
    #[cfg(unix)]
    pub(crate) fn into_parts(self) -> (I, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    write_through!(inner);
}

/// The methods of `AsyncWrite` for a wrapper that writes through to its field `$field` as
/// it is (`except flush`: the wrapper has its own `poll_flush`).
macro_rules! write_through {
    ($field:tt) => {
        $crate::conn::io::write_through!($field, except flush);

        #[inline]
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$field).poll_flush(cx)
        }
    };
    ($field:tt, except flush) => {
        #[inline]
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
        }

        #[inline]
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
        }

        #[inline]
        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }

        #[inline]
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
        }
    };
}
pub(crate) use write_through;
