//! What a connection is, as users see it: its [`ConnState`], its [`Addr`], its [`ConnInfo`],
//! and the [`StateCounts`] of a server's live connections.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

/// The state of a connection, with the meaning of Go's `http.ConnState`.
///
/// ```text
///            first byte                 response written
///   New ───────────────► Active ◄──────────────────────► Idle
///    │                     │    next request's first byte   │
///    │                     │ 101 Switching Protocols        │
///    │                     ▼                                │
///    │                  Hijacked                            │
///    │                     │                                │
///    └─────────────────────┴──────────► Closed ◄────────────┘
/// ```
///
/// Unlike Go, an upgraded (`Hijacked`) connection stays tracked until its socket closes,
/// counts for the drain, and is forced closed at the deadline like any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Accepted; no byte read yet.
    New,
    /// At least one byte of a request read, until its response is fully written.
    /// An HTTP/2 connection is `Active` while it has at least one open stream.
    Active,
    /// Keep-alive: between requests.
    Idle,
    /// Upgraded (WebSocket, `CONNECT`…): the handler owns the byte stream.
    Hijacked,
    /// Closed: its socket closed, or shut by the drain or a force (its task may release
    /// the descriptor later, once the stop is over). Reported once, as the last state.
    Closed,
}

impl ConnState {
    #[inline]
    pub(crate) fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::New,
            1 => ConnState::Active,
            2 => ConnState::Idle,
            3 => ConnState::Hijacked,
            _ => ConnState::Closed,
        }
    }
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ConnState::New => "new",
            ConnState::Active => "active",
            ConnState::Idle => "idle",
            ConnState::Hijacked => "hijacked",
            ConnState::Closed => "closed",
        };
        f.write_str(s)
    }
}

/// A peer or local address: TCP or Unix-domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    /// An IPv4 or IPv6 socket address.
    Tcp(SocketAddr),
    /// A Unix-domain socket path; `None` for an unnamed peer.
    Unix(Option<PathBuf>),
}

impl Addr {
    /// The TCP address, if this is one.
    pub fn as_tcp(&self) -> Option<SocketAddr> {
        match self {
            Addr::Tcp(a) => Some(*a),
            Addr::Unix(_) => None,
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            Addr::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

impl serde::Serialize for Addr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What is known of a connection when its state changes.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub(crate) id: u64,
    pub(crate) peer: Addr,
    pub(crate) accepted_at: Instant,
}

impl ConnInfo {
    /// A number unique to this connection within the server.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The peer's address.
    pub fn peer(&self) -> &Addr {
        &self.peer
    }
    /// When the connection was accepted.
    pub fn accepted_at(&self) -> Instant {
        self.accepted_at
    }
}

/// Live connections per state, as read from [`Handle::counts`](crate::Handle::counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateCounts {
    /// Accepted, nothing read yet.
    pub new: usize,
    /// Serving a request.
    pub active: usize,
    /// Keep-alive, between requests.
    pub idle: usize,
    /// Upgraded.
    pub hijacked: usize,
}

impl StateCounts {
    /// All live connections.
    pub fn total(&self) -> usize {
        self.new + self.active + self.idle + self.hijacked
    }

    /// The count for one state (`Closed` is always 0: closed connections are not live).
    pub fn get(&self, state: ConnState) -> usize {
        match state {
            ConnState::New => self.new,
            ConnState::Active => self.active,
            ConnState::Idle => self.idle,
            ConnState::Hijacked => self.hijacked,
            ConnState::Closed => 0,
        }
    }
}
