//! Typed errors of the library.

use std::io;

/// What can go wrong while binding, serving or restarting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding a listening socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Installing a signal handler failed.
    #[error("cannot install the handler for {signal}: {source}")]
    Signal {
        /// Name of the signal.
        signal: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An inherited listener (systemd socket activation or a restart) could not be adopted.
    #[error("cannot adopt inherited listener: {0}")]
    Inherit(String),
    /// A zero-downtime restart could not be carried out; the old process keeps serving.
    #[error("restart failed: {0}")]
    Restart(String),
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
