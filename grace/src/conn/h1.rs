//! HTTP/1's close policy: at a drain, responses say `Connection: close` (see `request`) and
//! idle connections close at once (see `Tracker::close_idle`); a head still arriving gets the
//! first-byte grace; at an upgrade, a connection goes to the next generation at its next
//! moment between requests.

use std::future::Future;
#[cfg(unix)]
use std::pin::Pin;
#[cfg(unix)]
use std::task::Poll;
use std::time::Duration;

#[cfg(unix)]
use http::{Request, Response};

#[cfg(unix)]
use super::http::{HttpConn, Released};
#[cfg(unix)]
use super::io::TrackedIo;
use super::record::Conn;
#[cfg(unix)]
use super::record::HandOver;
use super::task::BoxError;
#[cfg(unix)]
use super::task::{ConnIo, ResponseBody};
#[cfg(unix)]
use super::tracker::Tracker;
#[cfg(unix)]
use crate::handover::{Handed, Origin};

/// At the drain, once hyper was told to shut down gracefully: a request head still arriving
/// (a slow or stalled client: hyper waits for a whole head before it can close) gets `grace`
/// to complete, then the socket is shut. A head that completes in time is served as any in
/// flight. `Some`: the connection ended meanwhile.
pub(super) async fn close<F>(
    connection: &mut F,
    conn: &Conn,
    grace: Duration,
) -> Option<Result<(), BoxError>>
where
    F: Future<Output = Result<(), BoxError>> + Unpin,
{
    if !conn.head_pending() {
        return None;
    }
    tokio::select! {
        result = connection => return Some(result),
        _ = tokio::time::sleep(grace) => {}
    }
    if conn.head_pending() {
        conn.close_now();
    }
    None
}

/// Hands an HTTP/1 connection to the next generation at its next moment between requests
/// (polling it meanwhile, so a request in flight finishes, with keep-alive), while the
/// hand-over window is open. `Some`: the connection is done here (handed over, given back to
/// this server as a fresh task, or it ended meanwhile); `None`: it is still ours as it was
/// (HTTP/2, TLS, upgraded, or the window ended first). Unix only (see `crate::handover`).
#[cfg(unix)]
pub(super) async fn hand_over<I, S, B>(
    connection: &mut HttpConn<TrackedIo<I>, S>,
    conn: &Conn,
    outbox: &crate::handover::outbox::Outbox,
    tracker: &Tracker,
) -> Option<Result<(), BoxError>>
where
    I: ConnIo,
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<B>> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: ResponseBody,
{
    if connection.is_http2() {
        return None;
    }
    match conn.hand_over() {
        HandOver::Now => {}
        HandOver::Never => return None,
        HandOver::Later => {
            // A state changes only while hyper is polled: check after each poll.
            let between = std::future::poll_fn(|cx| match Pin::new(&mut *connection).poll(cx) {
                Poll::Ready(result) => Poll::Ready(Some(Err(result))),
                Poll::Pending => match conn.hand_over() {
                    HandOver::Now => Poll::Ready(Some(Ok(()))),
                    HandOver::Never => Poll::Ready(None),
                    HandOver::Later => Poll::Pending,
                },
            });
            tokio::select! {
                biased;
                next = between => match next {
                    Some(Ok(())) => {}
                    Some(Err(ended)) => return Some(ended),
                    None => return None,
                },
                _ = outbox.closed() => return None,
            }
        }
    }
    // Under way from here: the hand-over is complete only once none is.
    let _sending = outbox.sending();
    let Released { io, kind, buffered } = connection.take_for_handover()?;
    // From here no shutdown from outside reaches the socket: the next generation shares it.
    let Some(socket) = conn.socket.take_lent(&io) else {
        return Some(Ok(())); // shut meanwhile (idle timeout): it closes, as it would have
    };
    let parts = [&buffered[0][..], &buffered[1][..]];
    match outbox.send(socket, kind, &parts).await {
        Ok(()) => tracing::trace!(conn = conn.info.id, ?kind, "sent to the next generation"),
        Err(e) => {
            // Still ours: served again here, from a copy of its socket, as a fresh task (the
            // window ended, or its buffered bytes are more than a hand-over carries).
            tracing::debug!(conn = conn.info.id, error = %e, "not handed over: served here");
            // More than a hand-over carries: it stays here for good.
            let origin = match e.kind() {
                std::io::ErrorKind::InvalidInput => Origin::Stays,
                _ => Origin::Back,
            };
            match Handed::copy_of(socket, kind, &parts, origin) {
                Ok(handed) => tracker.serve_local(handed),
                Err(e) => {
                    tracing::debug!(conn = conn.info.id, error = %e, "cannot keep it: closed")
                }
            }
        }
    }
    // Our copy of the socket closes (without a shutdown: the other copy stays open).
    drop(io);
    Some(Ok(()))
}
