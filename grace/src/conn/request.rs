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
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::body::{BodyLimit, RequestBody};
use super::record::Conn;
use super::state::Event;
use super::task::BoxError;
use crate::base::conn::ConnAddrs;

/// hyper's service for one connection, around the user's tower service: it tracks each
/// request, and puts what is known of the connection into the request's extensions.
pub(crate) struct ConnService<S: tower::Service<Request<RequestBody>>> {
    // Behind a pointer: hyper's HTTP/1 connection must be `Unpin` to give its socket back
    // for a hand-over (see `http::HttpConn::take_for_handover`), whatever the user's service
    // is. Shared with the requests' futures, which give their slot back there.
    pub(crate) inner: Arc<Inner<S>>,
    pub(crate) conn: Arc<Conn>,
    pub(crate) body_limit: Option<BodyLimit>,
    /// What every request of the connection gets in its extensions (see [`per_request`]),
    /// if anything.
    pub(crate) extensions: Option<http::Extensions>,
}

/// A connection's service, and the box its futures run in, kept between requests (see
/// [`Slot`]): one allocation per connection for both.
pub(crate) struct Inner<S: tower::Service<Request<RequestBody>>> {
    service: S,
    spare: Spare<S::Future>,
}

impl<S: tower::Service<Request<RequestBody>>> Inner<S> {
    pub(crate) fn new(service: S) -> Arc<Self> {
        Arc::new(Inner {
            service,
            spare: Spare::new(),
        })
    }
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
        let guard = RequestGuard {
            conn: Arc::clone(&self.conn),
        };
        let (limit, conn) = (self.body_limit, &self.conn);
        let body = move |req: Request<Incoming>| {
            let (parts, body) = req.into_parts();
            Request::from_parts(parts, RequestBody::new(body, limit, recorded_at, conn))
        };
        let inner = &self.inner;
        let with = |state| ResponseFuture {
            state,
            guard: Some(guard),
            inner: Arc::clone(inner),
            http1,
            tunnel,
        };
        // Most services are always ready: call at once, and the future hyper keeps per
        // request is the service's own, not a `Oneshot` holding a copy of the request. One
        // that is not ready goes through `Oneshot`, which polls `poll_ready` again with the
        // task's waker. A panic is caught as in `poll`, answered with 500.
        let mut svc = S::clone(&self.inner.service);
        let noop = &mut Context::from_waker(Waker::noop());
        match catch_unwind(AssertUnwindSafe(|| svc.poll_ready(noop))) {
            Ok(Poll::Ready(Ok(()))) => {
                let mut slot = self.inner.spare.take();
                match catch_unwind(AssertUnwindSafe(|| slot.set(Some(svc.call(body(req)))))) {
                    Ok(()) => with(State::Called { slot }),
                    Err(_) => with(State::Panicked),
                }
            }
            Ok(Poll::Ready(Err(e))) => with(State::Failed { err: e.into() }),
            Ok(Poll::Pending) => with(State::Waiting {
                fut: Box::pin(svc.oneshot(body(req))),
            }),
            Err(_) => with(State::Panicked),
        }
    }
}

impl<S: tower::Service<Request<RequestBody>>> ConnService<S> {
    /// The connection's addresses (unless asked not to) and what the acceptor added: a copy
    /// of the map made for the connection, moved in whole when the request has none yet (it
    /// has one only for an upgrade or an HTTP/2 extended `CONNECT`).
    #[inline]
    fn insert_conn_info(&self, ext: &mut http::Extensions) {
        if let Some(extensions) = &self.extensions {
            ext.extend(extensions.clone());
        }
    }
}

