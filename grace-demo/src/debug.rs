//! Watching the server: `GET /metrics` (Prometheus text), `GET /debug/conns` (every live
//! connection as JSON), and `GET /debug`, a page that shows the counts and the connections
//! changing live, fed by `GET /debug/events` (server-sent events). All four are served on
//! `--admin-listen` when it is given (a listener with a service of its own:
//! `Serve::also_serve`), and then no longer on `--listen`.
//!
//! The live page is woken by the server's connection-state hook
//! ([`Server::on_conn_state`](grace_http::Server::on_conn_state)): each change bumps a
//! `watch` channel (one atomic load when nobody watches), and each open page gets a fresh
//! snapshot at most every 100 ms, plus one a second so ages move. During a drain its stream
//! stays open while other connections remain, so you watch them leave; once only pages are
//! left it says goodbye and ends, and the drain completes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream;
use grace_http::{ConnInfo, ConnSnapshot, ConnState, Handle};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

/// The path of the live page's event stream: connections serving it do not hold a drain.
const EVENTS_PATH: &str = "/debug/events";
/// At most this many connections in each live update (the counts stay exact).
const LIVE_ROWS: usize = 200;
/// Updates are coalesced: at most one per this interval.
const COALESCE: Duration = Duration::from_millis(100);
/// With no change, a fresh snapshot this often (ages move).
const REFRESH: Duration = Duration::from_secs(1);

/// The Prometheus recorder and the channel that wakes the live pages.
pub struct Observer {
    prometheus: PrometheusHandle,
    changes: Arc<watch::Sender<u64>>,
}

#[derive(Clone)]
struct Ctx {
    handle: Handle,
    prometheus: PrometheusHandle,
    changes: Arc<watch::Sender<u64>>,
}

impl Observer {
    /// Installs the process's `metrics` recorder (Prometheus, rendered by `GET /metrics`;
    /// no listener of its own). Drains and upgrades are histograms with these buckets.
    pub fn install() -> anyhow::Result<Observer> {
        let seconds = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
            .install_recorder()?;
        Ok(Observer {
            prometheus,
            changes: Arc::new(watch::Sender::new(0)),
        })
    }

