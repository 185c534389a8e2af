//! [`Movable`]: an upgraded connection (a WebSocket, or any protocol a handler speaks after
//! `101 Switching Protocols`) that can move to the next generation at an upgrade, with the
//! bytes read from it but not processed and a state of its handler's own; [`Mover`], which
//! tells its handler when to move it; and the handlers that resume such connections in
//! the new generation (registered with [`Restart::resume`](crate::Restart::resume)).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frames::{self, Frames};
use super::io::{Rewind, TrackedIo};
use super::record::Conn;
use super::tracker::Tracker;
use super::turns::{IN_FLIGHT, Turns};
use crate::error::MoveError;
use crate::handover::outbox::Outbox;
use crate::handover::{MAX_NAME, MAX_STATE, Upgraded};
use crate::listener::Stream;

/// How many bytes a read from the socket asks for while a frame header is awaited.
const READ_CHUNK: usize = 4096;

/// An upgraded connection that can move to the next generation at an upgrade — the first
/// server library where a WebSocket outlives the process that accepted it, and the client
/// never knows.
///
/// Made from hyper's [`Upgraded`](hyper::upgrade::Upgraded) by a handler that opts in
/// ([`websocket`](Self::websocket) or [`raw`](Self::raw)), it reads and writes like the
/// connection itself. At an upgrade whose new generation resumes connections of its kind
/// ([`Restart::resume`](crate::Restart::resume)), the connection's [`Mover`] resolves once
/// the reading has stopped between two messages; the handler then finishes what it was
/// writing and calls [`hand_over`](Self::hand_over) with a state of its own. The socket,
/// the bytes read from it but not given to the handler, and that state go to the new
/// generation, where the handler registered for the kind resumes the connection.
///
/// **Exactly once.** What a client sends meanwhile is read by one generation only: the old
/// one stops reading at a message boundary, and the new one reads from there (the bytes
/// the old one had read past that boundary travel with the socket). A new generation that
/// dies before it read from the socket gives it back: the old generation resumes it itself
/// with its own handler for the kind.
///
/// **What does not move**, and is said goodbye to at the drain as before (see
/// [`ShutdownNotice`](crate::ShutdownNotice)): a connection through TLS (its session keys
/// are in rustls' memory: moving it would take exporting the session's secrets and
/// sequence numbers, which rustls does only for kTLS); a WebSocket over HTTP/2 (RFC 8441:
/// a stream inside a connection that stays); a handler that did not opt in; one whose kind
/// the new generation does not resume, or that does not reach a message boundary within
/// the hand-over window; and anything on macOS, which has no `SOCK_SEQPACKET` channel.
///
/// ```no_run
/// use futures_util::{SinkExt, StreamExt};
/// use grace_http::Movable;
/// use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};
///
/// /// Echoes, counting messages; moves at an upgrade with its count.
/// async fn counter(socket: Movable, mut count: u64) {
///     let mover = socket.mover();
///     let mut ws = WebSocketStream::from_raw_socket(socket, Role::Server, None).await;
///     loop {
///         tokio::select! {
///             msg = ws.next() => match msg {
///                 Some(Ok(m)) if m.is_text() => {
///                     count += 1;
///                     let reply = format!("{count} {}", m.to_text().unwrap_or(""));
///                     if ws.send(reply.into()).await.is_err() { return }
///                 }
///                 Some(Ok(_)) => {}
///                 _ => return,
///             },
///             () = mover.asked() => {
///                 // Anything queued (a pong) goes out whole before the socket moves.
///                 if ws.flush().await.is_err() { return }
///                 match ws.get_mut().hand_over(&count.to_le_bytes()).await {
///                     Ok(()) => return, // the next generation has it
///                     Err(e) => tracing::debug!(error = %e, "stays here"),
///                 }
///             }
///         }
///     }
/// }
///
/// # async fn doc(upgraded: hyper::upgrade::Upgraded) {
/// // In the handler, after `101 Switching Protocols` (as the demo's `ws.rs` does):
/// match Movable::websocket(upgraded, "counter") {
///     Ok(socket) => counter(socket, 0).await,
///     Err(_upgraded) => { /* TLS, HTTP/2, macOS: serve it as it is */ }
/// }
/// // And in every generation, before serving:
/// let restart = grace_http::Restart::new().resume("counter", |socket, state| async move {
///     let count = state[..].try_into().map_or(0, u64::from_le_bytes);
///     counter(socket, count).await
/// });
/// # let _ = restart; }
/// ```
pub struct Movable {
    /// `None` once handed over.
    io: Option<TrackedIo<Stream>>,
    /// Read from the socket and not given to the reader yet, in order.
    unread: BytesMut,
    /// Where the client's messages end, for a WebSocket.
    frames: Option<Frames>,
    shared: Arc<Shared>,
}

