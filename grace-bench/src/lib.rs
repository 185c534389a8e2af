//! Shared pieces of the `grace-bench` binaries: the one handler every server mode serves,
//! and raising the open-file limit so 10,000 connections fit in one process.

/// The application every mode serves: `GET /` answers `200 hello`.
pub fn router() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "hello" }))
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
