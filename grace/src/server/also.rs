//! More listeners, each with a service of its own, in the same server (see
//! [`Serve::also_serve`](super::Serve::also_serve)): an admin port beside the public one,
//! under one stop and one restart.
//!
//! The main service keeps its own type (`Serve<S>`, its requests not paying for this); the
//! others are type-erased ([`AnyService`]: a boxed future and a boxed body per request). The
//! connections of every listener are tracked, drained, forced and reported together, and a
//! restart passes every listener on under its name.
//!
//! A connection handed over at an upgrade (see `crate::handover`) carries no listener name:
//! the new generation tells which service serves it by the connection's local address, the
//! address of the listener that accepted it (see [`Routes`]).

#[cfg(unix)]
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower::ServiceExt;

use crate::base::conn::Addr;
use crate::conn::body::RequestBody;
use crate::conn::task::{BoxError, ConnCtx};
use crate::error::{Error, Result};
use crate::listener::Listener;
#[cfg(unix)]
use crate::listener::Stream;

/// The body of an [`AnyService`]'s responses.
pub(crate) type AnyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A service of any type, as [`Serve::also_serve`](super::Serve::also_serve) keeps it.
pub(crate) type AnyService =
    tower::util::BoxCloneSyncService<Request<RequestBody>, Response<AnyBody>, BoxError>;

/// A listener served by a service of its own.
pub(crate) struct Also {
    /// The name a restart passes it on under (`LISTEN_FDNAMES`).
    pub(crate) name: String,
    pub(crate) listener: Listener,
    pub(crate) service: AnyService,
}

impl std::fmt::Debug for Also {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Also")
            .field("name", &self.name)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// `service` with its type erased: its futures boxed, its body's chunks turned into
/// `Bytes` (free for a body of `Bytes` already, an axum `Body`'s) and the body boxed.
pub(crate) fn erase<S, B>(service: S) -> AnyService
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let service = super::serve::routes_ready(service)
        .map_err(Into::into)
        .map_response(|response: Response<B>| {
            response.map(|body| {
                body.map_frame(|frame| {
                    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                })
                .map_err(Into::into)
                .boxed_unsync()
            })
        });
    tower::util::BoxCloneSyncService::new(service)
}

/// Checks the names of the listeners served by other services: each is passed on as one
/// of `LISTEN_FDNAMES` (`:`-separated, as systemd's `FileDescriptorName=`), so it must be
/// one, and must tell its listener apart from every other.
pub(crate) fn check_names<'a>(
    main: impl IntoIterator<Item = &'a str>,
    also: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let main: Vec<&str> = main.into_iter().collect();
    let mut seen: Vec<&str> = Vec::new();
    for name in also {
        let refuse = |reason: &str| {
            Err(Error::ListenerName {
                name: name.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if name.is_empty() || name.len() > 255 {
            return refuse("a name is 1 to 255 characters long");
        }
        if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return refuse("a name is printable ASCII, without spaces or `:`");
        }
        if main.contains(&name) {
            return refuse("a listener of the main service has this name");
        }
        if seen.contains(&name) {
            return refuse("another listener served apart has this name");
        }
        seen.push(name);
    }
    Ok(())
}

/// Which service serves a connection that did not come through an accept loop (handed over
/// by the previous generation, or back from an upgrade of ours): told by its local address.
/// (Such connections come only with restarts: Unix only.)
#[cfg_attr(not(unix), allow(dead_code))]
pub(super) struct Routes<S> {
    pub(super) main: Arc<ConnCtx<S>>,
    /// The main service's listeners' addresses (a match there beats a wildcard elsewhere).
    main_addrs: Vec<Addr>,
    /// Each other service with its listener's address. Empty: all go to `main`, and no
    /// address is looked up.
    also: Vec<(Addr, Arc<ConnCtx<AnyService>>)>,
}

/// The service that serves a connection (see [`Routes::pick`]).
#[cfg(unix)]
pub(super) enum Route<'a, S> {
    Main(&'a Arc<ConnCtx<S>>),
    Also(&'a Arc<ConnCtx<AnyService>>),
}

impl<S> Routes<S> {
    pub(super) fn new(
        main: Arc<ConnCtx<S>>,
        main_listeners: &[Arc<Listener>],
        also: Vec<(Addr, Arc<ConnCtx<AnyService>>)>,
    ) -> Routes<S> {
        let main_addrs = match also.is_empty() {
            true => Vec::new(),
            false => main_listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        };
        Routes {
            main,
            main_addrs,
            also,
        }
    }

    /// The service of the listener whose address is `stream`'s local address, the most
    /// precise match winning (`127.0.0.1:9090` over `0.0.0.0:9090`); the main service when
    /// none matches (a listener this generation did not take, or a local address that
    /// cannot be read).
    #[cfg(unix)]
    pub(super) fn pick(&self, stream: &Stream) -> Route<'_, S> {
        if self.also.is_empty() {
            return Route::Main(&self.main);
        }
        let Ok(local) = stream.local_addr() else {
            return Route::Main(&self.main);
        };
        let main = self.main_addrs.iter().map(|a| matches(a, &local)).max();
        let also = self
            .also
            .iter()
            .map(|(a, ctx)| (matches(a, &local), ctx))
            .max_by_key(|(m, _)| *m);
        match also {
            Some((m, ctx)) if m > Match::None && Some(m) > main => Route::Also(ctx),
            _ => Route::Main(&self.main),
        }
    }
}

/// How well a listener's address matches a connection's local address.
#[cfg(unix)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Match {
    None,
    /// The same port on a wildcard address (`0.0.0.0`, `[::]`).
    Wildcard,
    /// The very address (or the same socket path).
    Exact,
}

