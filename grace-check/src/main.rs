//! `grace-check`: starts an HTTP server afresh for each scenario, drives it with real
//! clients (raw HTTP/1.1, HTTP/2 through `h2`, WebSocket, TLS when asked), sends real
//! signals, and prints what a client saw, with the measured figures. Exit status 1 when a
//! scenario fails. See docs/check.md.

mod client;
mod duration;
mod proc;
mod scenarios;
mod tap;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use duration::{format_duration, parse_duration};
use serde_json::{Value, json};

use scenarios::{Ctx, Outcome, Routes, SCENARIOS, Verdict};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Checks how an HTTP server stops: drain, deadlines, signals, HTTP/2, WebSocket, upgrades",
    after_help = "Scenarios (--only/--skip take their names):\n".to_string() + &scenario_list()
)]
struct Args {
    /// The server command, run with `sh -c` for each scenario. `{port}` is replaced by a free
    /// port, `{timeout}` by --timeout (`2s`), `{tmp}` by a scratch directory (one per
    /// scenario). It must listen on 127.0.0.1:{port}.
    #[arg(long)]
    cmd: String,
    /// The shutdown timeout configured in the server: when the deadline must have forced.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// What "at once" and "promptly" allow (raise it on a loaded machine).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    slack: Duration,
    /// How long the server may take to accept connections after it is started.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    start_timeout: Duration,
    /// Run only these scenarios (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip these scenarios (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// A quick route (`""`: none).
    #[arg(long, default_value = "/")]
    root_path: String,
    /// A route that answers after `{ms}` milliseconds (`""`: none).
    #[arg(long, default_value = "/sleep/{ms}")]
    slow_path: String,
    /// A route that streams `{n}` chunks 100 ms apart (`""`: none).
    #[arg(long, default_value = "/stream/{n}")]
    stream_path: String,
    /// A WebSocket route (`""`: none).
    #[arg(long, default_value = "/ws")]
    ws_path: String,
    /// The signal that makes the server upgrade itself by handing its sockets over (e.g.
    /// HUP); the upgrade scenario is skipped without it.
    #[arg(long, value_parser = proc::parse_signal)]
    upgrade_signal: Option<proc::NamedSignal>,
    /// How long the old process may take to exit after the upgrade signal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    upgrade_wait: Duration,
    /// The descriptor limit (`ulimit -n`) of the fd-exhaustion scenario.
    #[arg(long, default_value_t = 64)]
    fd_limit: u32,
    /// Speak TLS to the server (any certificate is accepted; HTTP/2 by ALPN).
    #[arg(long)]
    tls: bool,
    /// The TLS server name (SNI).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the results as a JUnit XML file.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Show the server's last output lines under a failed scenario.
    #[arg(long, short)]
    verbose: bool,
}

fn scenario_list() -> String {
    SCENARIOS
        .iter()
        .map(|(name, what, _)| format!("  {name:<14} {what}\n"))
        .collect()
}

fn route(s: &str) -> Option<String> {
    Some(s.to_owned()).filter(|s| !s.is_empty())
}

fn main() {
    let args = Args::parse();
    let names: Vec<&'static str> = SCENARIOS.iter().map(|s| s.0).collect();
    for n in args.only.iter().chain(&args.skip) {
        if !names.contains(&n.as_str()) {
            eprintln!(
                "grace-check: no scenario {n:?}; there are: {}",
                names.join(", ")
            );
            std::process::exit(2);
        }
    }
    if !args.slow_path.is_empty() && !args.slow_path.contains("{ms}") {
        eprintln!("grace-check: --slow-path must contain {{ms}} (the time to answer after)");
        std::process::exit(2);
    }
    let tls = if args.tls {
        match client::Tls::new(&args.tls_name) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("grace-check: {e}");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    let ctx = Ctx {
        template: proc::CommandTemplate {
            cmd: args.cmd.clone(),
            timeout: args.timeout,
            start_timeout: args.start_timeout,
        },
        tls,
        timeout: args.timeout,
        slack: args.slack,
        routes: Routes {
            root: route(&args.root_path),
            slow: route(&args.slow_path),
            stream: route(&args.stream_path),
            ws: route(&args.ws_path),
        },
        upgrade_signal: args.upgrade_signal.as_ref().map(|s| s.sig),
        upgrade_signal_name: args
            .upgrade_signal
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        upgrade_wait: args.upgrade_wait,
        fd_limit: args.fd_limit,
    };
    proc::become_subreaper();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("grace-check: starting the runtime: {e}");
            std::process::exit(2);
        }
    };
    if !args.json {
        println!(
            "grace-check: sh -c '{}'  (--timeout {}, --slack {})",
            args.cmd,
            format_duration(args.timeout),
            format_duration(args.slack)
        );
        println!();
        println!(
            "{:<14} {:<6} {:<13} WHAT THE CLIENT SAW",
            "SCENARIO", "RESULT", "EXIT"
        );
    }
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for name in names {
        let selected = (args.only.is_empty() || args.only.iter().any(|n| n == name))
            && !args.skip.iter().any(|n| n == name);
        if !selected {
            continue;
        }
        let outcome = runtime.block_on(scenarios::run(name, &ctx));
        if !args.json {
            print_row(&outcome, args.verbose);
        }
        outcomes.push(outcome);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    let (passed, failed, skipped) = (
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip),
    );
    if args.json {
        println!("{}", to_json(&args, &outcomes, passed, failed, skipped));
    } else {
        println!();
        let skips: Vec<String> = outcomes
            .iter()
            .filter(|o| o.verdict == Verdict::Skip)
            .map(|o| o.name.to_string())
            .collect();
        println!(
            "{} scenarios in {:.1} s: {passed} passed, {failed} failed, {skipped} skipped{}",
            outcomes.len(),
            started.elapsed().as_secs_f64(),
            if skips.is_empty() {
                String::new()
            } else {
                format!(" ({})", skips.join(", "))
            }
        );
    }
    if let Some(path) = &args.junit {
        if let Err(e) = std::fs::write(path, junit(&outcomes, started.elapsed())) {
            eprintln!("grace-check: writing {}: {e}", path.display());
            std::process::exit(2);
        }
    }
    let _ = std::io::stdout().flush();
    std::process::exit(if failed > 0 { 1 } else { 0 });
}

