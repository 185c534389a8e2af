//! Watching a real `grace-demo`: `GET /metrics` is Prometheus text whose numbers match the
//! server's own (`/debug/conns`, from the handle); `/debug/conns` and the `/debug/events`
//! stream show a connection leave during a drain; the `/debug` page, in headless Chromium,
//! shows it too (with a screenshot taken during the drain).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Demo, Http, SOON, TempDir, subreaper};
use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

type Samples = BTreeMap<String, f64>;

/// Parses the Prometheus text format strictly enough to catch a malformed line: comments
/// are `# HELP name …` or `# TYPE name kind`; a sample is `name{label="value",…} value` of
/// a family typed before it. Keys are `name{labels sorted}`.
fn parse_prometheus(text: &str) -> Samples {
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: Vec<String> = Vec::new();
    let mut samples = Samples::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let words: Vec<&str> = comment.splitn(3, ' ').collect();
            match words[..] {
                ["TYPE", name, kind] => {
                    assert!(name_ok(name), "{line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line:?}"
                    );
                    typed.push(name.to_owned());
                }
                ["HELP", name, ..] => assert!(name_ok(name), "{line:?}"),
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, mut labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels: Vec<String> = body
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once('=').expect("label=value");
                        assert!(name_ok(k), "{line:?}");
                        assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'));
                        l.to_owned()
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(name_ok(name), "{line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.iter().any(|t| t == f))
            })
            .unwrap_or(name);
        assert!(typed.iter().any(|t| t == family), "{name}: no # TYPE");
        labels.sort();
        samples.insert(format!("{name}{{{}}}", labels.join(",")), value);
    }
    samples
}

fn sample(samples: &Samples, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {samples:#?}"))
}

/// `GET path` on `c`, as JSON.
async fn get_json(c: &mut Http, path: &str) -> Value {
    let resp = c.request("GET", path, None).await.unwrap();
    assert_eq!(resp.status, 200, "{path}: {}", resp.body);
    resp.json()
}

/// The connection serving `path` in a `/debug/conns` (or event) snapshot.
fn conn_serving<'a>(snapshot: &'a Value, path: &str) -> Option<&'a Value> {
    snapshot["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["request"]["path"] == path)
}

