//! HTTP/1 as a test sees it on the wire: the one response reader of the workspace's tests
//! ([`read_head`], [`read_body`], [`read_chunk`], [`read_response`], and
//! [`read_response_blocking`] for blocking streams, through the same code) and a raw client
//! connection, [`Client`], that writes exactly the bytes a test gives it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadBuf,
};
use tokio::net::TcpStream;

use crate::SOON;

/// One HTTP/1 response: the status, the headers (names as the server sent them) and the
/// body (decoded as UTF-8, lossily).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The server closes the connection after this response (`Connection: close`).
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// The body's declared length (`Content-Length`), an error without one.
    pub fn content_length(&self) -> io::Result<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no content-length"))
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// How the body after this head is delimited (RFC 9112, section 6.3).
    fn framing(&self) -> io::Result<Framing> {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        Ok(match self.status {
            100..=199 | 204 | 304 => Framing::Empty,
            _ if chunked => Framing::Chunked,
            _ if self.header("content-length").is_some() => {
                Framing::Length(self.content_length().map_err(invalid)?)
            }
            _ => Framing::UntilClose,
        })
    }
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Parses a response head (the status line and the headers, up to a blank line or the end
/// of `head`): what the readers below call once they have read the head, and what a test
/// that read one itself can call. Header lines without a colon are left out.
pub fn parse_head(head: &str) -> io::Result<Response> {
    let mut lines = head.lines();
    let line = lines.next().unwrap_or_default();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let headers = lines
        .map(str::trim_end)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: String::new(),
    })
}

/// Reads a response's status line and headers, up to the blank line; its body is left to
/// read (it may still be streaming). The end of the stream before the blank line is
/// `UnexpectedEof`.
pub async fn read_head<R: AsyncBufRead + Unpin>(io: &mut R) -> io::Result<Response> {
    let mut head = String::new();
    loop {
        let before = head.len();
        if io.read_line(&mut head).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head[before..].trim_end().is_empty() {
            return parse_head(&head);
        }
    }
}

/// Reads the body that follows `resp`'s head into `resp.body`: nothing for 1xx, 204 and
/// 304, else by chunks (`Transfer-Encoding: chunked`), by `Content-Length`, or up to the end
/// of the connection.
pub async fn read_body<R: AsyncBufRead + Unpin>(io: &mut R, resp: &mut Response) -> io::Result<()> {
    let mut body = Vec::new();
    match resp.framing()? {
        Framing::Empty => {}
        Framing::Length(n) => {
            body.resize(n, 0);
            io.read_exact(&mut body).await?;
        }
        Framing::Chunked => {
            while let Some(chunk) = read_chunk(io).await? {
                body.extend_from_slice(&chunk);
            }
        }
        Framing::UntilClose => {
            io.read_to_end(&mut body).await?;
        }
    }
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(())
}

/// Reads the next chunk of a chunked body: its data, or `None` once the last chunk (and any
/// trailers) has been read. For a test that follows a stream chunk by chunk.
pub async fn read_chunk<R: AsyncBufRead + Unpin>(io: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if io.read_line(&mut line).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let size = line.split(';').next().unwrap_or_default().trim();
    let size = usize::from_str_radix(size, 16)
        .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
    if size == 0 {
        // Trailers, if any, up to the blank line.
        loop {
            line.clear();
            if io.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if line.trim_end().is_empty() {
                return Ok(None);
            }
        }
    }
    let mut chunk = vec![0; size + 2];
    io.read_exact(&mut chunk).await?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

/// Reads one whole response: [`read_head`], then [`read_body`]. An error means the
/// connection ended (or broke, or spoke something else) before a whole response came.
pub async fn read_response<R: AsyncBufRead + Unpin>(io: &mut R) -> io::Result<Response> {
    let mut resp = read_head(io).await?;
    read_body(io, &mut resp).await?;
    Ok(resp)
}

/// [`read_response`] over a blocking stream (a `std::io::BufReader` around a socket, with
/// its read timeout): the same reader, polled once over a stream that never has it wait.
pub fn read_response_blocking<R: io::BufRead>(io: &mut R) -> io::Result<Response> {
    let mut io = Blocking(io);
    let read = pin!(read_response(&mut io));
    match read.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => unreachable!("a blocking stream is always ready"),
    }
}

/// A blocking reader as an async one whose every poll is ready (it blocks instead).
struct Blocking<'a, R>(&'a mut R);