/// Tells an upgraded connection's handler when to move it (see [`Movable`]).
#[derive(Clone)]
pub struct Mover {
    shared: Arc<Shared>,
}

/// What a [`Movable`] and its [`Mover`] share (and the tracker, to wake them).
pub(crate) struct Shared {
    conn: Arc<Conn>,
    name: Arc<str>,
    /// Everything given to the reader makes whole messages (always, without frames).
    at_boundary: AtomicBool,
    /// Its turn in the hand-over under way came (see `conn::turns`): until it
    /// does, it is read and served here as usual.
    granted: AtomicBool,
    /// The reader, stopped at a boundary for a hand-over: woken when it ends.
    reader: atomic_waker::AtomicWaker,
    /// The mover's task: woken when a hand-over starts and when the reader stops.
    mover: atomic_waker::AtomicWaker,
}

impl Shared {
    /// The hand-over's channel, if one is under way that takes this connection now (its
    /// turn came).
    fn wanted(&self) -> Option<Arc<Outbox>> {
        // Acquire: pairs with the Release of the grant, made after the outbox was installed.
        if !self.granted.load(Ordering::Acquire) {
            return None;
        }
        let outbox = self.conn.tracker().handing_over()?;
        outbox
            .takes(&self.name, self.conn.info.id)
            .then_some(outbox)
    }

    /// Wakes the reader and the mover (a hand-over started or ended).
    pub(crate) fn wake(&self) {
        self.reader.wake();
        self.mover.wake();
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn id(&self) -> u64 {
        self.conn.info.id
    }
}

/// The type hyper's `Upgraded` holds for a connection grace served without an acceptor.
type Served = TokioIo<Rewind<TrackedIo<Stream>>>;

impl Movable {
    /// A WebSocket (after the handshake's `101`) that moves as `name`: the reads stop only
    /// between two of the client's messages (RFC 6455 frames), so a message the client was
    /// sending when the hand-over started is read whole here, or not at all.
    ///
    /// Gives the connection back if it cannot move: served through TLS (or another
    /// [`Acceptor`](crate::accept::Acceptor)), over HTTP/2, not served by grace, on macOS,
    /// or `name` empty, longer than 255 bytes or with a line feed (see the type's docs).
    pub fn websocket(
        upgraded: hyper::upgrade::Upgraded,
        name: &str,
    ) -> Result<Movable, hyper::upgrade::Upgraded> {
        Movable::from_upgraded(upgraded, name, true)
    }

    /// Any other protocol after an upgrade, moving as `name`: its handler reads raw bytes,
    /// and calls [`hand_over`](Self::hand_over) only between two of its messages (what it
    /// has read and not processed goes in its state). As [`websocket`](Self::websocket)
    /// otherwise.
    pub fn raw(
        upgraded: hyper::upgrade::Upgraded,
        name: &str,
    ) -> Result<Movable, hyper::upgrade::Upgraded> {
        Movable::from_upgraded(upgraded, name, false)
    }

    fn from_upgraded(
        upgraded: hyper::upgrade::Upgraded,
        name: &str,
        websocket: bool,
    ) -> Result<Movable, hyper::upgrade::Upgraded> {
        if !crate::handover::SUPPORTED || !valid_name(name) {
            return Err(upgraded);
        }
        let parts = upgraded.downcast::<Served>()?;
        let (io, rest) = parts.io.into_inner().into_parts();
        let mut unread = BytesMut::from(&parts.read_buf[..]);
        unread.extend_from_slice(&rest);
        Ok(Movable::new(io, unread, name, websocket))
    }

    fn new(io: TrackedIo<Stream>, unread: BytesMut, name: &str, websocket: bool) -> Movable {
        let conn = Arc::clone(io.conn());
        let shared = Arc::new(Shared {
            conn,
            name: Arc::from(name),
            at_boundary: AtomicBool::new(true),
            granted: AtomicBool::new(false),
            reader: Default::default(),
            mover: Default::default(),
        });
        shared.conn.tracker().add_movable(&shared);
        Movable {
            io: Some(io),
            unread,
            frames: websocket.then(Frames::default),
            shared,
        }
    }

    /// A connection handed over by the previous generation (or back from our own upgrade),
    /// `io` registered already; with its state.
    pub(crate) fn resumed(
        io: TrackedIo<Stream>,
        upgraded: Upgraded,
        buffered: Bytes,
    ) -> (Movable, Bytes) {
        let unread = BytesMut::from(&buffered[..]);
        let movable = Movable::new(io, unread, &upgraded.name, upgraded.websocket);
        (movable, upgraded.state)
    }

