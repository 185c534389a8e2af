//! The request body a service receives: hyper's body, with a guard against clients that send
//! their body too slowly (a dribbled body would otherwise hold its connection forever).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::BoxError;

use super::record::Conn;
use crate::base::budget::after;

/// How slowly a request body may arrive: within `initial` of the request's head, plus one
/// second for every `min_rate` bytes received (Apache's `mod_reqtimeout` rule, whose
/// defaults are 20 s and 500 bytes/s). A large upload at any reasonable speed is never cut;
/// a body dribbled a byte at a time is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BodyLimit {
    pub(crate) initial: Duration,
    pub(crate) min_rate: u64,
}

impl BodyLimit {
    pub(crate) const DEFAULT: BodyLimit = BodyLimit {
        initial: Duration::from_secs(20),
        min_rate: 500,
    };

    fn deadline(&self, started: Instant, received: u64) -> Instant {
        let earned = Duration::from_secs(received / self.min_rate.max(1));
        after(started, self.initial.saturating_add(earned))
    }
}

/// The body was not received in time (see [`Timeouts::request_body`](crate::Timeouts::request_body)).
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time ({received} bytes after {elapsed:?})")]
pub struct BodyTimeout {
    received: u64,
    elapsed: Duration,
}

impl BodyTimeout {
    /// The `BodyTimeout` behind `err`, if reading a body failed because of it: `err` itself
    /// or any error in its [`source`](std::error::Error::source) chain (as an extractor's
    /// rejection wraps it). A handler can then answer `408 Request Timeout` instead of its
    /// framework's 400.
    ///
    /// ```
    /// use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode};
    ///
    /// async fn upload(body: Result<Bytes, BytesRejection>) -> Result<String, (StatusCode, String)> {
    ///     let body = body.map_err(|e| match grace_http::BodyTimeout::find(&e) {
    ///         Some(timeout) => (StatusCode::REQUEST_TIMEOUT, timeout.to_string()),
    ///         None => (e.status(), e.body_text()),
    ///     })?;
    ///     Ok(format!("{} bytes", body.len()))
    /// }
    /// ```
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimeout> {
        std::iter::successors(Some(err), |e| e.source()).find_map(|e| e.downcast_ref())
    }

    /// How much of the body had arrived when it was cut, in bytes.
    pub fn received(&self) -> u64 {
        self.received
    }
}

pin_project_lite::pin_project! {
    /// The body of a request served by grace: hyper's [`Incoming`], cut with a
    /// [`BodyTimeout`] error when the client sends it too slowly. Any `axum::Router` takes
    /// it as it is.
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        // What a body that is not empty needs, behind one pointer: a request without a body
        // (most of them) carries 8 bytes more than hyper's own, and allocates nothing.
        state: Option<Box<BodyState>>,
    }
}

/// The timeout's state, and who to tell when the body has been read to its end.
struct BodyState {
    limit: Option<BodyLimit>,
    started: Instant,
    received: u64,
    // Made only when the body makes the reader wait (most bodies never do).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    // Told when the body has been read to its end (see `Conn::body_open`).
    open: Option<Arc<Conn>>,
}

impl BodyState {
    // Out of line: most requests have no body, and their path stays short.
    #[inline(never)]
    fn new(limit: Option<BodyLimit>, started: Option<Instant>, conn: &Arc<Conn>) -> Box<Self> {
        Box::new(BodyState {
            limit,
            started: started.unwrap_or_else(Instant::now),
            received: 0,
            timer: None,
            open: Some(Arc::clone(conn)),
        })
    }
}

impl RequestBody {
    /// The body of a request whose head was read at `started` (now, if not given); `conn`
    /// is told when it has been read to its end.
    #[inline(always)]
    pub(crate) fn new(
        inner: Incoming,
        limit: Option<BodyLimit>,
        started: Option<Instant>,
        conn: &Arc<Conn>,
    ) -> RequestBody {
        let state = match inner.is_end_stream() {
            true => None,
            false => Some(BodyState::new(limit, started, conn)),
        };
        RequestBody { inner, state }
    }

    /// Whether the body was read to its end (see `Conn::body_open`); a body that is empty
    /// from the start has nothing to tell.
    fn ended(state: &mut Option<Box<BodyState>>) {
        if let Some(conn) = state.as_mut().and_then(|s| s.open.take()) {
            conn.body_ended();
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let received = self.state.as_ref().map_or(0, |s| s.received);
        f.debug_struct("RequestBody")
            .field("received", &received)
            .finish_non_exhaustive()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(state)) = (frame.data_ref(), this.state.as_mut()) {
                    state.received += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    RequestBody::ended(this.state);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                RequestBody::ended(this.state);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(state) = this.state.as_mut() else {
                    return Poll::Pending;
                };
                let Some(limit) = state.limit else {
                    return Poll::Pending;
                };
                let deadline = limit.deadline(state.started, state.received);
                let timer = state
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                if timer.deadline() != deadline.into() {
                    timer.as_mut().reset(deadline.into());
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout {
                        received: state.received,
                        elapsed: state.started.elapsed(),
                    })))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_sees_a_body_timeout_anywhere_in_a_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapper(#[source] BoxError);
        let timeout = BodyTimeout {
            received: 7,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(
            BodyTimeout::find(&timeout).map(BodyTimeout::received),
            Some(7)
        );
        let wrapped = Wrapper(Box::new(Wrapper(Box::new(timeout))));
        assert_eq!(
            BodyTimeout::find(&wrapped).map(BodyTimeout::received),
            Some(7)
        );
        let other = Wrapper(Box::new(std::io::Error::other("reset")));
        assert!(BodyTimeout::find(&other).is_none());
    }

    #[test]
    fn the_deadline_grows_with_what_was_received_and_saturates() {
        let t = Instant::now();
        let l = BodyLimit::DEFAULT;
        assert_eq!(l.deadline(t, 0), t + Duration::from_secs(20));
        assert_eq!(l.deadline(t, 499), t + Duration::from_secs(20));
        assert_eq!(l.deadline(t, 5_000), t + Duration::from_secs(30));
        let absurd = BodyLimit {
            initial: Duration::MAX,
            min_rate: 0,
        };
        assert!(absurd.deadline(t, u64::MAX) > t);
    }
}
