//! Per-request wrappers: the service hyper calls and the body it writes.
//!
//! A request makes its connection `Active`; when the response body has been written (the
//! body ends or is dropped) the connection becomes `Idle` again. A `101 Switching Protocols`
//! response makes it `Hijacked`. While a drain runs, HTTP/1 responses carry
//! `Connection: close`. A handler that panics is answered with `500` and its connection
//! closes; the counts stay right because the guard below is dropped either way.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::body::{BodyLimit, RequestBody};
use super::state::Event;
use super::task::BoxError;
use super::tracker::Conn;

/// hyper's service for one connection, around the user's tower service: it tracks each
/// request, and puts what is known of the connection into the request's extensions.
pub(crate) struct ConnService<S> {
    // Boxed: hyper's HTTP/1 connection must be `Unpin` to give its socket back for a
    // hand-over (see `http::HttpConn::take_for_handover`), whatever the user's service is.
    pub(crate) inner: Box<S>,
    pub(crate) conn: Arc<Conn>,
    pub(crate) body_limit: Option<BodyLimit>,
    /// Whether to insert the peer's address (see `Server::peer_addr_in_requests`).
    pub(crate) peer: bool,
    /// What an acceptor added (see [`Accepted::with_extension`](crate::accept::Accepted::with_extension)), if anything.
    pub(crate) extra: Option<Arc<http::Extensions>>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    // Boxed here rather than by hyper, which boxes it anyway.
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    #[inline]
    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // The clock is read for the request's record if it is kept; a body reads it
        // otherwise for its deadline (one read per request at most).
        let recorded_at = self.conn.tracker().records().then(Instant::now);
        self.conn.request_started(&req, recorded_at);
        if may_upgrade(&req) {
            req.extensions_mut().insert(self.conn.notice());
        }
        // RFC 8441's extended CONNECT (a WebSocket over an HTTP/2 stream): a success makes
        // the connection `Hijacked`, as `101 Switching Protocols` does on HTTP/1.
        let tunnel = req.method() == http::Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some();
        self.insert_conn_info(req.extensions_mut());
        let http1 = req.version() < http::Version::HTTP_2;
        let limit = self.body_limit;
        let req = req.map(|body| RequestBody::new(body, limit, recorded_at, &self.conn));
        let mut guard = Some(RequestGuard {
            conn: Arc::clone(&self.conn),
        });
        // Most services are always ready: call at once, and the future hyper keeps per
        // request is the service's own, not a `Oneshot` holding a copy of the request. One
        // that is not ready goes through `Oneshot`, which polls `poll_ready` again with the
        // task's waker. A panic is caught as in `poll`, answered with 500.
        let mut svc = S::clone(&self.inner);
        let noop = &mut Context::from_waker(Waker::noop());
        let ready = catch_unwind(AssertUnwindSafe(|| svc.poll_ready(noop)));
        let mut with = |state| ResponseFuture {
            state,
            guard: guard.take(),
            http1,
            tunnel,
        };
        match ready {
            // The service's future (often hundreds of bytes) is written into `called`, and
            // moved from there into the response future: returned through `catch_unwind`'s
            // result it would be moved twice more (about 55 instructions per request on an
            // axum `Router`). The guard is taken only once the call returned: after a panic
            // it is still there for the 500.
            Ok(Poll::Ready(Ok(()))) => {
                let mut called = None;
                let _ = catch_unwind(AssertUnwindSafe(|| called = Some(svc.call(req))));
                match called {
                    Some(fut) => with(State::Called { fut }),
                    // `call` panicked.
                    None => with(State::Panicked),
                }
            }
            Ok(Poll::Ready(Err(e))) => with(State::Failed {
                err: Some(e.into()),
            }),
            Ok(Poll::Pending) => with(State::Waiting {
                fut: Box::pin(svc.oneshot(req)),
            }),
            Err(_) => with(State::Panicked),
        }
    }
}