    /// What tells this connection's handler when to move it. Await [`Mover::asked`] beside
    /// the reads, in the same task or another.
    pub fn mover(&self) -> Mover {
        Mover {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The notice of the drain (for a goodbye when the connection does not move).
    pub fn notice(&self) -> crate::ShutdownNotice {
        self.shared.conn.notice()
    }

    /// The kind name it moves as.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Moves the connection to the next generation with `state` (at most 64 KiB), once
    /// [`Mover::asked`] resolved and with nothing left half-written (flush the protocol's
    /// writer first). On success the connection is the next generation's: this one reads
    /// and writes nothing more (both fail). On failure it is still here and reads go on:
    /// the hand-over ended, or the state is too large (this connection is then not asked
    /// again in this hand-over), or a message is still being read (not at a boundary).
    pub async fn hand_over(&mut self, state: &[u8]) -> Result<(), MoveError> {
        let Some(outbox) = self.shared.wanted() else {
            return Err(MoveError::NotAsked);
        };
        if !self.at_boundary() {
            return Err(MoveError::MidMessage);
        }
        let result = self.send(&outbox, state).await;
        if result.is_err() {
            // Not asked again in this hand-over; the reads go on.
            outbox.decline(self.shared.id());
            self.shared.reader.wake();
        }
        result
    }

    async fn send(&mut self, outbox: &Outbox, state: &[u8]) -> Result<(), MoveError> {
        if state.len() > MAX_STATE {
            return Err(MoveError::StateTooLarge { len: state.len() });
        }
        let Some(io) = self.io.as_ref() else {
            return Err(MoveError::Gone);
        };
        let upgraded = Upgraded {
            name: self.shared.name.to_string(),
            websocket: self.frames.is_some(),
            state: Bytes::copy_from_slice(state),
        };
        // Under way: the hand-over is complete only once none is.
        let _sending = outbox.sending();
        let conn = &self.shared.conn;
        // From here no shutdown from outside reaches the socket: the next generation is
        // about to share it.
        let Some(socket) = conn.socket.take_lent(io) else {
            return Err(MoveError::Gone); // forced meanwhile
        };
        match outbox
            .send_upgraded(socket, upgraded, &[&self.unread])
            .await
        {
            Ok(()) => {
                tracing::trace!(conn = conn.info.id, name = %self.shared.name, "upgraded connection sent to the next generation");
                // Ours closes; the copy in flight (and the outbox's) keep it open.
                self.io = None;
                conn.tracker().remove_movable(&self.shared);
                self.unread.clear();
                Ok(())
            }
            Err(e) => {
                conn.socket.lend_back(io.get_ref());
                Err(MoveError::Channel(e))
            }
        }
    }

    /// Whether what was given to the reader makes whole messages.
    fn at_boundary(&self) -> bool {
        self.frames.as_ref().is_none_or(Frames::at_boundary)
    }

    /// Reads from the socket into `unread` (a WebSocket frame's header is awaited).
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(moved()));
        };
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        std::task::ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        self.unread.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl Drop for Movable {
    fn drop(&mut self) {
        self.shared.conn.tracker().remove_movable(&self.shared);
    }
}

impl std::fmt::Debug for Movable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Movable")
            .field("name", &self.shared.name)
            .field("conn", &self.shared.conn.info.id)
            .field("moved", &self.io.is_none())
            .finish()
    }
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("name", &self.shared.name)
            .finish()
    }
}

