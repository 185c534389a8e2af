//! The one duration syntax of the workspace's binaries: `grace-demo`'s flags and config
//! file, `grace-check`'s flags and its test server's (`broken-server`). Each includes this
//! file as a module of its own (`#[path]`): three binaries, one parser.
//!
//! A number, whole or decimal, then `ms`, `s`, `m` or `h`; a bare number is seconds:
//! `500ms`, `2s`, `1.5s`, `1m`, `2h`, `0`.

use std::time::Duration;

/// Parses `500ms`, `2s`, `1.5s`, `1m`, `2h`, `0` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// `2s` for whole seconds, else `1500ms`: what a server's duration flags most often take
/// (grace-check writes `{timeout}` into the server's command with it), and what
/// [`parse_duration`] reads back.
// grace-check's own; the demo and the test server only parse.
#[allow(dead_code)]
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_binaries_accept() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (" 75 ", Duration::from_secs(75)),
            // A shutdown timeout too large to add to an instant still parses (it means
            // "no deadline" to the library).
            (
                "10000000000000000000s",
                Duration::from_secs(10_000_000_000_000_000_000),
            ),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for bad in [
            "",
            "s",
            "1.2.3s",
            "5x",
            "1 s",
            "-1s",
            "1e3s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn what_is_written_reads_back() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(30),
            Duration::from_millis(1),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
