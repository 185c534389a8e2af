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
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::body::{BodyLimit, RequestBody};
use super::state::Event;
use super::tracker::Conn;

/// hyper's service for one connection, around the user's tower service.
pub(crate) struct ConnService<S> {
    inner: S,
    conn: Arc<Conn>,
    body_limit: Option<BodyLimit>,
}

impl<S> ConnService<S> {
    pub(crate) fn new(inner: S, conn: Arc<Conn>, body_limit: Option<BodyLimit>) -> Self {
        ConnService {
            inner,
            conn,
            body_limit,
        }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.conn.request_started(&req);
        if req.headers().contains_key(header::UPGRADE) || req.method() == http::Method::CONNECT {
            req.extensions_mut().insert(self.conn.notice());
        }
        let http1 = req.version() < http::Version::HTTP_2;
        let limit = self.body_limit;
        let req = req.map(|body| RequestBody::new(body, limit));
        ResponseFuture {
            inner: self.inner.clone().oneshot(req),
            guard: Some(RequestGuard {
                conn: Arc::clone(&self.conn),
            }),
            http1,
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

pin_project_lite::pin_project! {
    pub(crate) struct ResponseFuture<S: tower::Service<Request<RequestBody>>> {
        #[pin]
        inner: Oneshot<S, Request<RequestBody>>,
        guard: Option<RequestGuard>,
        http1: bool,
    }
}

impl<S, B> Future for ResponseFuture<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
{
    type Output = Result<Response<TrackedBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let result = match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => Some(result),
            Err(_) => None,
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
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            guard.conn.apply(Event::Upgraded);
        } else if *this.http1 && guard.conn.tracker().is_draining() {
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
