//! Steady load from oha (a load generator nobody here wrote) for the duration of an action.
//! Counts come from oha's JSON report: a request failed when oha saw an error (refused, reset,
//! timeout...) or a status outside 2xx.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;
use tokio::process::Command;

use crate::cluster::tool;
use crate::{Error, Result};

/// Rate, connections and timeouts of one load run. Connections are kept alive (oha's default):
/// a keep-alive connection stays pinned to one pod, which is what makes rollouts drop requests.
#[derive(Clone, Debug)]
pub struct Load {
    /// Requests per second over all connections.
    pub rate: u32,
    pub connections: u32,
    /// A request slower than this counts as failed.
    pub request_timeout: Duration,
    /// Load before the action starts, so the action meets warm connections.
    pub lead_in: Duration,
    /// Load after the action ends: late failures (endpoints settling) still count.
    pub tail: Duration,
    /// Upper bound of one run, whatever the action does.
    pub max_duration: Duration,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// A POST with this body instead of a GET (to an echoing path: a proxy may not retry it).
    pub post: Option<String>,
    /// The Host header, for name-based routing (an Ingress or an HTTPRoute).
    pub host: Option<String>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            rate: 300,
            connections: 8,
            request_timeout: Duration::from_secs(10),
            lead_in: Duration::from_secs(2),
            tail: Duration::from_secs(3),
            max_duration: Duration::from_secs(300),
            http2: false,
            post: None,
            host: None,
        }
    }
}

/// What oha counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub sent: u64,
    pub failed: u64,
    pub p99_ms: f64,
    pub duration: Duration,
    /// Status code -> responses.
    pub statuses: BTreeMap<String, u64>,
    /// oha's error message -> count.
    pub errors: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Requests per second actually sent.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.duration.as_secs_f64().max(f64::EPSILON)
    }

    /// Adds another run's counts (p99 becomes the worst of both).
    pub fn merge(&mut self, other: &LoadReport) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.p99_ms = self.p99_ms.max(other.p99_ms);
        self.duration += other.duration;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Parses oha's `--output-format json` report.
    pub fn from_oha_json(json: &str, duration: Duration) -> Result<Self> {
        #[derive(Deserialize)]
        struct Oha {
            metrics: Metrics,
            #[serde(rename = "statusCodeDistribution")]
            statuses: BTreeMap<String, u64>,
            #[serde(rename = "errorDistribution")]
            errors: BTreeMap<String, u64>,
        }
        #[derive(Deserialize)]
        struct Metrics {
            latency_ms: Latency,
        }
        #[derive(Deserialize)]
        struct Latency {
            p99: Option<f64>,
        }
        let oha: Oha = serde_json::from_str(json).map_err(|e| {
            Error::Report(format!(
                "{e}; report was: {}",
                json.chars().take(500).collect::<String>()
            ))
        })?;
        let non_2xx: u64 = oha
            .statuses
            .iter()
            .filter(|(code, _)| !code.starts_with('2'))
            .map(|(_, n)| n)
            .sum();
        let errors: u64 = oha.errors.values().sum();
        // oha's own deadline (the end of one of our runs), never the server's doing.
        let client_aborts: u64 = oha
            .errors
            .iter()
            .filter(|(e, _)| e.as_str() == CLIENT_DEADLINE)
            .map(|(_, n)| n)
            .sum();
        let sent = oha.statuses.values().sum::<u64>() + errors;
        Ok(Self {
            sent,
            failed: non_2xx + errors - client_aborts,
            p99_ms: oha.metrics.latency_ms.p99.unwrap_or(f64::NAN),
            duration,
            statuses: oha.statuses,
            errors: oha.errors,
        })
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} failed {} ({:.0} req/s, p99 {:.1} ms, {:.1}s)",
            self.sent,
            self.failed,
            self.rate(),
            self.p99_ms,
            self.duration.as_secs_f64()
        )?;
        for (e, n) in &self.errors {
            write!(f, "; {n}x {e}")?;
        }
        for (code, n) in self.statuses.iter().filter(|(c, _)| !c.starts_with('2')) {
            write!(f, "; {n}x HTTP {code}")?;
        }
        Ok(())
    }
}