/// What every request of a connection gets in its extensions, made once per connection: its
/// addresses, unless `addrs` is `None` (axum's `ConnectInfo<SocketAddr>` for a TCP peer,
/// with the crate feature `axum`, and [`ConnAddrs`]), then what the acceptor added (which
/// wins over the former if it brings the same type, as a PROXY protocol reader may).
///
/// Each request gets a clone of this map: a box for the map, one for its table, one per
/// value (`http::Extensions` boxes each), and no hashing, where inserting the values one by
/// one hashes each and builds the table as they come. The map's table is made with room
/// for seven values, so that the service's own (an axum `Router` adds `UrlParams`, and
/// `MatchedPath` with axum's default features) fit without the table growing again in
/// every request: the first table of a `HashMap` holds three.
pub(crate) fn per_request(
    addrs: Option<ConnAddrs>,
    extra: Option<http::Extensions>,
) -> Option<http::Extensions> {
    let mut ext = http::Extensions::new();
    if let Some(addrs) = addrs {
        #[cfg(feature = "axum")]
        if let super::Addr::Tcp(addr) = addrs.peer() {
            ext.insert(axum::extract::ConnectInfo(*addr));
        }
        ext.insert(addrs);
    }
    if let Some(extra) = extra {
        ext.extend(extra);
    }
    if ext.is_empty() {
        return None;
    }
    // Four markers more make the table grow to 8 buckets (room for 7); removed, they leave
    // it as it is. Zero-sized, they are boxed without an allocation.
    #[derive(Clone)]
    struct Room<const N: usize>;
    ext.insert(Room::<0>);
    ext.insert(Room::<1>);
    ext.insert(Room::<2>);
    ext.insert(Room::<3>);
    ext.remove::<Room<0>>();
    ext.remove::<Room<1>>();
    ext.remove::<Room<2>>();
    ext.remove::<Room<3>>();
    Some(ext)
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

/// A box a service's future runs in. A connection keeps one from a request to the next (its
/// [`Spare`]): the future is written once, into the heap, with no allocation per request
/// once the first is served, and what hyper moves per request is a pointer rather than the
/// future itself (measured in `docs/benchmarks.md`).
type Slot<F> = Pin<Box<Option<F>>>;

/// A connection's spare [`Slot`]: taken by a request, given back when its future is done.
/// HTTP/2 streams that overlap allocate their own; the spare keeps one. An `AtomicCell` of a
/// pointer: lock-free swaps, cheaper per request than a mutex's lock and unlock.
pub(crate) struct Spare<F>(crossbeam_utils::atomic::AtomicCell<Option<Slot<F>>>);

impl<F> Spare<F> {
    /// With its slot: allocated with the connection's other state rather than during its
    /// first request, between that request's own allocations, where it would keep their
    /// memory from being reused once they are freed.
    fn new() -> Self {
        let slot = Box::pin(None);
        Spare(crossbeam_utils::atomic::AtomicCell::new(Some(slot)))
    }

    #[inline]
    fn take(&self) -> Slot<F> {
        self.0.take().unwrap_or_else(|| Box::pin(None))
    }

    #[inline]
    fn put(&self, slot: Slot<F>) {
        // One kept: another (from a stream that overlapped) is freed.
        drop(self.0.swap(Some(slot)));
    }
}

enum State<S: tower::Service<Request<RequestBody>>> {
    // The service was ready and called.
    Called {
        slot: Slot<S::Future>,
    },
    // The service was not ready at once.
    Waiting {
        fut: Pin<Box<Oneshot<S, Request<RequestBody>>>>,
    },
    // Its `poll_ready` failed.
    Failed {
        err: BoxError,
    },
    // Its `poll_ready` or `call` panicked.
    Panicked,
    // The response was given.
    Done,
}

pub(crate) struct ResponseFuture<S: tower::Service<Request<RequestBody>>> {
    state: State<S>,
    guard: Option<RequestGuard>,
    // Where the slot goes back (see `Inner`).
    inner: Arc<Inner<S>>,
    http1: bool,
    // An extended CONNECT (see `ConnService::call`).
    tunnel: bool,
}

impl<S, B> Future for ResponseFuture<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = match &mut this.state {
            State::Called { slot } => {
                catch_unwind(AssertUnwindSafe(|| match slot.as_mut().as_pin_mut() {
                    Some(fut) => fut.poll(cx),
                    None => unreachable!("a called slot holds its future"),
                }))
            }
            State::Waiting { fut } => catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))),
            // No allocation: the payload is a zero-sized value.
            State::Panicked => Err(Box::new(()) as Box<dyn std::any::Any + Send>),
            State::Failed { .. } | State::Done => {
                let State::Failed { err } = std::mem::replace(&mut this.state, State::Done) else {
                    panic!("grace ResponseFuture polled after completion");
                };
                // The request is finished: its guard goes.
                this.guard.take();
                return Poll::Ready(Err(err));
            }
        };
        if let Ok(Poll::Pending) = polled {
            return Poll::Pending;
        }
        // Done: a future that ended is dropped where it is and its slot kept for the next
        // request; one that panicked goes with its slot.
        if let State::Called { mut slot } = std::mem::replace(&mut this.state, State::Done) {
            if polled.is_ok() {
                slot.set(None);
                this.inner.spare.put(slot);
            }
        }
        let Some(guard) = this.guard.take() else {
            panic!("grace ResponseFuture polled after completion");
        };
        // The response is changed in place and its body wrapped as it goes out: each step
        // apart would move its head once more.
        match polled {
            Ok(Poll::Ready(Ok(mut response))) => {
                let status = response.status();
                #[cfg(unix)]
                let handing_over = || guard.conn.tracker().handing_over().is_some();
                // No restarts on Windows, so no hand-over.
                #[cfg(not(unix))]
                let handing_over = || false;
                if status == StatusCode::SWITCHING_PROTOCOLS || (this.tunnel && status.is_success())
                {
                    guard.conn.apply(Event::Upgraded);
                } else if this.http1 && guard.conn.tracker().drain_asked.is_set() && !handing_over()
                {
                    // From the drain request on, pre-stop delay included (the soft drain):
                    // keep-alive clients move to other instances before the listener
                    // closes. Not while connections are handed to the next generation:
                    // this one goes there next.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Poll::Ready(Ok(response.map(|body| TrackedBody {
                    inner: Some(body),
                    guard: Some(guard),
                })))
            }
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(e.into())),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Ok(panicked(guard))),
        }
    }
}

