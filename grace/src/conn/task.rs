//! The task of one connection: serve it with hyper, and when the drain starts, close it the
//! way its state and protocol call for. Forcing is not done here: it acts on the socket
//! itself (see `Tracker::force_all`), so nothing in this task has to cooperate.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;

use super::body::{BodyLimit, RequestBody};
use super::http::{HttpConn, HyperBuilder};
use super::io::TrackedIo;
use super::record::Conn;
use super::request::ConnService;
use super::tracker::Tracker;
use super::{Addr, ConnState};
use crate::accept::{Acceptor, Socket};
use crate::base::budget::after;
use crate::base::report::Trigger;
use crate::handover::Kind;
#[cfg(unix)]
use crate::handover::Origin;
use crate::listener::Stream;

/// The error type of services and bodies grace serves: tower's (the one axum and hyper-util
/// name too).
pub(crate) use tower::BoxError;

/// What grace serves, named once: a cloneable tower service taking requests with a
/// [`RequestBody`], whose futures and errors hyper can carry across tasks.
pub(crate) trait HttpService<B>:
    tower::Service<
        Request<RequestBody>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: tower::Service<
            Request<RequestBody>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A stream a connection is served over (a socket, or what an acceptor made of it).
pub(crate) trait ConnIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}

impl<I> ConnIo for I where I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

/// A response body hyper can write from any task.
pub(crate) trait ResponseBody:
    Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> ResponseBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// What every connection task of a server needs.
pub(crate) struct ConnCtx<S> {
    pub(crate) service: S,
    /// Shared with connections still telling their protocol (see `HttpConn`).
    pub(crate) builder: Arc<HyperBuilder>,
    /// The registry; its `drain_asked` latch is the server's drain request (a restart gives
    /// silent connections a longer grace).
    pub(crate) tracker: Arc<Tracker>,
    /// How long a silent new connection may take to send its first byte at a drain.
    pub(crate) grace: Duration,
    /// The same after a restart handed the listeners on (see `serve`).
    pub(crate) restart_grace: Duration,
    pub(crate) body_limit: Option<BodyLimit>,
    /// What turns accepted sockets into the streams served (TLS), if anything.
    pub(crate) acceptor: Option<Arc<dyn Acceptor>>,
    /// How long the acceptor may take (a TLS handshake).
    pub(crate) handshake_timeout: Duration,
    /// Connections close gracefully at about this age (see `Limits::max_connection_age`).
    pub(crate) max_age: Option<Duration>,
    /// Requests carry the peer's address (see `Server::peer_addr_in_requests`).
    pub(crate) peer_in_requests: bool,
}

impl<S> ConnCtx<S> {
    /// How long a silent new connection may take to send its first byte once the drain has
    /// started (counted from accept, or from the end of its handshake).
    fn first_byte_grace(&self) -> Duration {
        // After a restart its client has no other process to go to (the new one cannot take
        // an accepted connection over): it gets as long as for its headers, as when serving.
        match self.tracker.drain_asked.get() {
            Some(Trigger::Restart) => self.restart_grace,
            _ => self.grace,
        }
    }
}

/// Spawns the task that serves one connection (through the acceptor, if any); on drain, it
/// asks the connection to close gracefully.
///
/// The task's future is in every connection's memory: a plain connection's and one through
/// the acceptor (with its handshake's state) are tasks of their own types, so a plain
/// connection's holds only what serving it needs, and no poll goes through a layer that
/// tells the two apart. The connection is registered here, as it is accepted, before its
/// task first runs.
pub(crate) fn spawn<S, B>(stream: Stream, peer: Addr, ctx: Arc<ConnCtx<S>>)
where
    S: HttpService<B>,
    B: ResponseBody,
{
    if ctx.acceptor.is_some() {
        tokio::spawn(serve_accepted(stream, peer, ctx));
        return;
    }
    let local = local_addr(&stream, &ctx);
    let io = TrackedIo::new(stream, peer, &ctx.tracker);
    let conn = Arc::clone(io.conn());
    let accepted_at = conn.info.accepted_at;
    tokio::spawn(serve_io(io, conn, accepted_at, local, None, None, ctx));
}

/// The connection's local address for its requests' [`ConnAddrs`](crate::ConnAddrs), if
/// they carry it (one `getsockname` per connection).
fn local_addr<S>(stream: &Stream, ctx: &ConnCtx<S>) -> Option<Addr> {
    if !ctx.peer_in_requests {
        return None;
    }
    match stream.local_addr() {
        Ok(local) => Some(local),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a connection's local address: its requests go without");
            None
        }
    }
}