/// Polls `/debug/conns` on `c` (a connection to `addr`) until `f` holds. An answer that
/// closes its connection (from the drain request on, HTTP/1 answers say
/// `Connection: close`, even one whose snapshot was taken just before) is followed by a new
/// connection.
async fn wait_conns(c: &mut Http, addr: SocketAddr, f: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let resp = c.request("GET", "/debug/conns", None).await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        let snapshot = resp.json();
        if f(&snapshot) {
            return snapshot;
        }
        if resp.closes() {
            *c = Http::connect(addr).await.unwrap();
        }
        assert!(t.elapsed() < SOON, "never matched: {snapshot}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_match_the_servers_counts() {
    subreaper();
    let dir = TempDir::new();
    let config = dir.path("demo.toml");
    std::fs::write(&config, "greeting = \"v1\"\n").unwrap();
    let config_arg = config.display().to_string();
    let demo = Demo::start(
        &dir,
        &args(&["--config", &config_arg, "--shutdown-timeout", "1s"]),
    )
    .await;
    let mut idle = Http::connect(demo.addr).await.unwrap();
    assert_eq!(idle.request("GET", "/", None).await.unwrap().status, 200);
    let mut sleeper = Http::connect(demo.addr).await.unwrap();
    sleeper.send("GET", "/sleep/30000", None).await.unwrap();
    // One connection watches and scrapes throughout: the live counts are then exact.
    let mut watch = Http::connect(demo.addr).await.unwrap();
    wait_conns(&mut watch, demo.addr, |s| {
        conn_serving(s, "/sleep/30000").is_some() && s["counts"]["idle"] == 1
    })
    .await;

    let resp = watch.request("GET", "/metrics", None).await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        resp.headers
    );
    let samples = parse_prometheus(&resp.body);
    // The handle's own numbers, read on the same connection right after.
    let conns = get_json(&mut watch, "/debug/conns").await;
    for state in ["new", "active", "idle", "hijacked"] {
        let key = format!("grace_connections{{state=\"{state}\"}}");
        assert_eq!(
            sample(&samples, &key),
            conns["counts"][state].as_f64().unwrap(),
            "{key}"
        );
    }
    assert_eq!(sample(&samples, "grace_connections{state=\"active\"}"), 2.0);
    assert_eq!(sample(&samples, "grace_connections{state=\"idle\"}"), 1.0);
    let totals = &conns["totals"];
    assert_eq!(
        sample(&samples, "grace_connections_accepted_total{}"),
        totals["accepted"].as_f64().unwrap()
    );
    assert_eq!(sample(&samples, "grace_connections_accepted_total{}"), 3.0);
    assert_eq!(
        sample(&samples, "grace_connections_closed_total{}"),
        totals["closed"].as_f64().unwrap()
    );
    // The /metrics response itself completed in between.
    assert_eq!(
        sample(&samples, "grace_requests_completed_total{}") + 1.0,
        totals["requests_completed"].as_f64().unwrap()
    );
    assert_eq!(sample(&samples, "grace_draining{}"), 0.0);
    assert_eq!(sample(&samples, "grace_generation{}"), 1.0);
    assert_eq!(
        sample(&samples, "grace_upgrades_total{outcome=\"failed\"}"),
        0.0
    );

    // A broken configuration: the upgrade fails, counted with its duration.
    std::fs::write(&config, "greeting = \n").unwrap();
    demo.signal(Signal::HUP);
    let t = Instant::now();
    let samples = loop {
        let resp = watch.request("GET", "/metrics", None).await.unwrap();
        let samples = parse_prometheus(&resp.body);
        if sample(&samples, "grace_upgrades_total{outcome=\"failed\"}") == 1.0 {
            break samples;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{samples:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&samples, "grace_upgrades_total{outcome=\"ok\"}"),
        0.0
    );
    assert_eq!(
        sample(&samples, "grace_upgrade_seconds_count{outcome=\"failed\"}"),
        1.0
    );
    assert!(sample(&samples, "grace_upgrade_seconds_sum{outcome=\"failed\"}") > 0.0);
    assert_eq!(
        sample(
            &samples,
            "grace_upgrade_seconds_bucket{le=\"+Inf\",outcome=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(sample(&samples, "grace_generation{}"), 1.0);

    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code, 3, "the sleeper is cut at 1 s: {}", exit.stderr);
    drop((idle, sleeper));
}

/// Reads server-sent events from a streaming (chunked) HTTP/1.1 response.
struct Sse {
    c: Http,
    buf: String,
}

impl Sse {
    async fn open(addr: SocketAddr) -> Sse {
        let mut c = Http::connect(addr).await.unwrap();
        c.send("GET", "/debug/events", None).await.unwrap();
        let head = c.read_head().await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        Sse {
            c,
            buf: String::new(),
        }
    }

    /// The next event's name and data; `None` at the end of the stream.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in event.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                return Some((name, data));
            }
            let read = tokio::time::timeout(SOON, common::read_chunk(self.c.raw())).await;
            // The last chunk, or the connection's end.
            let Ok(Some(chunk)) = read.expect("no event in time") else {
                return None;
            };
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn debug_conns_and_events_show_a_connection_leave_during_a_drain() {
    let dir = TempDir::new();
    let demo = Demo::start(
        &dir,
        &args(&["--pre-stop-delay", "1s", "--shutdown-timeout", "20s"]),
    )
    .await;
    let mut events = Sse::open(demo.addr).await;
    let mut sleeper = Http::connect(demo.addr).await.unwrap();
    sleeper.send("GET", "/sleep/3500", None).await.unwrap();
    let mut watch = Http::connect(demo.addr).await.unwrap();
    let before = wait_conns(&mut watch, demo.addr, |s| {
        conn_serving(s, "/sleep/3500").is_some()
    })
    .await;
    let conn = conn_serving(&before, "/sleep/3500").unwrap();
    let id = conn["id"].clone();
    assert_eq!(conn["state"], "active");
    assert_eq!(conn["request"]["method"], "GET");
    assert_eq!(
        conn["peer"],
        sleeper.raw().get_ref().local_addr().unwrap().to_string()
    );
    assert!(conn["age_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(before["phase"], "serving");
    assert_eq!(
        conn_serving(&before, "/debug/events").unwrap()["state"],
        "active"
    );

    demo.signal(Signal::TERM);
    // The pre-stop delay: still serving, readiness failing, the sleeper still there.
    let stopping = wait_conns(&mut watch, demo.addr, |s| s["phase"] == "stopping").await;
    assert_eq!(stopping["ready"], false);
    assert_eq!(conn_serving(&stopping, "/sleep/3500").unwrap()["id"], id);

    // The stream goes on through the drain: the sleeper is seen active while draining,
    // then gone; once only the stream is left it says goodbye, and the drain ends.
    let mut seen_active_draining = false;
    let mut seen_gone_draining = false;
    let mut goodbye = false;
    while let Some((name, data)) = events.next().await {
        match name.as_str() {
            "snapshot" => {
                let s: Value = serde_json::from_str(&data).unwrap();
                let sleeper_there = s["connections"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["id"] == id);
                if s["phase"] == "draining" {
                    match sleeper_there {
                        Some(c) => {
                            assert_eq!(c["state"], "active", "{s}");
                            assert!(!seen_gone_draining, "came back: {s}");
                            seen_active_draining = true;
                        }
                        None => seen_gone_draining = true,
                    }
                }
            }
            "goodbye" => goodbye = true,
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(
        seen_active_draining,
        "never saw the sleeper active while draining"
    );
    assert!(
        seen_gone_draining,
        "never saw the sleeper gone while draining"
    );
    assert!(goodbye, "the stream ended without its goodbye");
    let resp = sleeper.read().await.expect("the sleeper was cut");
    assert_eq!(resp.status, 200);
    assert!(resp.closes());
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert_eq!(exit.report["forced"], json!([]));
}

// ---- headless Chromium --------------------------------------------------------------------

/// Debian's `chromium`, if installed.
fn chromium() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("chromium"))
        .find(|p| p.is_file())
}

/// A page in headless Chromium, driven over the DevTools protocol (its WebSocket).
struct Browser {
    _child: tokio::process::Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next_id: u64,
}

impl Browser {
    async fn open(chromium: &Path, profile: &Path, url: &str) -> Browser {
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1000,700",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("chromium did not start");
        // Keep draining its stderr, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("DevTools WebSocket");
        let mut b = Browser {
            _child: child,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b.call("Page.navigate", json!({ "url": url })).await;
        b
    }

    /// Sends a command (to the page, once attached) and waits for its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to chromium");
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("chromium closed the DevTools socket")
                .expect("DevTools socket");
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// What the page shows: its phase, its table's rows, its change log.
    async fn page(&mut self) -> Value {
        let expression = r##"JSON.stringify({
            phase: document.getElementById("phase")?.textContent,
            rows: [...document.querySelectorAll("#conns tr")]
                .map((r) => [...r.cells].map((c) => c.textContent)),
            log: [...document.querySelectorAll("#log li")].map((l) => l.textContent),
        })"##;
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    }

    /// Waits until the page satisfies `f`.
    async fn wait(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let page = self.page().await;
            if f(&page) {
                return page;
            }
            assert!(t.elapsed() < SOON, "the page never showed {what}: {page}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// The row of the page's table for the connection serving `path`: [id, peer, state, age,
/// method, path].
fn row<'a>(page: &'a Value, path: &str) -> Option<&'a Value> {
    page["rows"].as_array()?.iter().find(|r| r[5] == path)
}

#[tokio::test]
async fn debug_page_in_headless_chromium_shows_connections_leave_during_a_drain() {
    let Some(chromium) = chromium() else {
        println!("skipped: chromium not installed (apt-get install chromium)");
        return;
    };
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &args(&["--shutdown-timeout", "20s"])).await;
    let url = format!("http://{}/debug", demo.addr);
    let mut browser = Browser::open(&chromium, &dir.path("profile"), &url).await;
    browser
        .wait("its own event stream", |p| {
            row(p, "/debug/events").is_some()
        })
        .await;
    let mut sleeper = Http::connect(demo.addr).await.unwrap();
    sleeper.send("GET", "/sleep/5000", None).await.unwrap();
    let mut streamer = Http::connect(demo.addr).await.unwrap();
    streamer.send("GET", "/stream/25", None).await.unwrap();
    let page = browser
        .wait("the sleeper and the stream active", |p| {
            p["phase"] == "serving"
                && row(p, "/sleep/5000").is_some_and(|r| r[2] == "active")
                && row(p, "/stream/25").is_some_and(|r| r[2] == "active")
        })
        .await;
    assert_eq!(row(&page, "/sleep/5000").unwrap()[4], "GET");

    demo.signal(Signal::TERM);
    let during = browser
        .wait("the drain with the sleeper still active", |p| {
            p["phase"] == "draining" && row(p, "/sleep/5000").is_some_and(|r| r[2] == "active")
        })
        .await;
    assert_eq!(row(&during, "/stream/25").unwrap()[2], "active");
    // The stream (2.5 s) leaves first: the screenshot shows it gone and the sleeper active.
    let during = browser
        .wait("the stream leave", |p| {
            row(p, "/stream/25").is_none()
                && p["log"].to_string().contains("/stream/25: active → closed")
        })
        .await;
    assert_eq!(
        row(&during, "/sleep/5000").map(|r| r[2].clone()),
        Some(json!("active")),
        "the sleeper left before the stream: {during}"
    );
    let shot = dir.path("debug-drain.png");
    browser.screenshot(&shot).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a blank page? {} bytes", png.len());
    if let Some(keep) = std::env::var_os("GRACE_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    println!("screenshot during the drain: {} ({during})", shot.display());

    let after = browser
        .wait("the sleeper leave during the drain", |p| {
            row(p, "/sleep/5000").is_none()
                && p["log"].as_array().unwrap().iter().any(|l| {
                    let l = l.as_str().unwrap();
                    l.contains("[draining]") && l.contains("GET /sleep/5000: active → closed")
                })
        })
        .await;
    browser
        .wait("the end of the drain", |p| p["phase"] == "drained")
        .await;
    assert_eq!(sleeper.read().await.unwrap().status, 200);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}\n{after}", exit.stderr);
    drop(streamer);
}