#[cfg(unix)]
fn matches(listener: &Addr, local: &Addr) -> Match {
    match (listener, local) {
        (Addr::Tcp(l), Addr::Tcp(c)) => tcp_matches(*l, *c),
        (Addr::Unix(Some(l)), Addr::Unix(Some(c))) if l == c => Match::Exact,
        _ => Match::None,
    }
}

#[cfg(unix)]
fn tcp_matches(listener: SocketAddr, local: SocketAddr) -> Match {
    if listener.port() != local.port() {
        return Match::None;
    }
    // An IPv4 client of a dual-stack `[::]` listener has a mapped local address.
    let canonical = |a: SocketAddr| a.ip().to_canonical();
    if canonical(listener) == canonical(local) {
        return Match::Exact;
    }
    let wildcard = match listener {
        SocketAddr::V4(l) => l.ip().is_unspecified() && canonical(local).is_ipv4(),
        // `[::]` takes IPv4 too unless IPV6_V6ONLY is set (then no such connection exists).
        SocketAddr::V6(l) => l.ip().is_unspecified(),
    };
    match wildcard {
        true => Match::Wildcard,
        false => Match::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> Addr {
        Addr::Tcp(s.parse().unwrap())
    }

    #[test]
    fn addresses_match_exactly_by_wildcard_or_not_at_all() {
        assert_eq!(
            matches(&tcp("127.0.0.1:9090"), &tcp("127.0.0.1:9090")),
            Match::Exact
        );
        assert_eq!(
            matches(&tcp("0.0.0.0:9090"), &tcp("10.1.2.3:9090")),
            Match::Wildcard
        );
        assert_eq!(
            matches(&tcp("[::]:9090"), &tcp("10.1.2.3:9090")),
            Match::Wildcard
        );
        assert_eq!(
            matches(&tcp("127.0.0.1:9090"), &tcp("[::ffff:127.0.0.1]:9090")),
            Match::Exact
        );
        assert_eq!(
            matches(&tcp("0.0.0.0:9090"), &tcp("[::1]:9090")),
            Match::None
        );
        assert_eq!(
            matches(&tcp("127.0.0.1:9090"), &tcp("127.0.0.1:8080")),
            Match::None
        );
        assert_eq!(
            matches(&tcp("127.0.0.1:9090"), &tcp("127.0.0.2:9090")),
            Match::None
        );
        let path = |p: &str| Addr::Unix(Some(p.into()));
        assert_eq!(
            matches(&path("/run/a.sock"), &path("/run/a.sock")),
            Match::Exact
        );
        assert_eq!(
            matches(&path("/run/a.sock"), &path("/run/b.sock")),
            Match::None
        );
        assert_eq!(matches(&Addr::Unix(None), &Addr::Unix(None)), Match::None);
        assert_eq!(
            matches(&path("/run/a.sock"), &tcp("127.0.0.1:1")),
            Match::None
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names(["grace"], ["admin", "metrics"]).is_ok());
        for bad in ["", "a:b", "a b", "grace", "é"] {
            let err = check_names(["grace"], [bad]).unwrap_err();
            assert!(matches!(err, Error::ListenerName { .. }), "{bad:?}: {err}");
        }
        assert!(check_names(["grace"], ["admin", "admin"]).is_err());
        assert!(check_names([], [&"x".repeat(256)[..]]).is_err());
    }
}