/// Serves a connection handed over between two requests, with the bytes read from it but
/// not parsed (see `crate::handover`): HTTP/1, `Idle`, or one whose protocol is still to be
/// told, `New`; from the previous generation, or back from a hand-over of this process's
/// own that did not happen (see [`Origin`]). Unix only (see `crate::handover`).
#[cfg(unix)]
pub(crate) fn serve_handed<S, B>(
    stream: Stream,
    peer: Addr,
    kind: Kind,
    buffered: Bytes,
    origin: Origin,
    ctx: Arc<ConnCtx<S>>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let conn = ctx
        .tracker
        .register_handed(peer, &stream, kind, origin == Origin::Previous);
    if origin == Origin::Stays {
        // Never offered again: its task closes it at a drain.
        conn.set_closes_itself();
    }
    if !buffered.is_empty() {
        // They were read from the socket, as far as the connection's state goes: the next
        // request's head has begun.
        conn.on_read(&buffered);
    }
    let local = local_addr(&stream, &ctx);
    let io = TrackedIo::registered(stream, Arc::clone(&conn));
    let now = std::time::Instant::now();
    serve_io(io, conn, now, local, None, Some((kind, buffered)), ctx)
}

/// A connection through the acceptor (see [`spawn`]).
async fn serve_accepted<S, B>(stream: Stream, peer: Addr, ctx: Arc<ConnCtx<S>>)
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let Some(acceptor) = ctx.acceptor.clone() else {
        return;
    };
    let local = local_addr(&stream, &ctx);
    // Tracked from now on: `New` during the handshake, forced through the TCP socket.
    let conn = ctx.tracker.register(peer, &stream);
    conn.set_closes_itself();
    let registered = Registered(Some(Arc::clone(&conn)));
    // Scoped: the handshake's future (boxed) and its timer are freed once it is done.
    let accepted = {
        let accepting = tokio::time::timeout(
            ctx.handshake_timeout,
            acceptor.accept(Socket::new(stream, Arc::clone(&conn))),
        );
        tokio::pin!(accepting);
        tokio::select! {
            biased;
            accepted = accepting.as_mut() => accepted,
            _ = std::future::poll_fn(|cx| conn.poll_drain_started(cx)) => {
                // Draining: a handshake under way gets the first-byte grace (counted from
                // accept), like a silent plain connection; one that is not done by then closes.
                let until = after(conn.info.accepted_at, ctx.first_byte_grace());
                tokio::select! {
                    accepted = accepting.as_mut() => accepted,
                    _ = tokio::time::sleep_until(until.into()) => {
                        tracing::debug!(conn = conn.info.id, "handshake cut by the drain");
                        return;
                    }
                }
            }
        }
    };
    let accepted = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            tracing::debug!(conn = conn.info.id, peer = %conn.info.peer, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(conn = conn.info.id, peer = %conn.info.peer, "handshake timed out");
            return;
        }
    };
    let extra = (!accepted.extensions.is_empty()).then_some(accepted.extensions);
    let io = TrackedIo::registered(accepted.io, registered.take());
    serve_io(io, conn, std::time::Instant::now(), local, extra, None, ctx).await;
}

/// A connection registered before its acceptor ran: unregistered if the acceptor fails
/// (else its stream's `TrackedIo` does it).
struct Registered(Option<Arc<Conn>>);

impl Registered {
    fn take(mut self) -> Arc<Conn> {
        self.0.take().expect("taken once")
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            conn.tracker().unregister(&conn);
        }
    }
}

/// Serves HTTP over `io`, whose connection is `conn`, ready for its first request since
/// `ready_at` (accept, or the end of the handshake). `handed`: HTTP/1 handed over by the
/// previous generation, with the bytes that came with it.
///
/// Not an `async fn`: its arguments would stay in the task's future beside the connection
/// they were moved into (an `async fn` keeps its arguments for its whole life), about 100
/// bytes of every connection's memory. `drive` gets only what it keeps using.
fn serve_io<I, S, B>(
    io: TrackedIo<I>,
    conn: Arc<Conn>,
    ready_at: std::time::Instant,
    local: Option<Addr>,
    extra: Option<http::Extensions>,
    handed: Option<(Kind, Bytes)>,
    ctx: Arc<ConnCtx<S>>,
) -> impl Future<Output = ()> + Send + 'static
where
    I: ConnIo,
    S: HttpService<B>,
    B: ResponseBody,
{
    let service = ConnService {
        inner: super::request::Inner::new(ctx.service.clone()),
        conn: Arc::clone(&conn),
        body_limit: ctx.body_limit,
        extensions: super::request::per_request(
            ctx.peer_in_requests
                .then(|| crate::ConnAddrs::new(conn.info.peer.clone(), local)),
            extra,
        ),
    };
    let connection = match handed {
        None => HttpConn::new(io, service, Arc::clone(&ctx.builder)),
        Some((Kind::Http1, buffered)) => HttpConn::http1(io, buffered, service, &ctx.builder),
        // An upgraded connection is resumed by its kind's handler, never served here (see
        // `server::accepting`): as one whose protocol is still to be told, were it to come.
        Some((Kind::Unknown | Kind::Upgraded, read)) => {
            HttpConn::sniffing(io, &read, service, Arc::clone(&ctx.builder))
        }
    };
    drive(connection, conn, ready_at, ctx)
}

