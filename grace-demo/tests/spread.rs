//! A measurement, not a check (run by hand, `--ignored`): 1,000 WebSocket clients on one
//! generation, an upgrade, and when each client, told 1012, reconnects to the new one —
//! with and without `--goodbye-spread`. Reported in docs/benchmarks.md.
//!
//! ```sh
//! cargo test --release -p grace-demo --test spread -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

mod common;

use common::{Demo, TempDir, subreaper};

const CLIENTS: usize = 1_000;

/// Milliseconds from the upgrade to each client's reconnect, sorted.
async fn reconnects(spread: &str) -> Vec<f64> {
    subreaper();
    let dir = TempDir::new();
    let control = dir.path("control.sock");
    let args: Vec<String> = [
        "--goodbye-spread",
        spread,
        "--control-socket",
        control.to_str().unwrap(),
        "--shutdown-timeout",
        "30s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let demo = Demo::start(&dir, &args).await;
    let url = format!("ws://{}/ws", demo.addr);
    let mut sockets = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        sockets.push(tokio_tungstenite::connect_async(&url).await.unwrap().0);
    }
    let t = Instant::now();
    let clients: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let url = url.clone();
            tokio::spawn(async move {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        _ => {}
                    }
                }
                drop(ws);
                let again = tokio_tungstenite::connect_async(&url).await;
                assert!(again.is_ok(), "reconnect failed: {again:?}");
                t.elapsed().as_secs_f64() * 1e3
            })
        })
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_grace-demo"))
        .args(["ctl", "--socket"])
        .arg(&control)
        .arg("upgrade")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut times = Vec::with_capacity(CLIENTS);
    for c in clients {
        times.push(
            tokio::time::timeout(Duration::from_secs(60), c)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    times.sort_by(f64::total_cmp);
    let _ = std::process::Command::new(env!("CARGO_BIN_EXE_grace-demo"))
        .args(["ctl", "--socket"])
        .arg(&control)
        .arg("drain")
        .output();
    drop(demo);
    times
}

/// The most reconnects that landed in any 50 ms window.
fn peak(times: &[f64]) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] > 50.0 {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand with --ignored --nocapture"]
async fn reconnect_spread_of_1000_websockets_at_an_upgrade() {
    for spread in ["0s", "2s"] {
        let t = reconnects(spread).await;
        let q = |p: f64| t[((t.len() - 1) as f64 * p) as usize];
        println!(
            "--goodbye-spread {spread}: reconnects from {:.0} to {:.0} ms after the upgrade \
             (p50 {:.0}, p90 {:.0}); at most {} of {} within any 50 ms",
            q(0.0),
            q(1.0),
            q(0.5),
            q(0.9),
            peak(&t),
            t.len()
        );
    }
}
