//! A stream that shows every read to a closure and passes writes through as they are: the
//! one stream wrapper of grace-check (its HTTP/2 frame tap) and of its test server (which
//! notes a connection's first byte). Both binaries include this file.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `on_read` called on every completed read: its result and the bytes it
/// brought (none at the end of the stream or on an error).
pub struct ReadTap<S, F> {
    inner: S,
    on_read: F,
}

impl<S, F> ReadTap<S, F> {
    pub fn new(inner: S, on_read: F) -> Self {
        ReadTap { inner, on_read }
    }
}

impl<S, F> AsyncRead for ReadTap<S, F>
where
    S: AsyncRead + Unpin,
    F: FnMut(&io::Result<()>, &[u8]) + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(res) = &r {
            (this.on_read)(res, &buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for ReadTap<S, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