/// [`serve_io`]'s connection, from its first bytes to its end.
// Written out: an `async fn` would store the connection twice (see the body).
#[allow(clippy::manual_async_fn)]
fn drive<I, S, B>(
    mut connection: HttpConn<TrackedIo<I>, ConnService<S>>,
    conn: Arc<Conn>,
    ready_at: std::time::Instant,
    ctx: Arc<ConnCtx<S>>,
) -> impl Future<Output = ()> + Send + 'static
where
    I: ConnIo,
    S: HttpService<B>,
    B: ResponseBody,
{
    // An `async` block, not an `async fn`: the block uses what it captured in place, where
    // an `async fn` would move its arguments into locals of their own, the connection
    // (hundreds of bytes) stored twice.
    async move {
        let mut old = old_age(&conn, ctx.max_age);
        // Asked to close before the drain (the soft drain, or old age).
        let mut closing = false;
        loop {
            let mut registered = None;
            let draining =
                std::future::poll_fn(|cx| conn.poll_draining_cached(cx, &mut registered));
            tokio::pin!(draining);
            // The soft drain: once a drain is asked for (the pre-stop delay, the listener still
            // accepting), an HTTP/2 connection gets its GOAWAY at once, so its client opens its
            // next streams on another instance; HTTP/1 answers say `Connection: close`
            // (`request.rs`).
            let soft = super::h2::soft_drain(&conn, &ctx.tracker.drain_asked);
            tokio::pin!(soft);
            // Old enough: `Connection: close` on the next HTTP/1 response (an idle connection
            // closes now), GOAWAY on HTTP/2.
            let close_asked = std::future::poll_fn(|cx| match soft.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(()),
                Poll::Pending => old
                    .as_mut()
                    .map_or(Poll::Pending, |old| old.as_mut().poll(cx)),
            });
            tokio::select! {
                biased;
                result = &mut connection => return log_end(&conn, result),
                _ = draining.as_mut() => {}
                // Neither is polled again once it fired (`closing`); the drain may still come.
                _ = close_asked, if !closing => {
                    connection.graceful_shutdown();
                    closing = true;
                    tokio::select! {
                        biased;
                        result = &mut connection => return log_end(&conn, result),
                        _ = draining.as_mut() => {}
                    }
                }
            }
            // An upgrade: HTTP/1 connections go to the next generation at their next moment
            // between requests, until the hand-over window ends. (Not one already asked to
            // close: its client may have been told so.)
            let seen = ctx.tracker.wake_count();
            #[cfg(unix)]
            if let Some(outbox) = ctx.tracker.handing_over().filter(|_| !closing)
                && let Some(result) =
                    super::h1::hand_over(&mut connection, &conn, &outbox, &ctx.tracker).await
            {
                return log_end(&conn, result);
            }
            if conn.drain_started() {
                break;
            }
            // A hand-over this connection is not part of (HTTP/2, TLS, upgraded…), or that
            // ended without it: it goes on as it was until the hand-over is over, then waits
            // for the drain (or the next hand-over) again.
            tokio::select! {
                biased;
                result = &mut connection => return log_end(&conn, result),
                _ = std::future::poll_fn(|cx| conn.poll_hand_over_ended(cx, seen)) => {}
            }
        }
        // Boxed, with the connection moved in: run once per connection, at the drain; inline,
        // its timers would be in every connection's memory all its life.
        Box::pin(finish(connection, conn, ready_at, ctx)).await;
    }
}

