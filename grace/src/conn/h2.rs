//! HTTP/2's close policy: GOAWAY as soon as a drain is asked for (the soft drain: the client
//! opens its next streams elsewhere while this instance still serves); at the drain, hyper's
//! graceful shutdown (GOAWAY with the last stream id 2^31-1, a PING, then GOAWAY with the
//! real last stream id once the PING is answered), open streams finish, and a peer that
//! never answers does not hold the drain.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use super::record::Conn;
use super::task::BoxError;
use crate::base::latch::Latch;
use crate::base::report::Trigger;

/// How long a draining HTTP/2 connection with no open stream waits for the peer to answer
/// the drain's PING (which tells which streams it opened meanwhile) before it is closed
/// anyway, as Go's HTTP/2 server waits one second after its GOAWAY.
const GOAWAY_ACK_WAIT: Duration = Duration::from_secs(1);

/// Resolves when an HTTP/2 connection is to get its GOAWAY before the drain: once a drain is
/// asked for. Never for HTTP/1 (its responses say `Connection: close` instead).
// An `async` block, not an `async fn`: it uses its captures in place (an `async fn` would
// keep its arguments beside the locals they are moved into, in every connection's memory).
#[allow(clippy::manual_async_fn)]
pub(super) fn soft_drain<'a>(
    conn: &'a Conn,
    drain: &'a Latch<Trigger>,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        conn.left_new().await; // the first bytes tell HTTP/2 apart
        if !conn.is_http2() {
            return std::future::pending().await;
        }
        drain.wait().await;
    }
}

/// At the drain, once hyper was told to shut down gracefully (GOAWAY and PING are out): a
/// peer that answers lets hyper finish at once. One that does not (gone, or behind a dropped
/// NAT entry) must not hold the drain: past a round trip's worth of waiting, the connection
/// closes once it has no open stream. `Some`: the connection ended meanwhile.
pub(super) async fn close<F>(connection: &mut F, conn: &Conn) -> Option<Result<(), BoxError>>
where
    F: Future<Output = Result<(), BoxError>> + Unpin,
{
    tokio::select! {
        result = &mut *connection => return Some(result),
        _ = tokio::time::sleep(GOAWAY_ACK_WAIT) => {}
    }
    // Biased: the connection is polled first on every wake-up, so the frames of a stream
    // that just ended are written to the socket before it is shut.
    tokio::select! {
        biased;
        result = &mut *connection => return Some(result),
        _ = std::future::poll_fn(|cx| conn.poll_idle(cx)) => {}
    }
    if let Poll::Ready(result) = poll_once(&mut *connection).await {
        return Some(result);
    }
    conn.close_now();
    None
}

/// Polls `fut` once, to let it write what it has ready.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}