impl<R: io::BufRead> AsyncRead for Blocking<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let reader = &mut *self.get_mut().0;
        loop {
            match reader.read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<R: io::BufRead> AsyncBufRead for Blocking<'_, R> {
    fn poll_fill_buf(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Poll::Ready(self.get_mut().0.fill_buf())
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().0.consume(amt);
    }
}

/// A raw HTTP/1.1 client connection over TCP or any other stream (TLS, a Unix socket): it
/// writes exactly what a test gives it and reads responses with [`read_response`]. `io` is
/// the stream itself, for what a test does beyond that.
pub struct Client<S = TcpStream> {
    pub io: BufReader<S>,
}

impl Client {
    /// A connection to `addr` (panics if there is none).
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).await.unwrap())
    }

    /// A connection to `addr` with `TCP_NODELAY` (every write goes out at once), or the
    /// error.
    pub async fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client::over(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn over(stream: S) -> Client<S> {
        Client {
            io: BufReader::new(stream),
        }
    }

    /// Sends `GET path` (`Host: localhost`, nothing else); panics if it cannot.
    pub async fn send(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.write(req.as_bytes()).await;
    }

    /// Writes `bytes` as they are; panics if it cannot.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.try_write(bytes).await.unwrap();
    }

    /// Writes `bytes` as they are, and flushes them.
    pub async fn try_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let io = self.io.get_mut();
        io.write_all(bytes).await?;
        io.flush().await
    }

    /// Reads one response; `None` if the connection ended (or broke) before a whole one.
    pub async fn read(&mut self) -> Option<Response> {
        self.read_response().await.ok()
    }

    /// Reads one response, or says why there was no whole one.
    pub async fn read_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.io).await
    }

    /// Reads a response's head only (see [`read_head`]).
    pub async fn read_head(&mut self) -> io::Result<Response> {
        read_head(&mut self.io).await
    }

    /// [`send`](Self::send), then [`read`](Self::read).
    pub async fn get(&mut self, path: &str) -> Option<Response> {
        self.send(path).await;
        self.read().await
    }

    /// True once the server has closed the connection (EOF or reset), within [`SOON`].
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(SOON, self.io.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8]) -> Vec<io::Result<Response>> {
        let mut io = bytes;
        let mut out = Vec::new();
        while !io.is_empty() {
            out.push(read_response(&mut io).await);
        }
        out
    }

    #[tokio::test]
    async fn bodies_by_length_by_chunks_none_and_up_to_the_end() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Case: Kept\r\n\r\nhello\
            HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n\
            HTTP/1.1 204 No Content\r\n\r\n\
            HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n\
            HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\n\r\nthe rest";
        let got: Vec<Response> = read_all(wire)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let seen: Vec<(u16, &str)> = got.iter().map(|r| (r.status, r.body.as_str())).collect();
        assert_eq!(
            seen,
            [
                (200, "hello"),
                (200, "abcde"),
                (204, ""),
                (101, ""),
                (200, "the rest")
            ]
        );
        assert_eq!(got[0].headers[1], ("X-Case".into(), "Kept".into()));
        assert_eq!(got[0].header("x-case"), Some("Kept"));
        assert!(!got[0].closes() && got[4].closes());
    }

    #[tokio::test]
    async fn a_cut_response_is_an_error() {
        for wire in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Len",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        ] {
            let mut io = wire;
            assert!(read_response(&mut io).await.is_err(), "{wire:?}");
        }
    }

    #[tokio::test]
    async fn chunk_by_chunk() {
        let mut io = &b"4\r\nab\r\n\r\n0\r\n\r\n"[..];
        assert_eq!(read_chunk(&mut io).await.unwrap(), Some(b"ab\r\n".to_vec()));
        assert_eq!(read_chunk(&mut io).await.unwrap(), None);
        assert!(read_chunk(&mut io).await.is_err());
    }

    #[test]
    fn the_blocking_reader_is_the_same_reader() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n\
            HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        let mut io = std::io::BufReader::with_capacity(3, &wire[..]);
        let first = read_response_blocking(&mut io).unwrap();
        let second = read_response_blocking(&mut io).unwrap();
        assert_eq!((first.status, first.body.as_str()), (200, "ok"));
        assert_eq!((second.status, second.body.as_str()), (503, "busy"));
        assert_eq!(
            read_response_blocking(&mut io).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