impl Load {
    /// Runs `action` under this load against `url` and returns its output with oha's counts.
    pub async fn during<F: Future>(&self, url: &str, action: F) -> Result<(F::Output, LoadReport)> {
        let oha = tool("oha")?;
        let started = Instant::now();
        let action_done: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
        let act = async {
            tokio::time::sleep(self.lead_in).await;
            let output = action.await;
            *action_done.lock().expect("not poisoned") = Some(Instant::now());
            output
        };
        // Chunks overlap: the next starts OVERLAP before this one stops sending, so the load
        // never pauses. oha takes a few hundred ms to start (0.3 s on the busy e2e node), and a
        // pause of the whole load looks, to a pod draining behind a data plane that lags, like
        // the data planes letting go: it stops, and the next chunk meets it stopped.
        let load = async {
            let mut total = LoadReport::default();
            let mut running = FuturesUnordered::new();
            loop {
                running.push(self.chunk(&oha, url));
                let next_start = tokio::time::sleep(CHUNK - OVERLAP);
                tokio::pin!(next_start);
                loop {
                    tokio::select! {
                        _ = &mut next_start => break,
                        Some(report) = running.next() => total.merge(&report?),
                    }
                }
                let done = *action_done.lock().expect("not poisoned");
                if done.is_some_and(|t| t.elapsed() >= self.tail)
                    || started.elapsed() >= self.max_duration
                {
                    while let Some(report) = running.next().await {
                        total.merge(&report?);
                    }
                    return Ok::<_, Error>(total);
                }
            }
        };
        let (output, total) = tokio::join!(act, load);
        let mut total = total?;
        total.duration = started.elapsed();
        Ok((output, total))
    }

    /// One oha run of `CHUNK`. It ends by its own deadline with `-w`, so requests in flight at
    /// the end complete: stopping oha any other way aborts them, and oha reports those as
    /// failed ("operation was canceled"), which would blame the server for the client's stop.
    async fn chunk(&self, oha: &std::path::Path, url: &str) -> Result<LoadReport> {
        let started = Instant::now();
        let child = Command::new(oha)
            .args(["--no-tui", "--output-format", "json", "--no-color", "-w"])
            .args(["-q", &self.rate.to_string()])
            .args(["-c", &self.connections.to_string()])
            .args(["-z", &format!("{}s", CHUNK.as_secs())])
            .args(["-t", &format!("{}ms", self.request_timeout.as_millis())])
            .args(self.http2.then_some("--http2"))
            .args(self.post.iter().flat_map(|body| ["-m", "POST", "-d", body]))
            .args(
                self.host
                    .iter()
                    .flat_map(|h| ["-H".to_owned(), format!("Host: {h}")]),
            )
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("starting {}", oha.display())))?;
        let out = tokio::time::timeout(
            CHUNK + self.request_timeout + Duration::from_secs(30),
            child.wait_with_output(),
        )
        .await
        .map_err(|_| Error::Report("oha ran far past its duration".into()))?
        .map_err(Error::io("waiting for oha"))?;
        let json = String::from_utf8_lossy(&out.stdout);
        if json.trim().is_empty() {
            return Err(Error::Report(format!(
                "oha exited with {} and no report: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        LoadReport::from_oha_json(&json, started.elapsed())
    }
}

/// How oha names requests it dropped itself when its duration ran out.
const CLIENT_DEADLINE: &str = "aborted due to deadline";

/// Length of one oha run. Longer than a pod's drain, so keep-alive connections live through
/// drains as a real client's would; each run's in-flight requests complete at its end.
const CHUNK: Duration = Duration::from_secs(10);

/// How long two chunks run side by side (at twice the rate): longer than oha's start-up.
const OVERLAP: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_non_2xx_as_failed() {
        let json = r#"{"metrics": {"latency_ms": {"p99": 12.5}},
            "statusCodeDistribution": {"200": 95, "503": 2},
            "errorDistribution": {"connection reset": 3}}"#;
        let r = LoadReport::from_oha_json(json, Duration::from_secs(1)).unwrap();
        assert_eq!((r.sent, r.failed), (100, 5));
        assert_eq!(r.p99_ms, 12.5);
    }

    #[test]
    fn the_clients_own_deadline_is_not_a_failure() {
        let json = r#"{"metrics": {"latency_ms": {"p99": 1.0}},
            "statusCodeDistribution": {"200": 10},
            "errorDistribution": {"aborted due to deadline": 2, "connection refused": 1}}"#;
        let r = LoadReport::from_oha_json(json, Duration::from_secs(1)).unwrap();
        assert_eq!((r.sent, r.failed), (13, 1));
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LoadReport {
            sent: 10,
            failed: 1,
            p99_ms: 3.0,
            ..Default::default()
        };
        let b = LoadReport {
            sent: 5,
            failed: 2,
            p99_ms: 9.0,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.sent, a.failed, a.p99_ms), (15, 3, 9.0));
    }
}