/// A connection's end once the drain started: a silent one gets the first-byte grace, then
/// the close as its protocol does it (`h1`, `h2`).
async fn finish<I, S, B>(
    mut connection: HttpConn<TrackedIo<I>, ConnService<S>>,
    conn: Arc<Conn>,
    ready_at: std::time::Instant,
    ctx: Arc<ConnCtx<S>>,
) where
    I: ConnIo,
    S: HttpService<B>,
    B: ResponseBody,
{
    if conn.state() == ConnState::New {
        // Its request may be on the wire: give it until the grace after accept (after the
        // handshake, for TLS) to show up.
        let until = after(ready_at, ctx.first_byte_grace());
        tokio::select! {
            result = &mut connection => return log_end(&conn, result),
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = conn.left_new() => {}
        }
    }
    // The drain shut this one's socket itself (idle): nothing is left to do but unwind,
    // which waits until the stop is over (see `Tracker::park`).
    if conn.shut_by_drain() {
        ctx.tracker.stop_over().await;
    }
    // Idle (and still silent New) connections close now; HTTP/1 requests in flight finish
    // with `Connection: close`; HTTP/2 sends GOAWAY and lets open streams finish.
    connection.graceful_shutdown();
    let ended = match conn.is_http2() {
        true => super::h2::close(&mut connection, &conn).await,
        false => super::h1::close(&mut connection, &conn, ctx.first_byte_grace()).await,
    };
    if let Some(result) = ended {
        return log_end(&conn, result);
    }
    log_end(&conn, connection.await);
}

/// When a connection is old enough to close (see `Limits::max_connection_age`), if it ever
/// is. Boxed: a timer inline would be in every connection's memory, and most servers set no
/// maximum age.
fn old_age(conn: &Conn, max_age: Option<Duration>) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let age = max_age?;
    let at = after(conn.info.accepted_at, jittered(age, conn.info.id));
    Some(Box::pin(tokio::time::sleep_until(at.into())))
}

/// `age` spread between 0.9 and 1.1 times itself by the connection's id (a golden-ratio
/// sequence: connections opened together get ages far apart).
fn jittered(age: Duration, id: u64) -> Duration {
    let frac = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    // Saturating: an age too large for a `Duration` is "never".
    Duration::try_from_secs_f64(age.as_secs_f64() * (0.9 + 0.2 * frac)).unwrap_or(Duration::MAX)
}

fn log_end(conn: &Conn, result: Result<(), BoxError>) {
    // Not for a connection the drain closed or forced: its error is that (a closed socket is
    // no socket any more, see `SocketSlot::close_in_place`), and the report says so.
    if let Err(e) = result
        && !conn.shut_by_drain()
    {
        tracing::debug!(conn = conn.info.id, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_spread_within_ten_percent_and_saturate() {
        let age = Duration::from_secs(100);
        let ages: Vec<_> = (0..64).map(|id| jittered(age, id)).collect();
        assert!(
            ages.iter()
                .all(|a| *a >= age * 9 / 10 && *a <= age * 11 / 10)
        );
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(
            *max - *min > Duration::from_secs(15),
            "not spread: {min:?}..{max:?}"
        );
        // Never a panic, whatever the age.
        assert!((0..64).all(|id| jittered(Duration::MAX, id) > Duration::from_secs(1 << 62)));
    }

    /// The task's future is in every connection's memory. An `async fn` keeps its arguments
    /// for its whole life, beside the locals they are moved into: the task must stay within
    /// a bound of its connection's own size (figures in `docs/benchmarks.md`).
    #[tokio::test]
    async fn a_connection_task_does_not_hold_its_arguments_twice() {
        let ctx = Arc::new(ConnCtx {
            service: axum::Router::new(),
            builder: Arc::new(HyperBuilder::new()),
            tracker: Arc::new(Tracker::default()),
            grace: Duration::from_secs(1),
            restart_grace: Duration::from_secs(1),
            body_limit: None,
            acceptor: None,
            handshake_timeout: Duration::from_secs(1),
            max_age: None,
            peer_in_requests: false,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, peer) = listener.accept().await.unwrap();
        let io = TrackedIo::new(Stream::from_tcp(socket), Addr::Tcp(peer), &ctx.tracker);
        let conn = Arc::clone(io.conn());
        let now = std::time::Instant::now();
        let task = serve_io::<_, axum::Router, axum::body::Body>(
            io,
            conn,
            now,
            None,
            None,
            None,
            Arc::clone(&ctx),
        );
        let conn = std::mem::size_of::<HttpConn<TrackedIo<Stream>, ConnService<axum::Router>>>();
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= conn + 1_100,
            "the task's future is {size} bytes, its connection {conn}"
        );
        drop((task, client));
        assert_eq!(ctx.tracker.stats.len(), 0);
    }
}