impl Mover {
    /// Resolves when an upgrade asks the connection to move and its reads have stopped
    /// between two messages: call [`Movable::hand_over`] then. Resolves again at the next
    /// upgrade if this one did not take it.
    pub async fn asked(&self) {
        std::future::poll_fn(|cx| {
            if self.ready() {
                return Poll::Ready(());
            }
            self.shared.mover.register(cx.waker());
            if self.ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn ready(&self) -> bool {
        // Acquire: pairs with the reader's Release, so the bytes it gave are whole messages.
        self.shared.at_boundary.load(Ordering::Acquire) && self.shared.wanted().is_some()
    }
}

impl AsyncRead for Movable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let left = match this.frames.as_ref().map(|f| (f.left(), f.at_boundary())) {
                None => u64::MAX,
                Some((left, _)) if left > 0 => left,
                Some((_, boundary)) => {
                    if boundary {
                        this.shared.at_boundary.store(true, Ordering::Release);
                        if park(&this.shared, cx) {
                            return Poll::Pending;
                        }
                    }
                    match frames::header(&this.unread) {
                        Some(header) => {
                            if let Some(frames) = &mut this.frames {
                                frames.start(&header);
                            }
                            this.shared.at_boundary.store(false, Ordering::Release);
                        }
                        // A header still to come: read on (the end of the stream gives what
                        // was read, then the end).
                        None => {
                            if std::task::ready!(this.fill(cx))? == 0 {
                                give(&mut this.unread, buf, usize::MAX);
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                    continue;
                }
            };
            // Without frames the reads stop whenever a hand-over wants the connection (its
            // handler moves it between its own messages).
            if this.frames.is_none() && park(&this.shared, cx) {
                return Poll::Pending;
            }
            let limit = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(buf.remaining());
            let given = if !this.unread.is_empty() {
                give(&mut this.unread, buf, limit)
            } else {
                let Some(io) = this.io.as_mut() else {
                    return Poll::Ready(Err(moved()));
                };
                // At most to the frame's end: the next frame's bytes stay in the socket.
                let mut sub = ReadBuf::new(buf.initialize_unfilled_to(limit));
                std::task::ready!(Pin::new(io).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                buf.advance(n);
                n
            };
            if let Some(frames) = &mut this.frames {
                frames.gave(given);
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for Movable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(moved())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(moved())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Gives the reader up to `limit` bytes of `unread`, in order; returns how many.
fn give(unread: &mut BytesMut, buf: &mut ReadBuf<'_>, limit: usize) -> usize {
    let n = unread.len().min(buf.remaining()).min(limit);
    buf.put_slice(&unread[..n]);
    unread.advance(n);
    n
}

/// The reads stop here for the hand-over under way: the mover is told, and the reader
/// waits for the hand-over to end (or the connection to move).
fn park(shared: &Shared, cx: &mut Context<'_>) -> bool {
    if shared.wanted().is_none() {
        return false;
    }
    shared.reader.register(cx.waker());
    // Checked again: the hand-over may have ended (and woken no one) in between.
    if shared.wanted().is_none() {
        return false;
    }
    shared.mover.wake();
    true
}

fn moved() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection moved to the next generation",
    )
}

/// A kind name that travels: not empty, at most 255 bytes, no line feed (the separator of
/// the new generation's list).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && !name.contains('\n')
}

/// A handler that resumes upgraded connections of one kind (see
/// [`Restart::resume`](crate::Restart::resume)).
pub(crate) type Resume =
    Arc<dyn Fn(Movable, Bytes) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The handlers that resume upgraded connections, by kind name.
#[derive(Clone, Default)]
pub(crate) struct Resumers(HashMap<String, Resume>);

impl Resumers {
    pub(crate) fn insert(&mut self, name: String, resume: Resume) {
        self.0.insert(name, resume);
    }

    /// The kinds resumed, for the previous generation.
    pub(crate) fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// Resumes `handed` (an upgraded connection, registered in `tracker` as `io`) with the
    /// handler for its kind, on a task of its own; without one it closes.
    pub(crate) fn resume(&self, io: TrackedIo<Stream>, upgraded: Upgraded, buffered: Bytes) {
        let Some(resume) = self.0.get(&upgraded.name) else {
            tracing::warn!(name = %upgraded.name, "no handler resumes this kind of upgraded connection: closed");
            return;
        };
        let resume = Arc::clone(resume);
        let (movable, state) = Movable::resumed(io, upgraded, buffered);
        tokio::spawn(resume(movable, state));
    }
}

impl std::fmt::Debug for Resumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Tracker {
    /// A hand-over starts (`starts`: every movable connection waits for its turn) or ends:
    /// every turn ends, and every movable connection's reader and mover are woken.
    pub(crate) fn wake_movables(&self, starts: bool) {
        let movables = crate::base::lock(&self.movables);
        let mut turns = crate::base::lock(&self.turns);
        *turns = Turns::default();
        for m in movables.values() {
            // Relaxed: read again under the next grant's Release.
            m.granted.store(false, Ordering::Relaxed);
            if starts {
                turns.push(Arc::clone(m));
            }
            m.wake();
        }
    }

    /// Gives the next movable connections the hand-over wants their turn (see
    /// `conn::turns`), and wakes them. Returns whether one is still wanted (granted, or
    /// waiting for its turn).
    pub(crate) fn grant_movables(&self, outbox: &Outbox) -> bool {
        let movables = crate::base::lock(&self.movables);
        let mut turns = crate::base::lock(&self.turns);
        let taker = outbox.taker();
        // Still here and wanted: a connection that moved, closed or was declined is not.
        let wanted =
            |m: &Arc<Shared>| movables.contains_key(&m.id()) && taker.takes(m.name(), m.id());
        for m in turns.grant(outbox.unacknowledged(), IN_FLIGHT, wanted) {
            m.granted.store(true, Ordering::Release);
            m.wake();
        }
        turns.left(wanted)
    }

    fn add_movable(&self, shared: &Arc<Shared>) {
        let mut movables = crate::base::lock(&self.movables);
        movables.insert(shared.id(), Arc::clone(shared));
        // Made during a hand-over (an upgrade on a connection already here): its turn comes
        // after the others'.
        if self.is_handing_over() {
            crate::base::lock(&self.turns).push(Arc::clone(shared));
        }
    }

    fn remove_movable(&self, shared: &Shared) {
        crate::base::lock(&self.movables).remove(&shared.id());
    }
}