impl<S> ConnService<S> {
    /// The peer's address (if asked for) and what the acceptor added.
    #[inline]
    fn insert_conn_info(&self, ext: &mut http::Extensions) {
        if self.peer {
            let peer = &self.conn.info.peer;
            #[cfg(feature = "axum")]
            if let super::Addr::Tcp(addr) = peer {
                ext.insert(axum::extract::ConnectInfo(*addr));
            }
            ext.insert(crate::PeerAddr(peer.clone()));
        }
        if let Some(extra) = &self.extra {
            ext.extend((**extra).clone());
        }
    }
}

/// Marks its request finished when dropped.
struct RequestGuard {
    conn: Arc<Conn>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.request_finished();
    }
}

/// Whether a request may take its connection over (an upgrade or `CONNECT`): such a request
/// gets a [`ShutdownNotice`](crate::ShutdownNotice). On HTTP/1.1 hyper attaches an
/// `OnUpgrade` to every request with an `Upgrade` header, so a request without extensions
/// has none and its headers need not be searched; on HTTP/2 an `Upgrade` header makes the
/// request malformed (h2 resets its stream before it reaches a service).
#[inline]
fn may_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == http::Method::CONNECT {
        return true;
    }
    match req.version() {
        http::Version::HTTP_2 => return false,
        http::Version::HTTP_11 if req.extensions().is_empty() => return false,
        _ => {}
    }
    req.headers().contains_key(header::UPGRADE)
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S: tower::Service<Request<RequestBody>>> {
        // The service was ready and called.
        Called { #[pin] fut: S::Future },
        // The service was not ready at once.
        Waiting { fut: Pin<Box<Oneshot<S, Request<RequestBody>>>> },
        // Its `poll_ready` failed.
        Failed { err: Option<BoxError> },
        // Its `poll_ready` or `call` panicked.
        Panicked,
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct ResponseFuture<S: tower::Service<Request<RequestBody>>> {
        #[pin]
        state: State<S>,
        guard: Option<RequestGuard>,
        http1: bool,
        // An extended CONNECT (see `ConnService::call`).
        tunnel: bool,
    }
}

impl<S, B> Future for ResponseFuture<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.state.project() {
            StateProj::Called { fut } => match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(result)) => Some(result.map_err(Into::into)),
                Err(_) => None,
            },
            StateProj::Waiting { fut } => {
                match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(result)) => Some(result.map_err(Into::into)),
                    Err(_) => None,
                }
            }
            StateProj::Failed { err } => match err.take() {
                Some(e) => Some(Err(e)),
                None => panic!("grace ResponseFuture polled after completion"),
            },
            StateProj::Panicked => None,
        };
        let Some(guard) = this.guard.take() else {
            panic!("grace ResponseFuture polled after completion");
        };
        let (mut parts, body) = match result {
            Some(Ok(response)) => {
                let (parts, body) = response.into_parts();
                (parts, Some(body))
            }
            Some(Err(e)) => return Poll::Ready(Err(e)),
            None => {
                tracing::error!(
                    conn = guard.conn.info.id,
                    peer = %guard.conn.info.peer,
                    "request handler panicked; answering 500 and closing the connection"
                );
                let mut parts = Response::new(()).into_parts().0;
                parts.status = StatusCode::INTERNAL_SERVER_ERROR;
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                (parts, None)
            }
        };
        if parts.status == StatusCode::SWITCHING_PROTOCOLS
            || (*this.tunnel && parts.status.is_success())
        {
            guard.conn.apply(Event::Upgraded);
        } else if *this.http1
            && guard.conn.tracker().drain_asked.is_set()
            && guard.conn.tracker().handing_over().is_none()
        {
            // From the drain request on, pre-stop delay included (the soft drain): keep-alive
            // clients move to other instances before the listener closes. Not while
            // connections are handed to the next generation: this one goes there next.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(Response::from_parts(
            parts,
            TrackedBody {
                inner: body,
                guard: Some(guard),
            },
        )))
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks its request finished when it ends or is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: Option<B>,
        guard: Option<RequestGuard>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            this.guard.take();
            return Poll::Ready(None);
        };
        let frame = ready!(inner.poll_frame(cx));
        if frame.is_none() {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}