fn exit_cell(o: &Outcome) -> String {
    match &o.exit {
        Some((what, Some(ms))) => {
            let what = what
                .strip_prefix("exit ")
                .map(str::to_owned)
                .or_else(|| {
                    what.strip_prefix("killed by signal ")
                        .map(|s| format!("sig{s}"))
                })
                .unwrap_or_else(|| what.clone());
            if *ms >= 10_000.0 {
                format!("{what} @ {:.1}s", ms / 1000.0)
            } else {
                format!("{what} @ {ms:.0}ms")
            }
        }
        Some((what, None)) => what.clone(),
        None => "-".into(),
    }
}

fn print_row(o: &Outcome, verbose: bool) {
    let saw = if o.verdict == Verdict::Skip {
        o.why.join("; ")
    } else {
        o.saw.join("; ")
    };
    println!(
        "{:<14} {:<6} {:<13} {}",
        o.name,
        o.verdict.as_str(),
        exit_cell(o),
        saw
    );
    if o.verdict == Verdict::Fail {
        for why in &o.why {
            println!("{:<36}✗ {why}", "");
        }
        if verbose && !o.server_output.is_empty() {
            for line in o.server_output.lines() {
                println!("{:<36}| {line}", "");
            }
        }
    }
    let _ = std::io::stdout().flush();
}

fn to_json(
    args: &Args,
    outcomes: &[Outcome],
    passed: usize,
    failed: usize,
    skipped: usize,
) -> Value {
    json!({
        "cmd": args.cmd,
        "timeout_ms": args.timeout.as_millis() as u64,
        "slack_ms": args.slack.as_millis() as u64,
        "tls": args.tls,
        "passed": passed,
        "failed": failed,
        "skipped": skipped,
        "scenarios": outcomes.iter().map(|o| json!({
            "name": o.name,
            "result": o.verdict.as_str(),
            "saw": o.saw,
            "why": o.why,
            "exit": o.exit.as_ref().map(|(what, ms)| json!({"status": what, "ms_after_signal": ms})),
            "figures": o.figures,
            "took_ms": o.took.as_millis() as u64,
            "server_output": o.server_output,
        })).collect::<Vec<_>>(),
    })
}

fn xml(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&apos;".into(),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => " ".into(),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML, as CI systems read it: one test case per scenario.
fn junit(outcomes: &[Outcome], took: Duration) -> String {
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let attrs = format!(
        "name=\"grace-check\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\"",
        outcomes.len(),
        count(Verdict::Fail),
        count(Verdict::Skip),
        took.as_secs_f64()
    );
    out += &format!("<testsuites {attrs}>\n  <testsuite {attrs}>\n");
    for o in outcomes {
        out += &format!(
            "    <testcase classname=\"grace-check\" name=\"{}\" time=\"{:.3}\">\n",
            xml(o.name),
            o.took.as_secs_f64()
        );
        match o.verdict {
            Verdict::Pass => {}
            Verdict::Skip => {
                out += &format!("      <skipped message=\"{}\"/>\n", xml(&o.why.join("; ")))
            }
            Verdict::Fail => {
                out += &format!(
                    "      <failure message=\"{}\">{}</failure>\n",
                    xml(&o.why.join("; ")),
                    xml(&o.server_output)
                )
            }
        }
        if o.verdict != Verdict::Skip {
            out += &format!(
                "      <system-out>{} (exit: {})</system-out>\n",
                xml(&o.saw.join("; ")),
                xml(&exit_cell(o))
            );
        }
        out += "    </testcase>\n";
    }
    out += "  </testsuite>\n</testsuites>\n";
    out
}
