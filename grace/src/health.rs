//! Readiness and liveness endpoints for load balancers and Kubernetes probes.
//!
//! Readiness answers `200` while the server serves and `503` from the moment a drain is
//! asked for (before any pre-stop delay), so endpoints stop routing here while in-flight
//! requests still finish. Liveness answers `200` as long as the process runs.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::base::latch::Latch;
use crate::base::report::Trigger;

/// A tower service answering readiness probes: `200 ready` or `503 draining`.
///
/// ```
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let server = grace_http::Server::bind("127.0.0.1:0").await?;
/// let app: axum::Router = axum::Router::new()
///     .route_service("/readyz", server.handle().readiness())
///     .route_service("/healthz", grace_http::Liveness);
/// # let _ = app; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Readiness {
    /// The server's drain request: ready until it is set.
    pub(crate) drain: Arc<Latch<Trigger>>,
}

impl Readiness {
    /// True while serving; false from the moment a drain is asked for (before any
    /// pre-stop delay).
    pub fn is_ready(&self) -> bool {
        !self.drain.is_set()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// A tower service answering liveness probes: always `200 ok`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness;

fn answer(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// A probe answers at once, from a status it computes; both probes share this service shape.
trait Probe {
    fn status(&self) -> (StatusCode, &'static str);
}

impl Probe for Readiness {
    fn status(&self) -> (StatusCode, &'static str) {
        if self.is_ready() {
            (StatusCode::OK, "ready\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
    }
}

impl Probe for Liveness {
    fn status(&self) -> (StatusCode, &'static str) {
        (StatusCode::OK, "ok\n")
    }
}

macro_rules! probe_service {
    ($($ty:ty),*) => {$(
        impl<B> tower_service::Service<Request<B>> for $ty {
            type Response = Response<Full<Bytes>>;
            type Error = Infallible;
            type Future = Ready<Result<Self::Response, Infallible>>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, _: Request<B>) -> Self::Future {
                let (status, body) = self.status();
                ready(Ok(answer(status, body)))
            }
        }
    )*};
}
probe_service!(Readiness, Liveness);
