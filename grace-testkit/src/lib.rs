//! The test kit of the grace workspace, shared by the tests of `grace-http`, `grace-demo` and
//! `grace-check` (a dev-dependency only, never published):
//!
//! - [`http1`]: the one HTTP/1 response reader (head, then a body by `Content-Length`,
//!   chunks or the end of the connection), async and blocking, and a raw client
//!   connection ([`Client`]) that shows exactly what went over the socket;
//! - [`process`]: child processes by pid (signals, waiting until one is gone, the child
//!   subreaper) and scratch directories kept after a failure.
//!
//! Each crate's `tests/common` module re-exports what it uses from here and keeps only what
//! is its own (a server in-process for `grace-http`, a `grace-demo` child for the demo).

pub mod http1;
pub mod process;

use std::time::Duration;

pub use http1::{Client, Response};
pub use process::{Gone, ScratchRoot, TempDir};

/// The type-erased error of the tower stack (`tower::BoxError`): the one the library, its
/// tests and grace-check's test server all name.
pub use tower::BoxError;

/// A loose bound for anything that should be immediate: never flakes, still catches a hang.
pub const SOON: Duration = Duration::from_secs(5);
