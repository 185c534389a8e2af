//! The scenarios: each starts the server afresh, drives it with real clients, sends real
//! signals, and judges what a client saw against what a graceful server owes it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Alpn, Closed, H1, Kind, TapLog, Target};
use crate::proc::{CommandTemplate, Exit, Server};

/// A route a scenario needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Root,
    Slow,
    Stream,
    Ws,
    Upgrade,
}

impl Need {
    pub fn flag(self) -> &'static str {
        match self {
            Need::Root => "--root-path",
            Need::Slow => "--slow-path",
            Need::Stream => "--stream-path",
            Need::Ws => "--ws-path",
            Need::Upgrade => "--upgrade-signal",
        }
    }
}

/// Every scenario: its name (for `--only`), what it checks, what it needs.
pub const SCENARIOS: &[(&str, &str, &[Need])] = &[
    (
        "inflight",
        "an in-flight request completes, with Connection: close",
        &[Need::Slow],
    ),
    (
        "refuse-new",
        "new connections are refused once draining",
        &[Need::Root, Need::Slow],
    ),
    (
        "idle",
        "idle keep-alive connections are closed at once",
        &[Need::Root, Need::Slow],
    ),
    (
        "exit-prompt",
        "the process exits promptly after the last response",
        &[Need::Slow],
    ),
    (
        "silent",
        "a connected client that sends nothing cannot hold the drain",
        &[],
    ),
    (
        "slowloris",
        "a client dribbling its request head cannot hold the drain",
        &[Need::Root],
    ),
    (
        "deadline",
        "the shutdown timeout forces what is still running",
        &[Need::Slow],
    ),
    (
        "second-signal",
        "a second signal forces at once",
        &[Need::Slow],
    ),
    ("sigint", "SIGINT drains like SIGTERM", &[Need::Slow]),
    (
        "http2",
        "HTTP/2: GOAWAY in two steps, the open stream finishes",
        &[Need::Slow],
    ),
    (
        "stream",
        "a streaming response completes across the drain",
        &[Need::Stream],
    ),
    ("websocket", "a WebSocket gets a close frame", &[Need::Ws]),
    (
        "load",
        "no failed request under load (GET retried only when unanswered)",
        &[Need::Root],
    ),
    (
        "malformed",
        "a malformed request is refused and the server still drains",
        &[Need::Root],
    ),
    (
        "fd-exhaustion",
        "out of descriptors: no spin, still answers after, still drains",
        &[Need::Root],
    ),
    (
        "upgrade",
        "an upgrade by socket hand-over refuses no connection",
        &[Need::Root, Need::Upgrade],
    ),
];

/// The routes (empty: the service has none).
#[derive(Clone, Debug)]
pub struct Routes {
    pub root: Option<String>,
    pub slow: Option<String>,
    pub stream: Option<String>,
    pub ws: Option<String>,
}

/// What every scenario knows.
#[derive(Clone)]
pub struct Ctx {
    pub template: CommandTemplate,
    pub tls: Option<crate::client::Tls>,
    /// The server's own shutdown timeout (what the user configured there).
    pub timeout: Duration,
    /// What "at once" and "promptly" allow.
    pub slack: Duration,
    pub routes: Routes,
    pub upgrade_signal: Option<Signal>,
    pub upgrade_signal_name: String,
    pub upgrade_wait: Duration,
    pub fd_limit: u32,
}

impl Ctx {
    pub fn has(&self, need: Need) -> bool {
        match need {
            Need::Root => self.routes.root.is_some(),
            Need::Slow => self.routes.slow.is_some(),
            Need::Stream => self.routes.stream.is_some(),
            Need::Ws => self.routes.ws.is_some(),
            Need::Upgrade => self.upgrade_signal.is_some(),
        }
    }

    fn root(&self) -> &str {
        self.routes.root.as_deref().unwrap_or("/")
    }

    fn slow(&self, d: Duration) -> String {
        self.routes
            .slow
            .as_deref()
            .unwrap_or("/")
            .replace("{ms}", &d.as_millis().to_string())
    }

    /// A request that takes long enough to be in flight at the signal and to finish well
    /// within the timeout.
    fn slow_ms(&self) -> Duration {
        (self.timeout / 2).min(Duration::from_millis(1500))
    }

    /// The bound for "cannot hold the drain": well before the deadline.
    fn hold_bound(&self) -> Duration {
        (Duration::from_secs(1) + self.slack).min(self.timeout * 3 / 4)
    }

    /// The latest any scenario waits for the server after a signal.
    fn last_wait(&self) -> Duration {
        self.timeout + self.slack + Duration::from_secs(2)
    }
}

/// How long after sending a request the signal is sent: the server has read it by then.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// A scenario's result.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What the client saw, in order.
    pub saw: Vec<String>,
    /// Why it failed (or was skipped).
    pub why: Vec<String>,
    pub figures: serde_json::Map<String, Value>,
    /// The exit, as code/signal text and ms after the (first) signal.
    pub exit: Option<(String, Option<f64>)>,
    pub took: Duration,
    /// The server's last output lines, on failure.
    pub server_output: String,
}

