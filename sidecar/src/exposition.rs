//! The two text formats `/metrics` speaks: OpenMetrics, which prometheus-client encodes and
//! Prometheus asks for first, and the classic 0.0.4 text format, which curl users, scrapers that
//! do not ask for OpenMetrics and `promtool check metrics` read. The Accept header chooses, as
//! it does for Go's promhttp. prometheus-client has no classic encoder, hence the rewrite below:
//! the two formats differ only in how a counter's HELP and TYPE are named and in the `# UNIT`
//! and `# EOF` lines.

use http::HeaderValue;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type and body for a client that sent `accept`, from prometheus-client's
/// OpenMetrics text.
pub fn negotiate(accept: Option<&HeaderValue>, openmetrics: String) -> (&'static str, String) {
    let asks_openmetrics = accept
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if asks_openmetrics {
        (OPENMETRICS, openmetrics)
    } else {
        (CLASSIC, to_classic(&openmetrics))
    }
}

/// OpenMetrics text to the classic format: a counter's (and an info's) HELP and TYPE name the
/// samples (`x_total`, `x_info`), `unknown` is `untyped`, and there is no `# UNIT` or `# EOF`.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes HELP before TYPE: a family's HELP waits for its TYPE.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "unknown" => (family.to_owned(), "untyped"),
                "stateset" => (family.to_owned(), "gauge"),
                other => (family.to_owned(), other),
            };
            match help.take() {
                Some(own) if own.0 == family => flush_help(&mut out, Some(own), Some(&name)),
                other => flush_help(&mut out, other, None),
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if !(line.starts_with("# UNIT ") || line == "# EOF") {
            flush_help(&mut out, help.take(), None);
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help, None);
    out
}

/// Writes a pending HELP line, under `renamed` when its TYPE renamed the family.
fn flush_help(out: &mut String, help: Option<(&str, &str)>, renamed: Option<&str>) {
    if let Some((name, text)) = help {
        out.push_str(&format!("# HELP {} {text}\n", renamed.unwrap_or(name)));
    }
}

/// Runs `promtool check metrics` (Debian's prometheus package; scripts/deps.sh installs it) on
/// a classic-format exposition: its parse and its lint of names, units and help texts. For
/// tests; Err carries what promtool said.
pub fn promtool_check(classic: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool ({e}): scripts/deps.sh --host installs it"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(classic.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS_TEXT: &str = "\
# HELP graceful_requests Requests received.
# TYPE graceful_requests counter
graceful_requests_total 3
# HELP graceful_drain_phase 1 for the current drain phase.
# TYPE graceful_drain_phase gauge
graceful_drain_phase{phase=\"serving\"} 1
# HELP graceful_hold_seconds Time held.
# TYPE graceful_hold_seconds histogram
# UNIT graceful_hold_seconds seconds
graceful_hold_seconds_sum 0.5
graceful_hold_seconds_count 1
graceful_hold_seconds_bucket{le=\"+Inf\"} 1
# HELP graceful_build Build.
# TYPE graceful_build info
graceful_build_info{version=\"1\"} 1
# EOF
";

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_lines_go() {
        assert_eq!(
            to_classic(OPENMETRICS_TEXT),
            "\
# HELP graceful_requests_total Requests received.
# TYPE graceful_requests_total counter
graceful_requests_total 3
# HELP graceful_drain_phase 1 for the current drain phase.
# TYPE graceful_drain_phase gauge
graceful_drain_phase{phase=\"serving\"} 1
# HELP graceful_hold_seconds Time held.
# TYPE graceful_hold_seconds histogram
graceful_hold_seconds_sum 0.5
graceful_hold_seconds_count 1
graceful_hold_seconds_bucket{le=\"+Inf\"} 1
# HELP graceful_build_info Build.
# TYPE graceful_build_info gauge
graceful_build_info{version=\"1\"} 1
"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_format() {
        let prometheus = HeaderValue::from_static(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        );
        let (kind, body) = negotiate(Some(&prometheus), OPENMETRICS_TEXT.into());
        assert_eq!((kind, body.as_str()), (OPENMETRICS, OPENMETRICS_TEXT));
        let curl = HeaderValue::from_static("*/*");
        for accept in [Some(&curl), None] {
            let (kind, body) = negotiate(accept, OPENMETRICS_TEXT.into());
            assert_eq!(kind, CLASSIC);
            assert!(!body.contains("# EOF"), "{body}");
        }
    }
}
