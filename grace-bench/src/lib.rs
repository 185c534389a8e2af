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

/// CPU time of all of process `pid`'s threads so far, in ns (`/proc/PID/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        total += stat
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse::<u64>()?;
    }
    Ok(total)
}

/// Resident set size of process `pid` in bytes, from `/proc/PID/status`.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Takes a spawned server's stdout and reads its first line, `listening on ADDR`: the
/// address, and the rest of its stdout (keep it open: the server may write more).
pub fn listening(
    child: &mut std::process::Child,
) -> anyhow::Result<(
    std::net::SocketAddr,
    std::io::BufReader<std::process::ChildStdout>,
)> {
    use anyhow::Context;
    use std::io::BufRead;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from server: {line:?}"))?
        .parse()?;
    Ok((addr, stdout))
}

/// The total instructions (`Ir`) of a callgrind profile; the file is removed unless `keep`.
pub fn callgrind_total(file: &std::path::Path, keep: bool) -> anyhow::Result<u64> {
    use anyhow::Context;
    let profile = std::fs::read_to_string(file)?;
    if !keep {
        let _ = std::fs::remove_file(file);
    }
    let total = profile
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .context("no totals in callgrind output")?;
    Ok(total
        .split_whitespace()
        .next()
        .context("empty totals")?
        .parse()?)
}

/// The median of rounds (the mean of the middle two for an even count; NaN for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rounds as a comma-separated list, with `digits` decimals.
pub fn list(xs: &[f64], digits: usize) -> String {
    xs.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}