/// Collects what a scenario saw and what went wrong.
struct Judge {
    saw: Vec<String>,
    why: Vec<String>,
    figures: serde_json::Map<String, Value>,
    exit: Option<(String, Option<f64>)>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn since(t: Instant, t0: Instant) -> Duration {
    t.saturating_duration_since(t0)
}

fn show(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl Judge {
    fn new() -> Judge {
        Judge {
            saw: Vec::new(),
            why: Vec::new(),
            figures: serde_json::Map::new(),
            exit: None,
        }
    }

    fn saw(&mut self, s: impl Into<String>) {
        self.saw.push(s.into());
    }

    fn fail(&mut self, s: impl Into<String>) {
        self.why.push(s.into());
    }

    fn fig(&mut self, k: &str, v: impl Into<Value>) {
        self.figures.insert(k.into(), v.into());
    }

    fn fig_ms(&mut self, k: &str, d: Duration) {
        self.fig(k, ms(d));
    }

    /// Waits for the exit until `t0 + within`; records it; fails when it did not come,
    /// and when `clean` and the status is not 0.
    async fn exit(
        &mut self,
        srv: &Server,
        t0: Instant,
        within: Duration,
        clean: bool,
    ) -> Option<Exit> {
        let exit = srv.wait_exit(t0 + within).await;
        match exit {
            Some(e) => {
                let after = since(e.at, t0);
                self.fig_ms("exit_ms", after);
                self.fig("exit_code", e.code.map_or(Value::Null, Value::from));
                self.exit = Some((e.describe(), Some(ms(after))));
                // The wait may have started late (a client read blocked past the bound):
                // what counts is when the process exited, not when we looked.
                if after > within {
                    self.fail(format!(
                        "{} only {} after the signal (allowed: {})",
                        e.describe(),
                        show(after),
                        show(within)
                    ));
                }
                if clean && e.code != Some(0) {
                    self.fail(format!(
                        "{} ({} after the signal); a drain that cut nothing should exit 0",
                        e.describe(),
                        show(after)
                    ));
                }
            }
            None => {
                self.exit = Some(("running".into(), None));
                self.fail(format!("still running {} after the signal", show(within)));
            }
        }
        exit
    }

    fn outcome(self, name: &'static str, took: Duration, srv: Option<&Server>) -> Outcome {
        let verdict = if self.why.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        let server_output = match (verdict, srv) {
            (Verdict::Fail, Some(s)) => s.output.last_lines(8),
            _ => String::new(),
        };
        Outcome {
            name,
            verdict,
            saw: self.saw,
            why: self.why,
            figures: self.figures,
            exit: self.exit,
            took,
            server_output,
        }
    }
}

pub fn skipped(name: &'static str, why: String) -> Outcome {
    Outcome {
        name,
        verdict: Verdict::Skip,
        saw: Vec::new(),
        why: vec![why],
        figures: serde_json::Map::new(),
        exit: None,
        took: Duration::ZERO,
        server_output: String::new(),
    }
}

/// Runs one scenario on a fresh server, and always ends the server.
pub async fn run(name: &'static str, ctx: &Ctx) -> Outcome {
    let started = Instant::now();
    if let Some(need) = SCENARIOS
        .iter()
        .find(|s| s.0 == name)
        .and_then(|s| s.2.iter().find(|n| !ctx.has(**n)))
    {
        return skipped(
            name,
            match need {
                Need::Upgrade => {
                    "needs --upgrade-signal (the server's socket hand-over signal)".into()
                }
                _ => format!("no route for it: give {}", need.flag()),
            },
        );
    }
    if name == "second-signal" && ctx.timeout < SECOND_GAP + ctx.slack * 2 {
        return skipped(
            name,
            format!(
                "--timeout {} is too short to tell a second signal from the deadline",
                show(ctx.timeout)
            ),
        );
    }
    let prefix = if name == "fd-exhaustion" {
        format!("ulimit -n {} && ", ctx.fd_limit)
    } else {
        String::new()
    };
    let mut srv = match Server::start(&ctx.template, &prefix).await {
        Ok(s) => s,
        Err(e) => {
            let mut j = Judge::new();
            j.fail(e);
            return j.outcome(name, started.elapsed(), None);
        }
    };
    let target = Target {
        addr: srv.addr,
        tls: ctx.tls.clone(),
    };
    let mut j = Judge::new();
    let body = async {
        match name {
            "inflight" => inflight(ctx, &srv, &target, &mut j, Signal::TERM, true).await,
            "sigint" => inflight(ctx, &srv, &target, &mut j, Signal::INT, false).await,
            "refuse-new" => refuse_new(ctx, &srv, &target, &mut j).await,
            "idle" => idle(ctx, &srv, &target, &mut j).await,
            "exit-prompt" => exit_prompt(ctx, &srv, &target, &mut j).await,
            "silent" => silent(ctx, &srv, &target, &mut j).await,
            "slowloris" => slowloris(ctx, &srv, &target, &mut j).await,
            "deadline" => deadline(ctx, &srv, &target, &mut j, false).await,
            "second-signal" => deadline(ctx, &srv, &target, &mut j, true).await,
            "http2" => http2(ctx, &srv, &target, &mut j).await,
            "stream" => stream(ctx, &srv, &target, &mut j).await,
            "websocket" => websocket(ctx, &srv, &target, &mut j).await,
            "load" => load(ctx, &srv, &target, &mut j).await,
            "malformed" => malformed(ctx, &srv, &target, &mut j).await,
            "fd-exhaustion" => fd_exhaustion(ctx, &srv, &target, &mut j).await,
            "upgrade" => upgrade(ctx, &srv, &target, &mut j).await,
            _ => j.fail(format!("unknown scenario {name}")),
        }
    };
    // A scenario never runs longer than this, whatever the server does.
    let bound = ctx.last_wait() * 2 + ctx.upgrade_wait + Duration::from_secs(20);
    if tokio::time::timeout(bound, body).await.is_err() {
        j.fail(format!(
            "the scenario itself did not finish within {}",
            show(bound)
        ));
    }
    let outcome = j.outcome(name, started.elapsed(), Some(&srv));
    srv.kill().await;
    outcome
}

/// A connection that has made one successful request (so it is not new), or the failure.
async fn warm(ctx: &Ctx, t: &Target, j: &mut Judge) -> Option<H1> {
    let mut c = match H1::connect(t).await {
        Ok(c) => c,
        Err(e) => {
            j.fail(format!("could not connect: {}", e.kind));
            return None;
        }
    };
    if ctx.routes.root.is_none() {
        return Some(c);
    }
    match c.get(ctx.root(), Duration::from_secs(5)).await {
        Ok(r) if r.status < 500 && !r.closes() => Some(c),
        Ok(r) if r.status < 500 => H1::connect(t).await.ok(),
        Ok(r) => {
            j.fail(format!(
                "GET {} answered {} before any signal",
                ctx.root(),
                r.status
            ));
            None
        }
        Err(e) => {
            j.fail(format!("GET {} before any signal: {e}", ctx.root()));
            None
        }
    }
}

/// In-flight request, then `sig`: it completes (with `Connection: close` when `want_close`),
/// the connection closes, the process exits 0 promptly.
async fn inflight(
    ctx: &Ctx,
    srv: &Server,
    t: &Target,
    j: &mut Judge,
    sig: Signal,
    want_close: bool,
) {
    let Some(mut c) = warm(ctx, t, j).await else {
        return;
    };
    let path = ctx.slow(ctx.slow_ms());
    if let Err(e) = c.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(sig);
    let name = if sig == Signal::INT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    j.saw(format!("GET {path} in flight, {name}"));
    match c.read_response(t0 + ctx.last_wait()).await {
        Ok(r) => {
            let after = since(r.done, t0);
            j.fig_ms("response_ms", after);
            j.fig("status", r.status);
            j.saw(format!(
                "{} after {}{}",
                r.status,
                show(after),
                if r.closes() {
                    " with Connection: close"
                } else {
                    " (keep-alive)"
                }
            ));
            if !r.ok() {
                j.fail(format!("answered {}", r.status));
            }
            if want_close && !r.closes() {
                j.fail("no Connection: close on the response: the client may send another request on a connection about to close");
            }
            match c.wait_closed(r.done + ctx.slack).await {
                Closed::Eof(at) | Closed::Reset(at) => {
                    j.saw(format!("closed {} later", show(since(at, r.done))))
                }
                Closed::Data => j.fail("unexpected bytes after the response"),
                Closed::Open => j.fail(format!(
                    "the connection was still open {} after the response",
                    show(ctx.slack)
                )),
            }
            j.exit(srv, t0, after + ctx.slack, true).await;
        }
        Err(e) => {
            j.saw(format!("{e} after {}", show(since(e.at, t0))));
            j.fail(format!("the in-flight request was not answered: {e}"));
            j.exit(srv, t0, ctx.last_wait(), true).await;
        }
    }
}

/// A slow request holds the server while new connections are tried every 20 ms.
async fn refuse_new(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let Some(mut hold) = warm(ctx, t, j).await else {
        return;
    };
    let path = ctx.slow(ctx.slow_ms());
    if let Err(e) = hold.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw(format!("GET {path} in flight, SIGTERM"));
    // The signal handler needs a moment to run: a connection opened within this of the
    // signal may still be served; later ones must not be.
    let grace = ctx.slack / 2;
    let mut answered = Vec::new();
    let mut early = 0;
    let mut unanswered = 0;
    let mut refused_at = None;
    while since(Instant::now(), t0) < ctx.slack * 2 {
        let tried = Instant::now();
        match H1::connect(t).await {
            Err(e) if e.kind == Kind::Refused => {
                refused_at = Some(e.at);
                break;
            }
            Err(_) => unanswered += 1,
            Ok(mut c) => match c.get(ctx.root(), Duration::from_secs(1)).await {
                Ok(_) if since(tried, t0) <= grace => early += 1,
                Ok(r) => answered.push((r.status, since(tried, t0))),
                Err(e) if e.kind == Kind::Timeout => {
                    j.fail(format!(
                        "a new connection {} after the signal was accepted and left unanswered",
                        show(since(tried, t0))
                    ));
                    break;
                }
                Err(_) => unanswered += 1,
            },
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if early > 0 {
        j.saw(format!(
            "{early} served within {} of the signal",
            show(grace)
        ));
    }
    if let Some((status, after)) = answered.first() {
        j.saw(format!(
            "a new connection opened {} after the signal answered {status}",
            show(*after)
        ));
        j.fail(format!(
            "{} new connections were served while draining",
            answered.len()
        ));
    }
    if unanswered > 0 {
        j.saw(format!("{unanswered} accepted and closed unanswered"));
    }
    match refused_at {
        Some(at) => {
            let after = since(at, t0);
            j.fig_ms("refused_ms", after);
            j.saw(format!(
                "new connections refused from {} after the signal",
                show(after)
            ));
            if after > ctx.slack {
                j.fail(format!("refused only after {}", show(after)));
            }
        }
        None => j.fail(format!(
            "new connections were still accepted {} after the signal",
            show(ctx.slack * 2)
        )),
    }
    match hold.read_response(t0 + ctx.last_wait()).await {
        Ok(r) => j.saw(format!(
            "the held request: {} after {}",
            r.status,
            show(since(r.done, t0))
        )),
        Err(e) => j.fail(format!("the held request was not answered: {e}")),
    }
    j.exit(srv, t0, ctx.last_wait(), true).await;
}

/// Three idle keep-alive connections and one slow request: the idle ones close at once.
async fn idle(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let mut idle = Vec::new();
    for _ in 0..3 {
        match warm(ctx, t, j).await {
            Some(c) => idle.push(c),
            None => return,
        }
    }
    let Some(mut hold) = warm(ctx, t, j).await else {
        return;
    };
    let path = ctx.slow(ctx.slow_ms());
    if let Err(e) = hold.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw(format!(
        "3 idle keep-alive connections and GET {path} in flight, SIGTERM"
    ));
    let until = t0 + ctx.last_wait();
    let (closed, held) = tokio::join!(
        futures_util::future::join_all(idle.iter_mut().map(|c| c.wait_closed(until))),
        hold.read_response(until)
    );
    let mut times = Vec::new();
    for c in &closed {
        match c {
            Closed::Eof(at) | Closed::Reset(at) => times.push(since(*at, t0)),
            Closed::Data => j.fail("an idle connection received unexpected bytes"),
            Closed::Open => j.fail(format!(
                "an idle connection was still open {} after the signal",
                show(ctx.last_wait())
            )),
        }
    }
    if !times.is_empty() {
        let list: Vec<String> = times.iter().map(|d| d.as_millis().to_string()).collect();
        j.saw(format!(
            "idle connections closed {} ms after the signal",
            list.join("/")
        ));
        let worst = *times.iter().max().unwrap_or(&Duration::ZERO);
        j.fig_ms("idle_closed_ms", worst);
        if worst > ctx.slack {
            j.fail(format!(
                "an idle connection stayed open {} into the drain (allowed: {})",
                show(worst),
                show(ctx.slack)
            ));
        }
    }
    match held {
        Ok(r) => j.saw(format!(
            "the request: {} after {}",
            r.status,
            show(since(r.done, t0))
        )),
        Err(e) => j.fail(format!("the in-flight request was not answered: {e}")),
    }
    j.exit(srv, t0, ctx.last_wait(), true).await;
}

/// One slow request; the process must exit within the slack of its response.
async fn exit_prompt(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let Some(mut c) = warm(ctx, t, j).await else {
        return;
    };
    let path = ctx.slow(ctx.slow_ms());
    if let Err(e) = c.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw(format!("GET {path} in flight, SIGTERM"));
    let last = match c.read_response(t0 + ctx.last_wait()).await {
        Ok(r) => {
            j.saw(format!("{} after {}", r.status, show(since(r.done, t0))));
            r.done
        }
        Err(e) => {
            j.fail(format!("the in-flight request was not answered: {e}"));
            e.at
        }
    };
    drop(c);
    if let Some(e) = j.exit(srv, t0, ctx.last_wait(), true).await {
        let gap = since(e.at, last);
        j.fig_ms("exit_after_last_response_ms", gap);
        j.saw(format!(
            "{} {} after the last response",
            e.describe(),
            show(gap)
        ));
        if gap > ctx.slack {
            j.fail(format!(
                "exited {} after the last response (allowed: {})",
                show(gap),
                show(ctx.slack)
            ));
        }
    }
}

/// A client connected for 400 ms that has sent nothing: the drain must not wait for it.
async fn silent(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let mut s = match t.tcp().await {
        Ok(s) => s,
        Err(e) => return j.fail(format!("could not connect: {}", e.kind)),
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw("a connection silent for 400 ms, SIGTERM");
    let bound = ctx.hold_bound();
    let closed = async {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(ctx.last_wait(), s.read(&mut b)).await;
        (Instant::now(), r.is_ok())
    };
    let (exit, (closed_at, was_closed)) = tokio::join!(srv.wait_exit(t0 + ctx.last_wait()), closed);
    if was_closed {
        j.saw(format!(
            "closed {} after the signal",
            show(since(closed_at, t0))
        ));
    }
    hold_verdict(j, exit, t0, bound, "the silent connection");
}

/// Judges "cannot hold the drain": a clean exit within `bound` of the signal.
fn hold_verdict(j: &mut Judge, exit: Option<Exit>, t0: Instant, bound: Duration, what: &str) {
    match exit {
        Some(e) => {
            let after = since(e.at, t0);
            j.fig_ms("exit_ms", after);
            j.fig("exit_code", e.code.map_or(Value::Null, Value::from));
            j.exit = Some((e.describe(), Some(ms(after))));
            j.saw(format!("{} after {}", e.describe(), show(after)));
            if after > bound {
                j.fail(format!(
                    "{what} held the drain: exit after {} (allowed: {})",
                    show(after),
                    show(bound)
                ));
            } else if e.code != Some(0) {
                j.fail(format!(
                    "{}: a drain that cut nothing should exit 0",
                    e.describe()
                ));
            }
        }
        None => {
            j.exit = Some(("running".into(), None));
            j.fail(format!("{what} held the drain: the server never exited"));
        }
    }
}

/// A request head sent one byte every 100 ms, never finished.
async fn slowloris(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let s = match t.connect(Alpn::Http1).await {
        Ok(s) => s,
        Err(e) => return j.fail(format!("could not connect: {}", e.kind)),
    };
    let (mut rd, mut wr) = tokio::io::split(s);
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: grace-check\r\nX-Slow: ",
        ctx.root(),
        t.authority()
    );
    if wr.write_all(head.as_bytes()).await.is_err() {
        return j.fail("the connection closed before the slow head began");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let dribble = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if wr.write_all(b"a").await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw("a request head dribbled a byte per 100 ms, SIGTERM");
    let closed = async {
        let mut b = [0u8; 512];
        let r = tokio::time::timeout(ctx.last_wait(), async {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(String::from_utf8_lossy(&b[..n]).into_owned()),
            }
        })
        .await;
        (Instant::now(), r)
    };
    let (exit, (closed_at, read)) = tokio::join!(srv.wait_exit(t0 + ctx.last_wait()), closed);
    stop.store(true, Ordering::Relaxed);
    dribble.abort();
    match read {
        Ok(Some(text)) => j.saw(format!(
            "answered {:?} {} after the signal",
            text.lines().next().unwrap_or_default(),
            show(since(closed_at, t0))
        )),
        Ok(None) => j.saw(format!(
            "closed {} after the signal",
            show(since(closed_at, t0))
        )),
        Err(_) => {}
    }
    hold_verdict(j, exit, t0, ctx.hold_bound(), "the slow client");
}

const SECOND_GAP: Duration = Duration::from_millis(300);

/// A request longer than the timeout: the deadline (or a second signal) must cut it.
async fn deadline(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge, second: bool) {
    let Some(mut c) = warm(ctx, t, j).await else {
        return;
    };
    let path = ctx.slow(ctx.timeout + Duration::from_secs(5));
    if let Err(e) = c.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(Signal::TERM);
    let (t_force, bound, earliest) = if second {
        tokio::time::sleep(SECOND_GAP).await;
        let t1 = srv.signal(Signal::TERM);
        j.saw(format!(
            "GET {path} in flight, SIGTERM, SIGTERM again {} later",
            show(since(t1, t0))
        ));
        (t1, ctx.slack, Duration::ZERO)
    } else {
        j.saw(format!(
            "GET {path} in flight (longer than the timeout), SIGTERM"
        ));
        // grace forces at the timeout less what it keeps for closing resources (at most
        // half); anything earlier is not waiting for the request.
        (
            t0,
            ctx.timeout + ctx.slack,
            (ctx.timeout / 2).saturating_sub(ctx.slack),
        )
    };
    let cut_at = match c
        .read_response(t0 + ctx.last_wait() + Duration::from_secs(3))
        .await
    {
        Ok(r) => {
            let after = since(r.done, t0);
            j.saw(format!("{} after {}", r.status, show(after)));
            j.fail(format!(
                "nothing forced the request: it ran to its end {} after the signal, past the {} timeout",
                show(after),
                show(ctx.timeout)
            ));
            None
        }
        Err(e) if e.kind == Kind::Timeout => {
            j.fail("the request was never cut");
            None
        }
        Err(e) => {
            let after = since(e.at, t0);
            j.fig_ms("cut_ms", after);
            j.saw(format!(
                "cut ({}) {} after the first signal",
                e.kind,
                show(after)
            ));
            Some(after)
        }
    };
    let exit = j.exit(srv, t_force, bound, false).await;
    if let Some(e) = exit {
        if !second && e.code == Some(0) {
            j.saw("exit 0 although a request was cut");
        }
    }
    if let Some(cut) = cut_at {
        if cut < earliest {
            j.fail(format!(
                "cut after only {}: the drain should wait for the request until (about) the timeout, {}",
                show(cut),
                show(ctx.timeout)
            ));
        }
    }
}

const NO_H2C: &str = "no HTTP/2 with prior knowledge: the server answered the preface in HTTP/1";

fn http1_only(log: &Mutex<TapLog>) -> bool {
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .first
        .starts_with(b"HTTP/")
}

/// HTTP/2 (prior knowledge, or ALPN h2 over TLS): a stream open at the signal.
async fn http2(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let s = match t.connect(Alpn::H2).await {
        Ok(s) => s,
        Err(e) => return j.fail(format!("could not connect: {}", e.kind)),
    };
    let log = Arc::new(Mutex::new(TapLog::default()));
    let tap = crate::client::tap(s, Arc::clone(&log));
    let (client, conn) =
        match tokio::time::timeout(Duration::from_secs(3), h2::client::handshake(tap)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return j.fail(format!("no HTTP/2: {e}")),
            Err(_) => return j.fail("no HTTP/2: the handshake got no answer"),
        };
    let conn_task = tokio::spawn(async move {
        let r = conn.await;
        (Instant::now(), r.err().map(|e| e.to_string()))
    });
    let path = ctx.slow(ctx.slow_ms());
    let uri = format!("{}://{}{}", t.scheme(), t.authority(), path);
    let req = match http::Request::get(&uri).body(()) {
        Ok(r) => r,
        Err(e) => return j.fail(format!("bad request URI {uri}: {e}")),
    };
    let ready = tokio::time::timeout(Duration::from_secs(3), client.ready()).await;
    let mut client = match ready {
        Ok(Ok(c)) => c,
        _ if http1_only(&log) => {
            j.saw("the HTTP/2 preface was answered in HTTP/1");
            return j.fail(NO_H2C);
        }
        _ => return j.fail("no HTTP/2: the connection never became ready"),
    };
    let (resp, _) = match client.send_request(req, true) {
        Ok(x) => x,
        Err(e) => return j.fail(format!("HTTP/2 request: {e}")),
    };
    tokio::time::sleep(SETTLE).await;
    let t0 = srv.signal(Signal::TERM);
    j.saw(format!("stream 1 GET {path} open, SIGTERM"));
    let until = t0 + ctx.last_wait();
    let answer = tokio::time::timeout_at(until.into(), async {
        let resp = resp.await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut n = 0usize;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("{status} cut after {n} bytes: {e}"))?;
            n += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Ok::<_, String>((status, n, Instant::now()))
    })
    .await;
    let done = match answer {
        Ok(Ok((status, n, at))) => {
            j.saw(format!(
                "{status} ({n} bytes) after {}",
                show(since(at, t0))
            ));
            j.fig("status", status);
            if !(200..300).contains(&status) {
                j.fail(format!("the open stream was answered {status}"));
            }
            at
        }
        Ok(Err(e)) => {
            j.fail(format!("the open stream did not finish: {e}"));
            Instant::now()
        }
        Err(_) => {
            j.fail("the open stream got no answer");
            Instant::now()
        }
    };
    drop(client);
    if http1_only(&log) {
        j.why = vec![NO_H2C.into()];
        j.saw("the HTTP/2 preface was answered in HTTP/1");
        j.exit(srv, t0, ctx.last_wait(), true).await;
        return;
    }
    let closed = tokio::time::timeout_at((done + ctx.slack).into(), conn_task).await;
    let goaways = log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .goaways
        .clone();
    let list: Vec<String> = goaways
        .iter()
        .map(|g| {
            let id = if g.last_stream_id == 0x7fff_ffff {
                "2^31-1".to_string()
            } else {
                g.last_stream_id.to_string()
            };
            let code = if g.error_code == 0 {
                String::new()
            } else {
                format!(", error {}", g.error_code)
            };
            format!("GOAWAY({id}{code}) at {}", show(since(g.at, t0)))
        })
        .collect();
    j.fig(
        "goaways",
        goaways.iter().map(|g| g.last_stream_id).collect::<Vec<_>>(),
    );
    if list.is_empty() {
        j.fail("no GOAWAY: the client cannot tell the connection is going away");
    } else {
        j.saw(list.join(", "));
        if goaways[0].last_stream_id != 0x7fff_ffff {
            j.fail("the first GOAWAY was not 2^31-1: a request racing it is refused (RFC 9113 §6.8 asks for two steps)");
        } else if goaways.len() < 2 {
            j.fail("only GOAWAY(2^31-1): no final GOAWAY with the last stream id");
        }
        if let Some(last) = goaways.last() {
            if last.last_stream_id < 1 {
                j.fail("the last GOAWAY excludes the open stream");
            }
        }
        if goaways.iter().any(|g| g.error_code != 0) {
            j.fail("a GOAWAY carried an error code");
        }
    }
    match closed {
        Ok(Ok((at, _))) => j.saw(format!(
            "connection closed {} after the response",
            show(since(at, done))
        )),
        _ => j.fail(format!(
            "the connection was still open {} after the response",
            show(ctx.slack)
        )),
    }
    j.exit(srv, t0, since(done, t0) + ctx.slack, true).await;
}

/// A chunked stream running at the signal: it completes, and bytes keep coming after it.
async fn stream(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    // Long enough to run well past the signal, short enough to end before the deadline.
    let n = (ctx.timeout.as_millis() / 100)
        .saturating_sub(5)
        .clamp(8, 20);
    let path = ctx
        .routes
        .stream
        .as_deref()
        .unwrap_or_default()
        .replace("{n}", &n.to_string());
    let Some(mut c) = warm(ctx, t, j).await else {
        return;
    };
    if let Err(e) = c.send_get(&path, false).await {
        return j.fail(format!("sending GET {path}: {e}"));
    }
    let sent = Instant::now();
    let t0 = Arc::new(OnceLock::new());
    let signal = {
        let t0 = Arc::clone(&t0);
        async move {
            tokio::time::sleep(SETTLE).await;
            let _ = t0.set(srv.signal(Signal::TERM));
        }
    };
    let (resp, ()) = tokio::join!(c.read_response(sent + SETTLE + ctx.last_wait()), signal);
    let t0 = *t0.get().unwrap_or(&sent);
    j.saw(format!("GET {path} streaming, SIGTERM"));
    match resp {
        Ok(r) => {
            let after = r.bytes_after(t0);
            let before = r.arrivals.iter().map(|a| a.1).sum::<usize>() - after;
            j.fig("bytes_after_signal", after);
            j.saw(format!(
                "{} complete after {} ({} bytes of body; on the wire {before} bytes before the signal, {after} after)",
                r.status,
                show(since(r.done, t0)),
                r.body.len(),
            ));
            if !r.ok() {
                j.fail(format!("answered {}", r.status));
            }
            if after == 0 {
                j.fail("nothing arrived after the signal: the stream was too short to tell");
            }
            j.exit(srv, t0, since(r.done, t0) + ctx.slack, true).await;
        }
        Err(e) => {
            j.saw(format!("{e} {} after the signal", show(since(e.at, t0))));
            j.fail(format!("the stream did not complete: {e}"));
            j.exit(srv, t0, ctx.last_wait(), true).await;
        }
    }
}

/// An open WebSocket at the signal: it must get a close frame.
async fn websocket(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let path = ctx.routes.ws.clone().unwrap_or_default();
    let s = match t.connect(Alpn::Http1).await {
        Ok(s) => s,
        Err(e) => return j.fail(format!("could not connect: {}", e.kind)),
    };
    let url = format!("ws://{}{}", t.authority(), path);
    let mut ws = match tokio::time::timeout(
        Duration::from_secs(3),
        tokio_tungstenite::client_async(url.as_str(), s),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => return j.fail(format!("WebSocket handshake on {path}: {e}")),
        Err(_) => return j.fail(format!("WebSocket handshake on {path}: no answer")),
    };
    let _ = ws.send(Message::text("grace-check")).await;
    let echoed = matches!(
        tokio::time::timeout(Duration::from_millis(500), ws.next()).await,
        Ok(Some(Ok(Message::Text(_))))
    );
    let t0 = srv.signal(Signal::TERM);
    j.saw(format!(
        "WebSocket open{}, SIGTERM",
        if echoed { " (echoing)" } else { "" }
    ));
    let until = t0 + ctx.last_wait();
    let mut close = None;
    let ended = loop {
        match tokio::time::timeout_at(until.into(), ws.next()).await {
            Err(_) => break None,
            Ok(Some(Ok(Message::Close(frame)))) => {
                close = Some((
                    Instant::now(),
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                ));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => break Some(Instant::now()),
        }
    };
    match &close {
        Some((at, frame)) => {
            let after = since(*at, t0);
            j.fig_ms("close_frame_ms", after);
            let code = match frame {
                Some((code, reason)) => {
                    j.fig("close_code", *code);
                    format!("{code} {reason:?}")
                }
                None => "without a code".into(),
            };
            j.saw(format!(
                "close frame {code} {} after the signal",
                show(after)
            ));
        }
        None => j.fail(match ended {
            Some(at) => format!(
                "the connection ended {} after the signal without a close frame",
                show(since(at, t0))
            ),
            None => "no close frame, and the connection stayed open".into(),
        }),
    }
    let last = close.as_ref().map_or(t0, |c| c.0);
    j.exit(srv, t0, since(last, t0) + ctx.slack, true).await;
}

#[derive(Default)]
struct LoadCounts {
    answered_before: AtomicUsize,
    answered_after: AtomicUsize,
    retried: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// Eight keep-alive clients (half on a 1 s slow route, so each has a request 700 ms old in
/// flight at the signal) through the signal.
async fn load(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let counts = Arc::new(LoadCounts::default());
    let t0: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let stop_at = Arc::new(OnceLock::<Instant>::new());
    let mut workers = Vec::new();
    for i in 0..8 {
        let path = if i % 2 == 1 && ctx.routes.slow.is_some() {
            ctx.slow(Duration::from_millis(1000))
        } else {
            ctx.root().to_owned()
        };
        let (t, counts, t0, stop_at) = (
            t.clone(),
            Arc::clone(&counts),
            Arc::clone(&t0),
            Arc::clone(&stop_at),
        );
        let wait = ctx.last_wait();
        workers.push(tokio::spawn(async move {
            let mut conn: Option<H1> = None;
            let mut retrying = false;
            loop {
                if stop_at.get().is_some_and(|s| Instant::now() > *s) {
                    return;
                }
                let signalled = t0.get().copied();
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match H1::connect(&t).await {
                        Ok(c) => c,
                        Err(e) => {
                            if signalled.is_some() {
                                counts.refused.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                push(&counts, format!("connect before the signal: {}", e.kind));
                            }
                            return;
                        }
                    },
                };
                let sent = Instant::now();
                if c.send_get(&path, false).await.is_err() {
                    // Nothing was read: as unanswered below.
                }
                match c.read_response(sent + wait).await {
                    Ok(r) => {
                        if r.status >= 500 {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            push(&counts, format!("GET {path}: {}", r.status));
                        } else if t0.get().is_some_and(|t0| sent >= *t0) {
                            counts.answered_after.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counts.answered_before.fetch_add(1, Ordering::Relaxed);
                        }
                        retrying = false;
                        if !r.closes() {
                            conn = Some(c);
                        }
                        // A steady load, not a flood that starves the machine.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) if e.unanswered() => {
                        // Sent 250 ms or more before the signal, the server had it: dropping
                        // it is a failure. Otherwise HTTP lets a client retry a GET that got nothing
                        // (RFC 9110 §9.2.2) — once.
                        let before = match t0.get() {
                            None => true,
                            Some(t0) => sent + Duration::from_millis(250) < *t0,
                        };
                        if before || retrying {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            push(
                                &counts,
                                format!(
                                    "GET {path}: {e}{}",
                                    if before {
                                        " (sent before the signal)"
                                    } else {
                                        " (after a retry)"
                                    }
                                ),
                            );
                            retrying = false;
                        } else {
                            counts.retried.fetch_add(1, Ordering::Relaxed);
                            retrying = true;
                        }
                    }
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        push(&counts, format!("GET {path}: {e}"));
                        retrying = false;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The signal's time is known to the workers before the signal is sent: a worker that
    // sees its connection closed by the drain never takes it for a failure before it.
    let sig = Instant::now();
    let _ = t0.set(sig);
    let _ = stop_at.set(sig + ctx.last_wait());
    srv.signal(Signal::TERM);
    for w in workers {
        let _ = w.await;
    }
    let c = &counts;
    let (b, a, r, f, x) = (
        c.answered_before.load(Ordering::Relaxed),
        c.answered_after.load(Ordering::Relaxed),
        c.retried.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    );
    j.fig("answered", b + a);
    j.fig("answered_after_signal", a);
    j.fig("retried", r);
    j.fig("refused_after_signal", f);
    j.fig("failed", x);
    j.saw(format!(
        "8 clients, SIGTERM after 700 ms: {} answered ({a} sent after the signal), {r} retried (unanswered GET), {f} refused after the signal, {x} failed",
        b + a
    ));
    if x > 0 {
        let list = c.failures.lock().unwrap_or_else(|e| e.into_inner());
        j.fail(format!(
            "{x} failed: {}",
            list.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ));
    }
    if b == 0 {
        j.fail("nothing was answered before the signal");
    }
    j.exit(srv, sig, ctx.last_wait(), true).await;
}

fn push(c: &LoadCounts, s: String) {
    c.failures.lock().unwrap_or_else(|e| e.into_inner()).push(s);
}

/// A request with a header line that has no colon.
async fn malformed(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let mut c = match H1::connect(t).await {
        Ok(c) => c,
        Err(e) => return j.fail(format!("could not connect: {}", e.kind)),
    };
    let bad = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nthis header line has no colon\r\n\r\n",
        ctx.root(),
        t.authority()
    );
    let _ = c.send(bad.as_bytes()).await;
    match c
        .read_response(Instant::now() + Duration::from_secs(3))
        .await
    {
        Ok(r) if (400..500).contains(&r.status) => {
            j.saw(format!("malformed request: {}", r.status))
        }
        Ok(r) => {
            j.saw(format!("malformed request: {}", r.status));
            j.fail(format!("a malformed request was answered {}", r.status));
        }
        Err(e) if e.kind == Kind::Timeout => {
            j.fail("a malformed request was neither answered nor closed within 3 s")
        }
        Err(e) => j.saw(format!("malformed request: {e}")),
    }
    drop(c);
    // A server that dies of it takes a moment to.
    tokio::time::sleep(Duration::from_millis(100)).await;
    match H1::connect(t).await {
        Ok(mut c) => match c.get(ctx.root(), Duration::from_secs(3)).await {
            Ok(r) if r.status < 500 => j.saw(format!("then GET {}: {}", ctx.root(), r.status)),
            Ok(r) => j.fail(format!(
                "after it, GET {} answered {}",
                ctx.root(),
                r.status
            )),
            Err(e) => j.fail(format!("after it, GET {}: {e}", ctx.root())),
        },
        Err(e) => j.fail(format!("after it, a new connection: {}", e.kind)),
    }
    if let Some(e) = srv.exited() {
        j.exit = Some((e.describe(), None));
        return j.fail(format!(
            "the server ended after the malformed request ({})",
            e.describe()
        ));
    }
    let t0 = srv.signal(Signal::TERM);
    j.saw("SIGTERM");
    let exit = srv.wait_exit(t0 + ctx.last_wait()).await;
    hold_verdict(j, exit, t0, ctx.hold_bound(), "the drain");
}

/// Under `ulimit -n`: more connections than descriptors.
async fn fd_exhaustion(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let n = ctx.fd_limit as usize * 2;
    let root = ctx.root().to_owned();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (t, root) = (t.clone(), root.clone());
            tokio::spawn(async move {
                let mut c = H1::connect(&t).await.ok()?;
                let r = c.get(&root, Duration::from_secs(2)).await;
                Some((c, r.is_ok_and(|r| r.status < 500)))
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut answered = 0;
    let mut not = 0;
    for task in tasks {
        match task.await {
            Ok(Some((c, ok))) => {
                answered += usize::from(ok);
                not += usize::from(!ok);
                held.push(c);
            }
            _ => not += 1,
        }
    }
    let mut shed = 0;
    for c in held.iter_mut() {
        if c.is_closed().await {
            shed += 1;
        }
    }
    j.fig("connections", n);
    j.fig("answered", answered);
    j.fig("unanswered", not);
    j.saw(format!(
        "ulimit -n {}: {n} connections, {answered} answered, {not} not{}",
        ctx.fd_limit,
        if shed > 0 {
            format!(", {shed} closed by the server")
        } else {
            String::new()
        }
    ));
    if not == 0 && shed == 0 {
        j.fail(format!(
            "never ran out of descriptors with {n} connections (is the limit applied? --fd-limit)"
        ));
    }
    // While they are held: CPU over one second, and a fresh request.
    let cpu0 = srv.cpu_time();
    let w0 = Instant::now();
    let fresh = async {
        let mut c = H1::connect(t).await.ok()?;
        c.get(&root, Duration::from_millis(900)).await.ok()
    };
    let (fresh, ()) = tokio::join!(fresh, tokio::time::sleep(Duration::from_secs(1)));
    let cpu = srv.cpu_time().saturating_sub(cpu0).as_secs_f64() / w0.elapsed().as_secs_f64();
    j.fig("cpu_while_exhausted", (cpu * 100.0).round() / 100.0);
    j.saw(format!(
        "CPU {:.0}% of a core while held; a fresh request meanwhile: {}",
        cpu * 100.0,
        match &fresh {
            Some(r) => r.status.to_string(),
            None => "no answer".into(),
        }
    ));
    if cpu > 0.25 {
        j.fail(format!(
            "the server spins while out of descriptors: {:.0}% of a core",
            cpu * 100.0
        ));
    }
    drop(held);
    let released = Instant::now();
    let until = released + Duration::from_secs(2) + ctx.slack;
    let mut after = None;
    while Instant::now() < until {
        if let Ok(mut c) = H1::connect(t).await {
            if let Ok(r) = c.get(&root, Duration::from_secs(1)).await {
                after = Some((r.status, since(r.done, released)));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match after {
        Some((status, d)) if status < 500 => {
            j.fig_ms("answered_after_release_ms", d);
            j.saw(format!("released: GET {root} {status} after {}", show(d)));
        }
        Some((status, _)) => j.fail(format!("after release, GET {root} answered {status}")),
        None => j.fail(format!(
            "after release, GET {root} was not answered within {}",
            show(until - released)
        )),
    }
    let t0 = srv.signal(Signal::TERM);
    let exit = srv.wait_exit(t0 + ctx.last_wait()).await;
    hold_verdict(j, exit, t0, ctx.hold_bound(), "the drain");
}

/// Fresh connections without pause while the upgrade signal hands the socket over.
async fn upgrade(ctx: &Ctx, srv: &Server, t: &Target, j: &mut Judge) {
    let Some(sig) = ctx.upgrade_signal else {
        return;
    };
    let counts = Arc::new(LoadCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let exited_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (t, counts, stop, exited_at) = (
            t.clone(),
            Arc::clone(&counts),
            Arc::clone(&stop),
            Arc::clone(&exited_at),
        );
        let root = ctx.root().to_owned();
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut c = match H1::connect(&t).await {
                    Ok(c) => c,
                    Err(e) => {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                        push(&counts, format!("connect: {}", e.kind));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                let _ = c.send_get(&root, true).await;
                match c
                    .read_response(Instant::now() + Duration::from_secs(5))
                    .await
                {
                    Ok(r) if r.status < 500 => {
                        if exited_at.get().is_some() {
                            counts.answered_after.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counts.answered_before.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(r) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        push(&counts, format!("GET {root}: {}", r.status));
                    }
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        push(&counts, format!("GET {root}: {e}"));
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = srv.signal(sig);
    let exit = srv.wait_exit(t0 + ctx.upgrade_wait).await;
    if let Some(e) = exit {
        let _ = exited_at.set(e.at);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let c = &counts;
    let (b, a, f, x) = (
        c.answered_before.load(Ordering::Relaxed),
        c.answered_after.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    );
    j.fig("answered", a + b);
    j.fig("answered_after_old_exit", a);
    j.fig("refused", f);
    j.fig("failed", x);
    j.saw(format!(
        "4 clients on fresh connections, {} after 300 ms",
        ctx.upgrade_signal_name
    ));
    match exit {
        Some(e) => {
            let after = since(e.at, t0);
            j.fig_ms("old_exit_ms", after);
            j.exit = Some((e.describe(), Some(ms(after))));
            j.saw(format!(
                "old process {} {} after the signal",
                e.describe(),
                show(after)
            ));
            if e.code != Some(0) {
                j.fail(format!("the old process: {}", e.describe()));
            }
        }
        None => {
            j.exit = Some(("running".into(), None));
            j.fail(format!(
                "the old process still ran {} after the signal",
                show(ctx.upgrade_wait)
            ));
        }
    }
    j.saw(format!(
        "{} answered ({a} after the old one exited), {f} refused, {x} failed",
        a + b
    ));
    if f > 0 || x > 0 {
        let list = c.failures.lock().unwrap_or_else(|e| e.into_inner());
        j.fail(format!(
            "{f} refused and {x} failed during the hand-over: {}",
            list.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ));
    }
    if exit.is_some() && a == 0 {
        j.fail("nothing answered after the old process exited");
    }
    // The new generation (adopted by us when the old one exited): it must serve, then stop.
    let new = crate::proc::orphans(srv.pid);
    if exit.is_some() {
        if new.is_empty() {
            j.fail("no new process is left running");
        } else {
            j.saw(format!("new process {} serving", new[0].pid));
        }
    }
    for p in new {
        if let Some(pid) = rustix::process::Pid::from_raw(p.pid) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        let _ =
            tokio::task::spawn_blocking(move || crate::proc::reap(p.pid, Duration::from_secs(5)))
                .await;
    }
}
