//! What the demo's upgraded connections (`ws`, `lines`) share: a stream that may move to the
//! next generation (`grace_http::Movable`) or not (through TLS, over HTTP/2), and the two
//! events their loops wait for beside their reads.

use std::future::Future;

use grace_http::{Movable, MoveError, Mover, ShutdownNotice};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// An upgraded connection's stream, and whether (and how) it moves.
pub trait Moves: AsyncRead + AsyncWrite + Unpin + Send {
    fn mover(&self) -> Option<Mover>;
    fn hand_over(&mut self, state: &[u8]) -> impl Future<Output = Result<(), MoveError>> + Send;
}

impl Moves for Movable {
    fn mover(&self) -> Option<Mover> {
        Some(Movable::mover(self))
    }

    fn hand_over(&mut self, state: &[u8]) -> impl Future<Output = Result<(), MoveError>> + Send {
        Movable::hand_over(self, state)
    }
}

/// One that cannot move: served here to its end.
impl Moves for TokioIo<hyper::upgrade::Upgraded> {
    fn mover(&self) -> Option<Mover> {
        None
    }

    fn hand_over(&mut self, _: &[u8]) -> impl Future<Output = Result<(), MoveError>> + Send {
        std::future::ready(Err(MoveError::NotAsked))
    }
}

/// Resolves when `mover` (if any) says the connection should move.
pub async fn asked(mover: Option<&Mover>) {
    match mover {
        Some(m) => m.asked().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the drain reaches the connection (if it has a notice).
pub async fn drained(notice: Option<&ShutdownNotice>) {
    match notice {
        Some(n) => n.wait().await,
        None => std::future::pending().await,
    }
}
