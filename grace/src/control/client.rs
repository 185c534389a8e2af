//! The client side: one request, one typed answer.

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::answer::{DrainStarted, Refused, Request, Status, UpgradeOutcome};

/// The longest answer line a client reads (a status is a few hundred bytes).
const MAX_ANSWER: u64 = 64 * 1024;

/// Why a control request got no answer of its kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The socket could not be reached: nothing there, nobody accepting on it (the server
    /// stopped), or no permission (the socket is its owner's only).
    #[error("cannot reach the control socket {}: {source}", path.display())]
    Connect {
        /// The control socket's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The control socket's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection without an answer (it stopped meanwhile).
    #[error("the server at {} closed the connection without answering", path.display())]
    NoAnswer {
        /// The control socket's path.
        path: PathBuf,
    },
    /// The server did not take the request (a server too old to know it).
    #[error("the server at {} refused the request: {error}", path.display())]
    Refused {
        /// The control socket's path.
        path: PathBuf,
        /// What it said.
        error: String,
    },
    /// The answer is not one of the kind asked for.
    #[error("the answer from {} is not understood ({reason}): {answer}", path.display())]
    Malformed {
        /// The control socket's path.
        path: PathBuf,
        /// The answer, as it came.
        answer: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Asks the server on the control socket at `path` for its [`Status`].
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::control::RequestError> {
/// let status = grace_http::control::status("/run/app/control.sock").await?;
/// print!("{status}");
/// # Ok(()) }
/// ```
pub async fn status(path: impl AsRef<Path>) -> Result<Status, RequestError> {
    ask(path.as_ref(), Request::Status).await
}

/// Asks the server on the control socket at `path` to upgrade (as SIGHUP does, see
/// [`Serve::with_restart`](crate::Serve::with_restart)) and waits for the outcome: the new
/// process ready and the connections handed over, or the upgrade rolled back.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::control::RequestError> {
/// match grace_http::control::upgrade("/run/app/control.sock").await? {
///     grace_http::control::UpgradeOutcome::Upgraded { pid } => println!("{pid}"),
///     failed => eprintln!("{failed}"),
/// }
/// # Ok(()) }
/// ```
pub async fn upgrade(path: impl AsRef<Path>) -> Result<UpgradeOutcome, RequestError> {
    ask(path.as_ref(), Request::Upgrade).await
}

/// Asks the server on the control socket at `path` to drain and stop (as SIGTERM does).
/// Returns once the drain is asked for, not once it is done.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::control::RequestError> {
/// grace_http::control::drain("/run/app/control.sock").await?;
/// # Ok(()) }
/// ```
pub async fn drain(path: impl AsRef<Path>) -> Result<DrainStarted, RequestError> {
    ask(path.as_ref(), Request::Drain).await
}

async fn ask<T: DeserializeOwned>(path: &Path, request: Request) -> Result<T, RequestError> {
    let io = |source| RequestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| RequestError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let line = format!("{}\n", request.as_str());
    stream.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(MAX_ANSWER)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    let answer = answer.trim();
    if answer.is_empty() {
        return Err(RequestError::NoAnswer {
            path: path.to_path_buf(),
        });
    }
    serde_json::from_str(answer).map_err(|e| match Refused::read(answer) {
        Some(refused) => RequestError::Refused {
            path: path.to_path_buf(),
            error: refused.error,
        },
        None => RequestError::Malformed {
            path: path.to_path_buf(),
            answer: answer.to_owned(),
            reason: e.to_string(),
        },
    })
}
