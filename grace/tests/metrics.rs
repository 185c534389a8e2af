//! What a server shows of itself: connection snapshots, totals, and the `metrics` facade
//! rendered by a real exporter (Prometheus text), checked against the handle.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Client, app, start};
use grace_http::{ConnState, Handle};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The tests share the process's one recorder (and drains count process-wide): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

/// One sample: its labels, sorted.
type Labels = Vec<(String, String)>;

/// Parses the Prometheus text exposition format strictly enough to catch a malformed
/// line: `# HELP`/`# TYPE` comments, then `name{label="value",…} value` samples, each of a
/// family whose `# TYPE` came before.
fn parse(text: &str) -> BTreeMap<(String, Labels), f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut typed = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(name_ok(name), "bad name in {line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type in {line:?}"
                    );
                    typed.push(name.to_owned());
                }
                (Some("HELP"), Some(name), _) => assert!(name_ok(name), "bad name in {line:?}"),
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels: Labels = body
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once('=').expect("label=value");
                        assert!(name_ok(k), "bad label name in {line:?}");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("unquoted label value in {line:?}"));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                labels.sort();
                (name, labels)
            }
        };
        assert!(name_ok(name), "bad name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.iter().any(|t| t == f))
            })
            .unwrap_or(name);
        assert!(
            typed.iter().any(|t| t == family),
            "{name} has no # TYPE before it"
        );
        samples.insert((name.to_owned(), labels), value);
    }
    samples
}

fn value(samples: &BTreeMap<(String, Labels), f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    let key = (name.to_owned(), labels);
    *samples
        .get(&key)
        .unwrap_or_else(|| panic!("no sample {key:?} in {samples:?}"))
}

/// Renders what the handle says now, parsed.
fn scrape(handle: &Handle) -> BTreeMap<(String, Labels), f64> {
    handle.record_metrics();
    parse(&prometheus().render())
}

/// Every series the handle's numbers go to matches the handle.
fn assert_matches(handle: &Handle, samples: &BTreeMap<(String, Labels), f64>) {
    let counts = handle.counts();
    for (state, n) in [
        ("new", counts.new),
        ("active", counts.active),
        ("idle", counts.idle),
        ("hijacked", counts.hijacked),
    ] {
        let got = value(samples, "grace_connections", &[("state", state)]);
        assert_eq!(got, n as f64, "grace_connections{{state={state:?}}}");
    }
    let totals = handle.totals();
    for (name, n) in [
        ("grace_connections_accepted_total", totals.accepted),
        ("grace_connections_closed_total", totals.closed),
        ("grace_requests_completed_total", totals.requests_completed),
        ("grace_connections_handed_over_total", totals.handed_over),
        ("grace_connections_received_total", totals.received),
    ] {
        assert_eq!(value(samples, name, &[]), n as f64, "{name}");
    }
}

#[tokio::test]
async fn snapshots_show_each_connection_with_its_state_peer_age_and_request() {
    let _serial = SERIAL.lock().await;
    let mut srv = start(app(), |s| s.record_requests(true)).await;
    let mut idle = Client::connect(srv.addr).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    let mut active = Client::connect(srv.addr).await;
    active.send("/sleep/3000?x=1").await;
    let silent = Client::connect(srv.addr).await;
    srv.wait_counts(|c| c.new == 1 && c.active == 1 && c.idle == 1)
        .await;

    let snaps = srv.handle.connection_snapshots();
    let ids: Vec<u64> = snaps.iter().map(|s| s.id).collect();
    assert_eq!(ids, [0, 1, 2], "one snapshot per live connection, by id");
    let local = |c: &Client| c.io.get_ref().local_addr().unwrap().to_string();
    assert_eq!(snaps[0].state, ConnState::Idle);
    assert_eq!(snaps[0].peer.to_string(), local(&idle));
    assert!(
        snaps[0].request.is_none(),
        "an idle connection runs no request"
    );
    assert_eq!(snaps[1].state, ConnState::Active);
    assert_eq!(snaps[1].peer.to_string(), local(&active));
    let req = snaps[1].request.as_ref().expect("the running request");
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("GET", "/sleep/3000?x=1")
    );
    assert!(snaps[1].age >= req.age);
    assert_eq!(snaps[2].state, ConnState::New);
    assert!(snaps[2].age < Duration::from_secs(5));
    let json = serde_json::to_value(&snaps[1]).unwrap();
    assert_eq!(json["state"], "active");
    assert_eq!(json["request"]["path"], "/sleep/3000?x=1");
    assert!(json["age_ms"].as_f64().unwrap() > 0.0);

    let totals = srv.handle.totals();
    assert_eq!(
        (totals.accepted, totals.closed, totals.requests_completed),
        (3, 0, 1)
    );
    drop(silent);
    srv.wait_counts(|c| c.new == 0).await;
    assert_eq!(srv.handle.totals().closed, 1);

    // The drain: the idle connection is closed at once, the active one finishes.
    srv.handle.shutdown();
    srv.wait_counts(|c| c.idle == 0).await;
    let during = srv.handle.connection_snapshots();
    assert_eq!(during.len(), 1);
    assert_eq!((during[0].id, during[0].state), (1, ConnState::Active));
    assert_eq!(active.read().await.unwrap().status, 200);
    let report = srv.report(Duration::from_secs(3)).await;
    assert!(report.is_clean());
    assert!(srv.handle.connection_snapshots().is_empty());
    let totals = srv.handle.totals();
    assert_eq!(
        (totals.accepted, totals.closed, totals.requests_completed),
        (3, 3, 2)
    );
    drop(idle);
}