    /// For [`Server::on_conn_state`](grace_http::Server::on_conn_state): tells the open live
    /// pages that something changed (nothing to do when none is open).
    pub fn hook(&self) -> impl Fn(&ConnInfo, ConnState) + Send + Sync + 'static {
        let changes = Arc::clone(&self.changes);
        move |_, _| {
            if changes.receiver_count() > 0 {
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// `/metrics`, `/debug`, `/debug/conns`, `/debug/events`.
    pub fn router(&self, handle: &Handle) -> Router {
        let ctx = Ctx {
            handle: handle.clone(),
            prometheus: self.prometheus.clone(),
            changes: Arc::clone(&self.changes),
        };
        Router::new()
            .route("/metrics", get(metrics))
            .route("/debug", get(page))
            .route("/debug/conns", get(conns))
            .route(EVENTS_PATH, get(events))
            .with_state(ctx)
    }
}

/// The Prometheus text format, with the server's live values read now.
async fn metrics(State(ctx): State<Ctx>) -> Response {
    ctx.handle.record_metrics();
    ctx.prometheus.run_upkeep();
    let mut response = ctx.prometheus.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// What the server is doing: its phase, the counts per state, the totals, and up to
/// `rows` connections (by id).
fn snapshot(handle: &Handle, rows: usize) -> (serde_json::Value, Vec<ConnSnapshot>) {
    let conns = handle.connection_snapshots();
    let phase = match (handle.readiness().is_ready(), handle.notice().is_draining()) {
        (true, _) => "serving",
        (false, false) => "stopping",
        (false, true) => "draining",
    };
    let json = serde_json::json!({
        "phase": phase,
        "ready": handle.readiness().is_ready(),
        "draining": handle.notice().is_draining(),
        "counts": handle.counts(),
        "totals": handle.totals(),
        "total_connections": conns.len(),
        "connections": &conns[..conns.len().min(rows)],
    });
    (json, conns)
}

async fn conns(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    Json(snapshot(&ctx.handle, usize::MAX).0)
}

/// True when the connection is a live page's event stream.
fn is_viewer(c: &ConnSnapshot) -> bool {
    c.request.as_ref().is_some_and(|r| r.path == EVENTS_PATH)
}

/// Where a live page's stream is.
enum Step {
    /// Send a snapshot now.
    Now,
    /// Wait for a change (or the refresh).
    Wait,
    /// Draining, and only live pages are left: say goodbye.
    Goodbye,
    /// The goodbye was sent: the stream ends.
    Done,
}

/// `event: snapshot` with the JSON of [`snapshot`] at each change (coalesced), then, once the
/// server drains and only live pages are left, `event: goodbye` and the end of the stream.
async fn events(State(ctx): State<Ctx>) -> Response {
    let rx = ctx.changes.subscribe();
    let events = stream::unfold((Step::Now, rx), move |(step, mut rx)| {
        let handle = ctx.handle.clone();
        async move {
            match step {
                Step::Done => return None,
                Step::Goodbye => {
                    let bye = "event: goodbye\nretry: 5000\ndata: drained\n\n".to_owned();
                    return Some((Ok::<_, std::convert::Infallible>(bye), (Step::Done, rx)));
                }
                Step::Wait => {
                    tokio::select! {
                        _ = rx.changed() => tokio::time::sleep(COALESCE).await,
                        _ = tokio::time::sleep(REFRESH) => {}
                    }
                }
                Step::Now => {}
            }
            // What changed while we waited is in the snapshot below.
            rx.borrow_and_update();
            let (json, conns) = snapshot(&handle, LIVE_ROWS);
            let next = if handle.notice().is_draining() && conns.iter().all(is_viewer) {
                Step::Goodbye
            } else {
                Step::Wait
            };
            Some((Ok(format!("event: snapshot\ndata: {json}\n\n")), (next, rx)))
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The live page: no external assets, an EventSource on `/debug/events`.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>grace-demo · connections</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
  h1 { font-size: 20px; margin: 0 0 12px; }
  #phase { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff;
           background: #2e7d32; font-weight: 600; }
  #phase.stopping { background: #ef6c00; } #phase.draining { background: #c62828; }
  #phase.drained, #phase.gone { background: #555; }
  .counts { display: flex; gap: 12px; margin: 16px 0; }
  .count { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 80px; }
  .count b { display: block; font-size: 24px; }
  table { border-collapse: collapse; min-width: 700px; }
  th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #eee; }
  td.state { font-weight: 600; }
  .new { color: #6a1b9a; } .active { color: #1565c0; } .idle { color: #2e7d32; }
  .hijacked { color: #ef6c00; }
  #totals, #note { color: #666; margin: 4px 0; }
  h2 { font-size: 15px; margin: 18px 0 6px; }
  #log { font: 12px/1.5 ui-monospace, monospace; margin: 0; padding: 0; list-style: none; }
</style>
</head>
<body>
<h1>grace-demo · live connections <span id="phase">connecting</span></h1>
<div class="counts">
  <div class="count new">new<b id="c-new">–</b></div>
  <div class="count active">active<b id="c-active">–</b></div>
  <div class="count idle">idle<b id="c-idle">–</b></div>
  <div class="count hijacked">hijacked<b id="c-hijacked">–</b></div>
</div>
<div id="totals"></div>
<table>
  <thead><tr><th>id</th><th>peer</th><th>state</th><th>age</th><th>method</th><th>path</th></tr></thead>
  <tbody id="conns"></tbody>
</table>
<div id="note"></div>
<h2>Changes</h2>
<ul id="log"></ul>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}
function age(ms) { return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(1) + " s"; }
let previous = null; // id → connection, from the last snapshot
function what(c) { return "#" + c.id + (c.request ? " " + c.request.method + " " + c.request.path : ""); }
function log(text, phase) {
  const li = document.createElement("li");
  li.textContent = new Date().toISOString().slice(11, 23) + "  [" + phase + "]  " + text;
  $("log").prepend(li);
  while ($("log").children.length > 15) $("log").lastChild.remove();
}
function changes(s) {
  const now = new Map(s.connections.map((c) => [c.id, c]));
  if (previous !== null) {
    for (const [id, c] of now) {
      const was = previous.get(id);
      if (!was) log(what(c) + ": " + c.state, s.phase);
      else if (was.state !== c.state) log(what(c.request ? c : was) + ": " + was.state + " → " + c.state, s.phase);
    }
    for (const [id, was] of previous) {
      if (!now.has(id)) log(what(was) + ": " + was.state + " → closed", s.phase);
    }
  }
  previous = now;
}
function render(s) {
  changes(s);
  $("phase").textContent = s.phase;
  $("phase").className = s.phase;
  for (const k of ["new", "active", "idle", "hijacked"]) $("c-" + k).textContent = s.counts[k];
  $("totals").textContent = "accepted " + s.totals.accepted + " · closed " + s.totals.closed +
    " · requests completed " + s.totals.requests_completed;
  const body = $("conns");
  body.replaceChildren();
  for (const c of s.connections) {
    const row = body.insertRow();
    row.dataset.id = c.id;
    cell(row, c.id);
    cell(row, c.peer);
    cell(row, c.state, "state " + c.state);
    cell(row, age(c.age_ms));
    cell(row, c.request ? c.request.method : "");
    cell(row, c.request ? c.request.path : "");
  }
  const hidden = s.total_connections - s.connections.length;
  $("note").textContent = hidden > 0 ? hidden + " more not shown" : "";
}
const events = new EventSource("/debug/events");
events.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
events.addEventListener("goodbye", () => {
  events.close();
  $("phase").textContent = "drained";
  $("phase").className = "drained";
});
events.onerror = () => {
  if (events.readyState === EventSource.CLOSED) {
    $("phase").textContent = "gone";
    $("phase").className = "gone";
  }
};
</script>
</body>
</html>
"##;