/// The answer to a request whose handler panicked: `500`, and the connection closes.
#[cold]
fn panicked<B>(guard: RequestGuard) -> Response<TrackedBody<B>> {
    tracing::error!(
        conn = guard.conn.info.id,
        peer = %guard.conn.info.peer,
        "request handler panicked; answering 500 and closing the connection"
    );
    let mut response = Response::new(TrackedBody {
        inner: None,
        guard: Some(guard),
    });
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            this.guard.take();
            return Poll::Ready(None);
        };
        // Returned as it is, not taken apart and rebuilt: a frame is a hundred bytes.
        let polled = inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.guard.take();
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fut = std::future::Ready<u32>;

    fn addr(slot: &Slot<Fut>) -> *const Option<Fut> {
        &**slot
    }

    #[test]
    fn a_spare_slot_is_the_same_box_from_one_request_to_the_next() {
        let spare = Spare::<Fut>(crossbeam_utils::atomic::AtomicCell::new(None));
        let mut first = spare.take();
        // A mark that only the same box carries (a new box at a freed address would not).
        first.set(Some(std::future::ready(1)));
        let at = addr(&first);
        spare.put(first);
        let second = spare.take();
        assert!(second.is_some(), "the spare box was not reused");
        assert_eq!(addr(&second), at);
        // Taken: the next request (an overlapping HTTP/2 stream) gets a box of its own.
        let third = spare.take();
        assert_ne!(addr(&third), at);
    }

    /// A request's extensions: the connection's addresses, then what the acceptor added
    /// (winning over the same type), and nothing else; nothing at all when there is nothing.
    #[test]
    fn the_extensions_of_every_request() {
        use std::net::SocketAddr;

        use crate::base::conn::Addr;

        assert!(per_request(None, None).is_none());
        assert!(per_request(None, Some(http::Extensions::new())).is_none());
        let (peer, local): (SocketAddr, SocketAddr) = (
            "203.0.113.7:5000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        );
        let addrs = ConnAddrs::new(Addr::Tcp(peer), Some(Addr::Tcp(local)));
        let mut extra = http::Extensions::new();
        extra.insert("tls");
        let proxied: SocketAddr = "198.51.100.1:1234".parse().unwrap();
        extra.insert(axum::extract::ConnectInfo(proxied));
        let ext = per_request(Some(addrs.clone()), Some(extra)).unwrap();
        assert_eq!(ext.len(), 3);
        assert_eq!(ext.get::<ConnAddrs>(), Some(&addrs));
        assert_eq!(ext.get::<&str>(), Some(&"tls"));
        let axum::extract::ConnectInfo(connect_info) =
            ext.get::<axum::extract::ConnectInfo<SocketAddr>>().unwrap();
        assert_eq!(*connect_info, proxied, "the acceptor's value wins");

        let unix = ConnAddrs::new(Addr::Unix(None), None);
        let ext = per_request(Some(unix), None).unwrap();
        assert_eq!(ext.len(), 1, "no ConnectInfo<SocketAddr> for a Unix peer");
    }

    #[test]
    fn a_spare_keeps_one_slot_and_frees_the_others() {
        let spare = Spare::<Fut>(crossbeam_utils::atomic::AtomicCell::new(None));
        let (a, b) = (spare.take(), spare.take());
        let b_at = addr(&b);
        spare.put(a);
        spare.put(b);
        let kept = spare.take();
        assert_eq!(addr(&kept), b_at, "the slot given back last is kept");
        let fresh = spare.take();
        assert_ne!(addr(&fresh), b_at, "only one slot is kept");
    }
}
