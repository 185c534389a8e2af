//! Shared pieces of the `grace-bench` binaries: the handlers every server mode serves,
//! and raising the open-file limit so 10,000 connections fit in one process.

/// The application every mode serves: `GET /` answers `200 hello`.
pub fn router() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "hello" }))
}

/// The bare handler's response.
pub type Hello = http::Response<http_body_util::Full<bytes::Bytes>>;

/// The bare handler: answers `200 hello` to any request, with no router in between.
pub fn bare<B>() -> impl tower::Service<
    http::Request<B>,
    Response = Hello,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<Hello, std::convert::Infallible>>,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(|_req: http::Request<B>| {
        std::future::ready(Ok(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"hello"),
        ))))
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum.unwrap_or(u64::MAX))
}
