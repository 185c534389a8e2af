//! The accept loops, and the serving of connections handed over by the previous generation
//! (or back from an upgrade of ours that did not take them).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

#[cfg(unix)]
use super::also::{Route, Routes};
#[cfg(unix)]
use super::serve::AbortOnDrop;
#[cfg(unix)]
use crate::conn::io::TrackedIo;
#[cfg(unix)]
use crate::conn::movable::Resumers;
use crate::conn::task::{self, ConnCtx, HttpService, ResponseBody};
#[cfg(unix)]
use crate::handover::Origin;
#[cfg(unix)]
use crate::listener::Stream;
use crate::listener::{self, Listener};
use crate::shutdown::Shared;

/// Serves what the previous generation hands over, if it does (from before we say we are
/// ready: it hands them over only once we have), and what an upgrade of ours gives back.
/// Each is served by the service of the listener that accepted it (see [`Routes`]).
/// Whether connections are taken from the previous generation.
#[cfg(unix)]
pub(super) fn receive<S, B>(
    handover: Option<std::os::fd::OwnedFd>,
    shared: &Shared,
    limit: Option<&Arc<tokio::sync::Semaphore>>,
    routes: &Arc<Routes<S>>,
    resumers: Resumers,
    tasks: &mut Vec<AbortOnDrop>,
) -> bool
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let kinds = resumers.names();
    let inbox = handover.map(|fd| crate::handover::inbox::Inbox::new(fd, &kinds));
    let resumers = Arc::new(resumers);
    let inbox = match inbox.transpose() {
        Ok(inbox) => inbox,
        Err(e) => {
            tracing::warn!(error = %e, "cannot receive handed-over connections: none taken");
            None
        }
    };
    let takes_connections = inbox.is_some();
    match inbox {
        Some(inbox) => tasks.push(AbortOnDrop(tokio::spawn(receive_handed(
            inbox,
            limit.cloned(),
            Arc::clone(routes),
            Arc::clone(&resumers),
        )))),
        None => {
            shared.tracker.previous_done.set(());
        }
    }
    // A connection that was on its way to a next generation that went (or that could not
    // go) is served here again.
    let _ = shared.tracker.local.set({
        let (limit, routes) = (limit.cloned(), Arc::clone(routes));
        Box::new(move |handed| serve_handed_here(handed, limit.as_ref(), &routes, &resumers))
    });
    takes_connections
}

/// Starts one accept loop per listener, each serving with `ctx`'s service, in `accepting`.
pub(super) fn start<S, B>(
    accepting: &mut JoinSet<()>,
    listeners: Vec<Arc<Listener>>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx<S>>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    for l in listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "listening");
        }
        accepting.spawn(accept_loop(
            l,
            limit.clone(),
            Arc::clone(shared),
            Arc::clone(ctx),
        ));
    }
}

/// Serves the connections the previous generation hands over, until it closes its end.
/// They are already accepted: one that finds the connection limit reached is served anyway.
#[cfg(unix)]
async fn receive_handed<S, B>(
    mut inbox: crate::handover::inbox::Inbox,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    routes: Arc<Routes<S>>,
    resumers: Arc<Resumers>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    loop {
        let handed = match inbox.recv().await {
            Ok(Some(handed)) => handed,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over channel failed: no more connections taken");
                break;
            }
        };
        serve_handed_here(handed, limit.as_ref(), &routes, &resumers);
    }
    tracing::debug!("the previous generation has handed over all it will");
    routes.main.tracker.previous_done.set(());
}

/// Resolves once accepting is paused (`true`) or no longer paused (`false`).
async fn wait_paused(paused: &mut tokio::sync::watch::Receiver<bool>, to: bool) {
    // An error: the sender (in `Shared`) is gone, which it never is while we accept.
    let _ = paused.wait_for(|p| *p == to).await;
}

/// Serves a connection handed over (by the previous generation, or back from an upgrade of
/// ours that did not take it), by the service of the listener that accepted it, or an
/// upgraded one by the handler that resumes its kind. Already accepted: one that finds the
/// connection limit reached is served anyway.
#[cfg(unix)]
fn serve_handed_here<S, B>(
    handed: crate::handover::Handed,
    limit: Option<&Arc<tokio::sync::Semaphore>>,
    routes: &Routes<S>,
    resumers: &Resumers,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let crate::handover::Handed {
        socket,
        kind,
        buffered,
        origin,
        upgraded,
    } = handed;
    match Stream::from_handed(socket) {
        Ok((mut stream, peer)) => {
            stream.hold(limit.and_then(|l| Arc::clone(l).try_acquire_owned().ok()));
            if let Some(upgraded) = upgraded {
                let tracker = &routes.main.tracker;
                let conn = tracker.register_handed(peer, &stream, kind, origin == Origin::Previous);
                resumers.resume(TrackedIo::registered(stream, conn), upgraded, buffered);
                return;
            }
            match routes.pick(&stream) {
                Route::Main(ctx) => tokio::spawn(task::serve_handed(
                    stream,
                    peer,
                    kind,
                    buffered,
                    origin,
                    Arc::clone(ctx),
                )),
                Route::Also(ctx) => tokio::spawn(task::serve_handed(
                    stream,
                    peer,
                    kind,
                    buffered,
                    origin,
                    Arc::clone(ctx),
                )),
            };
        }
        Err(e) => tracing::debug!(error = %e, "handed-over descriptor refused"),
    }
}

/// Accepts until the drain starts, then drops (closes) the listener. Stops accepting (the
/// listener kept) while an upgrade hands connections over, so that every new connection goes
/// to the new generation meanwhile.
async fn accept_loop<S, B>(
    listener: Arc<Listener>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx<S>>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    // Idle connections closed per failed accept: enough for the next few clients.
    const SHED_ON_EXHAUSTION: usize = 16;
    let mut backoff = MIN_BACKOFF;
    // When the connection limit was last said to be reached (said at most once a second).
    let mut said_full: Option<std::time::Instant> = None;
    let mut paused = shared.accept_pause();
    loop {
        // A place under the connection limit first: until one is free, new connections wait
        // in the kernel's accept queue, and make room for themselves (see `limit`).
        let slot = match &limit {
            None => None,
            Some(limit) => {
                if limit.available_permits() == 0
                    && said_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    said_full = Some(std::time::Instant::now());
                    tracing::warn!(
                        "max_connections reached: new connections wait in the accept queue; \
                         idle and silent connections make room for them"
                    );
                }
                tokio::select! {
                    biased;
                    _ = shared.accepting_stopped() => break,
                    slot = crate::limit::place(limit, &*listener, &shared.tracker, ctx.grace) => slot,
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            _ = shared.accepting_stopped() => break,
            _ = wait_paused(&mut paused, true) => {
                tokio::select! {
                    biased;
                    _ = shared.accepting_stopped() => break,
                    _ = wait_paused(&mut paused, false) => continue,
                }
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                backoff = MIN_BACKOFF;
                stream.hold(slot);
                task::spawn(stream, peer, Arc::clone(&ctx));
            }
            Err(e) if listener::is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: make room by closing the connections that
                // have been idle longest, and wait for resources instead of spinning.
                let shed = shared.tracker.shed_idle(SHED_ON_EXHAUSTION);
                tracing::error!(error = %e, ?backoff, shed, "accept failed; closed idle connections, backing off");
                tokio::select! {
                    _ = shared.accepting_stopped() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(listener);
}