#[tokio::test]
async fn prometheus_text_parses_and_matches_the_handle_through_a_forced_drain() {
    let _serial = SERIAL.lock().await;
    let before = scrape_drains();
    let mut srv = start(app(), |s| {
        s.drain_policy(
            grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_millis(300)),
        )
    })
    .await;
    let mut idle = Client::connect(srv.addr).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    let mut stuck = Client::connect(srv.addr).await;
    stuck.send("/sleep/60000").await;
    let _silent = Client::connect(srv.addr).await;
    srv.wait_counts(|c| c.new == 1 && c.active == 1 && c.idle == 1)
        .await;

    let samples = scrape(&srv.handle);
    assert_matches(&srv.handle, &samples);
    assert_eq!(
        value(&samples, "grace_connections", &[("state", "active")]),
        1.0
    );
    assert_eq!(
        value(&samples, "grace_connections_accepted_total", &[]),
        3.0
    );
    assert_eq!(value(&samples, "grace_requests_completed_total", &[]), 1.0);
    assert_eq!(value(&samples, "grace_draining", &[]), 0.0);
    assert_eq!(value(&samples, "grace_generation", &[]), 1.0);
    assert_eq!(
        value(&samples, "grace_upgrades_total", &[("outcome", "failed")]),
        0.0
    );

    // A second request completes: the counter follows.
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    srv.wait_counts(|c| c.idle == 1).await;
    let samples = scrape(&srv.handle);
    assert_matches(&srv.handle, &samples);
    assert_eq!(value(&samples, "grace_requests_completed_total", &[]), 2.0);

    // A drain that has to cut the stuck request at its 300 ms deadline.
    srv.handle.shutdown();
    let report = srv.report(Duration::from_millis(300)).await;
    assert_eq!(report.forced.len(), 1);
    let samples = scrape(&srv.handle);
    assert_matches(&srv.handle, &samples);
    assert_eq!(value(&samples, "grace_draining", &[]), 1.0);
    let drains = value(
        &samples,
        "grace_drains_total",
        &[("trigger", "handle"), ("outcome", "forced")],
    );
    assert_eq!(drains - before.0, 1.0, "one more forced drain");
    let forced = value(&samples, "grace_connections_forced_total", &[]);
    assert_eq!(forced - before.1, 1.0, "the stuck connection was forced");
    let count = value(&samples, "grace_drain_seconds_count", &[]);
    assert_eq!(count - before.2, 1.0, "the drain's duration was recorded");
    let sum = value(&samples, "grace_drain_seconds_sum", &[]);
    assert!(
        sum - before.3 >= 0.29,
        "the drain took the deadline: {}",
        sum - before.3
    );
}

/// Forced handle drains, forced connections, drain count and sum so far (other tests of
/// this binary drain servers too).
fn scrape_drains() -> (f64, f64, f64, f64) {
    let samples = parse(&prometheus().render());
    let get = |name: &str, labels: &[(&str, &str)]| {
        let mut labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        samples
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    };
    (
        get(
            "grace_drains_total",
            &[("trigger", "handle"), ("outcome", "forced")],
        ),
        get("grace_connections_forced_total", &[]),
        get("grace_drain_seconds_count", &[]),
        get("grace_drain_seconds_sum", &[]),
    )
}
