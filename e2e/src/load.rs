//! Steady load from vegeta (a load generator nobody here wrote) for the duration of an action.
//! Every request's result is vegeta's (`vegeta attack | vegeta encode --to json`, one JSON
//! line per request): a request failed when vegeta saw an error (refused, reset, timeout...)
//! or a status outside 2xx.
//!
//! One vegeta runs for the whole action: its keep-alive connections live through every drain
//! as a real client's would, and the load never pauses (a pause of the whole load looks, to a
//! pod draining behind a data plane that lags, like the data planes letting go). It stops on
//! SIGINT, after the requests in flight have completed: none is aborted by the measurement.
//!
//! The load is POSTs unless a test asks for GETs: Go's client (vegeta's) sends a POST again
//! only when nothing of it was written, so every drop counts. A GET it also sends again on a
//! new connection when a reused keep-alive connection closed before the response began, as
//! Go clients do: GET counts are a Go client's view, not the strict one (see [`Request`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::cluster::tool;
use crate::{Error, Result};

/// Rate, connections and timeouts of one load run. Connections are kept alive: a keep-alive
/// connection stays pinned to one pod, which is what makes rollouts drop requests.
#[derive(Clone, Debug)]
pub struct Load {
    /// Requests per second over all connections.
    pub rate: u32,
    /// At most this many connections at once (HTTP/1.1); one connection for HTTP/2.
    pub connections: u32,
    /// A request slower than this counts as failed.
    pub request_timeout: Duration,
    /// Load before the action starts, so the action meets warm connections (vegeta starts in
    /// milliseconds: a second is 300 requests over every connection).
    pub lead_in: Duration,
    /// Load after the action ends: late failures (endpoints settling) still count.
    pub tail: Duration,
    /// Upper bound of one run, whatever the action does.
    pub max_duration: Duration,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// What each request is.
    pub request: Request,
    /// The Host header, for name-based routing (an Ingress or an HTTPRoute).
    pub host: Option<String>,
    /// Keep connections alive (the default). Off: every request on a new connection, as a
    /// client that connects per request does; each is a new routing decision for an L4 balancer.
    pub keepalive: bool,
    /// Send from this network namespace (`ip netns exec`): its ClusterIP connections go through
    /// that namespace's kube-proxy (e2e/scripts/node-proxies.sh), as another node's clients do.
    pub netns: Option<String>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            rate: 300,
            connections: 8,
            request_timeout: Duration::from_secs(10),
            lead_in: Duration::from_secs(1),
            tail: Duration::from_secs(3),
            max_duration: Duration::from_secs(300),
            http2: false,
            request: Request::default(),
            host: None,
            keepalive: true,
            netns: None,
        }
    }
}

/// The method and body of every request of a load.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Request {
    /// A POST with this body (empty: none). Neither vegeta's client nor a proxy on the way
    /// sends it again once any of it was written, so every drop is counted. The demo app
    /// answers a POST to `/` like a GET and echoes the body back on `/echo`.
    Post(String),
    /// A bodyless POST: the default.
    #[default]
    EmptyPost,
    /// A GET, which Go's client sends again on a fresh connection when a reused one closed
    /// before the response began (a server closing an idle keep-alive connection as the
    /// request left): what a Go client sees, less strict than a POST.
    Get,
}

impl Request {
    pub fn method(&self) -> &'static str {
        match self {
            Request::Get => "GET",
            Request::Post(_) | Request::EmptyPost => "POST",
        }
    }
}

/// What vegeta counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub sent: u64,
    pub failed: u64,
    pub p99_ms: f64,
    pub duration: Duration,
    /// Status code -> responses.
    pub statuses: BTreeMap<String, u64>,
    /// What went wrong without a response (the end of Go's error message) -> count.
    pub errors: BTreeMap<String, u64>,
    /// When the first and the last failed request were sent: where in a run its failures lie.
    pub failed_span: Option<(Timestamp, Timestamp)>,
    /// The first [`FAILURES_KEPT`] failures, in the order vegeta reported them: when each was
    /// sent and what went wrong, to lay beside what the cluster did at that moment.
    pub failures: Vec<Failure>,
}

/// How many failed requests a report keeps one by one.
pub const FAILURES_KEPT: usize = 50;

/// One failed request.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// When vegeta sent it.
    pub sent_at: Timestamp,
    /// How long it took to fail.
    pub latency: Duration,
    /// The error's kind, or `HTTP <status>`.
    pub what: String,
}

/// One line of `vegeta encode --to json`: one request.
#[derive(Deserialize)]
struct Outcome {
    /// 0 when there was no response.
    code: u16,
    /// Nanoseconds.
    latency: u64,
    #[serde(default)]
    error: String,
    /// When the request was sent (RFC 3339).
    #[serde(default)]
    timestamp: Option<String>,
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
        if let Some((first, last)) = other.failed_span {
            self.failed_at(first);
            self.failed_at(last);
        }
        let room = FAILURES_KEPT.saturating_sub(self.failures.len());
        self.failures
            .extend(other.failures.iter().take(room).cloned());
    }

    /// Widens the span of failures to `at`.
    fn failed_at(&mut self, at: Timestamp) {
        self.failed_span = Some(match self.failed_span {
            None => (at, at),
            Some((first, last)) => (first.min(at), last.max(at)),
        });
    }

    /// Counts one request from one line of `vegeta encode --to json`; returns its latency.
    fn record(&mut self, line: &str) -> Result<Duration> {
        let outcome: Outcome = serde_json::from_str(line)
            .map_err(|e| Error::Report(format!("{e}; line was: {line:.500}")))?;
        self.sent += 1;
        let latency = Duration::from_nanos(outcome.latency);
        let failure = if outcome.code == 0 {
            let kind = error_kind(&outcome.error);
            *self.errors.entry(kind.clone()).or_default() += 1;
            Some(kind)
        } else {
            *self.statuses.entry(outcome.code.to_string()).or_default() += 1;
            (!(200..300).contains(&outcome.code)).then(|| format!("HTTP {}", outcome.code))
        };
        if let Some(what) = failure {
            self.failed += 1;
            if let Some(at) = outcome.timestamp.as_deref() {
                let sent_at = at.parse::<Timestamp>().map_err(|e| {
                    Error::Report(format!(
                        "vegeta's timestamp {at:?}: {e}; line was: {line:.500}"
                    ))
                })?;
                self.failed_at(sent_at);
                if self.failures.len() < FAILURES_KEPT {
                    self.failures.push(Failure {
                        sent_at,
                        latency,
                        what,
                    });
                }
            }
        }
        Ok(latency)
    }

    /// The counts of every line of `vegeta encode --to json` output.
    pub fn from_vegeta_json(lines: &str, duration: Duration) -> Result<Self> {
        let mut tally = Tally::default();
        for line in lines.lines() {
            tally.add(line)?;
        }
        Ok(LoadReport {
            duration,
            ..tally.finish()
        })
    }
}

/// Counts lines of `vegeta encode --to json` as they come, and their latencies for the p99.
#[derive(Default)]
struct Tally {
    report: LoadReport,
    latencies: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, line: &str) -> Result<()> {
        if !line.trim().is_empty() {
            self.latencies.push(self.report.record(line)?);
        }
        Ok(())
    }

    fn finish(mut self) -> LoadReport {
        self.report.p99_ms = p99_ms(&mut self.latencies);
        self.report
    }
}

/// What a Go error says went wrong, without the request and the addresses: `Post
/// "http://10.96.0.7/echo": read tcp 10.244.0.1:41234->10.96.0.7:80: read: connection reset by
/// peer` is "connection reset by peer", so the same failure counts under one name.
fn error_kind(message: &str) -> String {
    let kind = message.rsplit(": ").next().unwrap_or(message).trim();
    if kind.is_empty() {
        "error without a message".into()
    } else {
        kind.into()
    }
}

fn p99_ms(latencies: &mut [Duration]) -> f64 {
    if latencies.is_empty() {
        return f64::NAN;
    }
    latencies.sort_unstable();
    let at = (latencies.len() * 99).div_ceil(100).max(1) - 1;
    latencies[at].as_secs_f64() * 1000.0
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
    /// Runs `action` under this load against `url` and returns its output with vegeta's counts.
    pub async fn during<F: Future>(&self, url: &str, action: F) -> Result<(F::Output, LoadReport)> {
        let started = Instant::now();
        let mut attack = self.start(url).await?;
        let results = attack.results.take().expect("taken once");
        let count = tokio::spawn(count(results));
        let act = async {
            tokio::time::sleep(self.lead_in).await;
            let output = action.await;
            tokio::time::sleep(self.tail).await;
            output
        };
        tokio::pin!(act);
        // The report's duration is the time vegeta was sending: rate x duration is what it
        // should have sent. The wait for the last answers after the stop (up to the request
        // timeout, when they time out) sends nothing.
        let mut sending = None;
        let output = tokio::select! {
            output = &mut act => output,
            _ = tokio::time::sleep(self.max_duration) => {
                // The load ends at its bound; the action still finishes.
                sending = Some(started.elapsed());
                attack.stop(self.request_timeout).await?;
                act.await
            }
        };
        let sending = sending.unwrap_or_else(|| started.elapsed());
        attack.stop(self.request_timeout).await?;
        let mut report = count
            .await
            .map_err(|e| Error::Report(format!("counting vegeta's results: {e}")))??;
        report.duration = sending;
        Ok((output, report))
    }

    /// `vegeta attack` at this load's rate, piped into `vegeta encode`.
    async fn start(&self, url: &str) -> Result<Attack> {
        let vegeta = tool("vegeta")?;
        let mut header = serde_json::Map::new();
        if let Some(host) = &self.host {
            header.insert("Host".into(), serde_json::json!([host]));
        }
        // vegeta's JSON target format: the body is base64.
        let target = serde_json::json!({
            "method": self.request.method(),
            "url": url,
            "header": header,
            "body": match &self.request {
                Request::Post(body) => BASE64.encode(body),
                Request::EmptyPost | Request::Get => String::new(),
            },
        });
        let mut attack = Command::from(crate::node_proxies::command_in(
            self.netns.as_deref(),
            &vegeta,
        ));
        attack
            .arg("attack")
            .args(["-format=json", "-duration=0", "-max-body=0", "-redirects=0"])
            .arg(format!("-rate={}/1s", self.rate))
            .arg(format!("-timeout={}ms", self.request_timeout.as_millis()))
            .args(if self.http2 {
                vec!["-h2c".to_owned()]
            } else {
                vec![format!("-max-connections={}", self.connections)]
            })
            .args((!self.keepalive).then_some("-keepalive=false"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut attack = attack
            .spawn()
            .map_err(Error::io(format!("starting {}", vegeta.display())))?;
        let mut stdin = attack.stdin.take().expect("piped");
        stdin
            .write_all(format!("{target}\n").as_bytes())
            .await
            .map_err(Error::io("writing vegeta's target"))?;
        drop(stdin);
        let binary: Stdio = attack
            .stdout
            .take()
            .expect("piped")
            .try_into()
            .map_err(Error::io("piping vegeta attack into vegeta encode"))?;
        let mut encode = Command::new(&vegeta)
            .args(["encode", "--to", "json"])
            .stdin(binary)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io("starting vegeta encode"))?;
        let results = encode.stdout.take();
        Ok(Attack {
            attack,
            encode,
            results,
        })
    }
}

/// A client that comes in bursts: `burst` of this load, then `pause` of nothing, again and
/// again while `action` runs (the burst under way when it ends is finished, none starts after).
/// Its pauses can be longer than any quiet window a drain derives from the traffic.
#[derive(Clone, Debug)]
pub struct Bursts {
    pub load: Load,
    pub burst: Duration,
    pub pause: Duration,
    /// Bursts at most, whatever the action does.
    pub max_bursts: u32,
}

/// What a bursty client counted.
#[derive(Clone, Debug, Default)]
pub struct BurstsReport {
    pub report: LoadReport,
    pub bursts: u32,
}

impl Bursts {
    /// What `bursts` of these should have sent: the rate over each burst.
    pub fn expected(&self, bursts: u32) -> f64 {
        f64::from(bursts) * f64::from(self.load.rate) * self.burst.as_secs_f64()
    }

    pub async fn during<F: Future>(
        &self,
        url: &str,
        action: F,
    ) -> Result<(F::Output, BurstsReport)> {
        let (done_tx, mut done) = tokio::sync::watch::channel(false);
        let acting = async {
            let output = action.await;
            done_tx.send_replace(true);
            output
        };
        let one = Load {
            lead_in: self.burst,
            tail: Duration::ZERO,
            max_duration: self.burst + Duration::from_secs(5),
            ..self.load.clone()
        };
        let bursting = async {
            let mut all = BurstsReport::default();
            while all.bursts < self.max_bursts && !*done.borrow() {
                let ((), report) = one.during(url, std::future::ready(())).await?;
                all.report.merge(&report);
                all.bursts += 1;
                let _ = tokio::time::timeout(self.pause, done.wait_for(|d| *d)).await;
            }
            Ok::<_, Error>(all)
        };
        let (output, all) = tokio::join!(acting, bursting);
        Ok((output, all?))
    }
}

/// A running `vegeta attack | vegeta encode`.
struct Attack {
    attack: Child,
    encode: Child,
    results: Option<ChildStdout>,
}

impl Attack {
    /// Stops the attack the way vegeta stops on Ctrl-C: no new request, the ones in flight
    /// complete (or time out) and are reported. Idempotent.
    async fn stop(&mut self, request_timeout: Duration) -> Result<()> {
        if let Some(pid) = self.attack.id() {
            // tokio has no signal but SIGKILL for a child; `kill` is procps'.
            let sent = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await
                .map_err(Error::io("sending SIGINT to vegeta"))?;
            if !sent.success() && self.attack.try_wait().ok().flatten().is_none() {
                return Err(Error::Report(format!("kill -INT {pid} failed: {sent}")));
            }
        }
        let bound = request_timeout + Duration::from_secs(30);
        for (name, child) in [("attack", &mut self.attack), ("encode", &mut self.encode)] {
            let status = tokio::time::timeout(bound, child.wait())
                .await
                .map_err(|_| {
                    Error::Report(format!("vegeta {name} ran on {bound:?} after its stop"))
                })?
                .map_err(Error::io(format!("waiting for vegeta {name}")))?;
            if !status.success() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut stderr).await;
                }
                return Err(Error::Report(format!(
                    "vegeta {name} exited with {status}: {stderr}"
                )));
            }
        }
        Ok(())
    }
}

/// Counts results as vegeta reports them, until it is done.
async fn count(results: ChildStdout) -> Result<LoadReport> {
    let mut tally = Tally::default();
    let mut lines = BufReader::new(results).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(Error::io("reading vegeta's results"))?
    {
        tally.add(&line)?;
    }
    Ok(tally.finish())
}

/// vegeta's requests sent must be at least 80% of rate x duration: a stalled load generator
/// proves nothing.
pub fn check_sent(what: &str, load: &Load, report: &LoadReport) {
    let expected = f64::from(load.rate) * report.duration.as_secs_f64();
    eprintln!("{what}: {report} (expected about {expected:.0} requests)");
    assert!(
        report.sent as f64 >= 0.8 * expected,
        "{what}: only {} requests sent of about {expected:.0}: the load stalled",
        report.sent
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_non_2xx_count_as_failed() {
        let lines = [
            r#"{"code":200,"latency":1000000,"error":""}"#,
            r#"{"code":200,"latency":2000000,"error":""}"#,
            r#"{"code":502,"latency":3000000,"error":"502 Bad Gateway"}"#,
            r#"{"code":0,"latency":4000000,"error":"Post \"http://10.96.0.7/echo\": read tcp 10.244.0.1:41234->10.96.0.7:80: read: connection reset by peer"}"#,
            r#"{"code":0,"latency":10000000000,"error":"Get \"http://10.96.0.7/\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"}"#,
            "",
        ]
        .join("\n");
        let r = LoadReport::from_vegeta_json(&lines, Duration::from_secs(1)).unwrap();
        assert_eq!((r.sent, r.failed), (5, 3));
        assert_eq!(
            r.statuses,
            BTreeMap::from([("200".into(), 2), ("502".into(), 1)])
        );
        assert_eq!(
            r.errors,
            BTreeMap::from([
                ("connection reset by peer".into(), 1),
                (
                    "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                        .into(),
                    1
                ),
            ])
        );
        assert_eq!(r.p99_ms, 10_000.0);
    }

    #[test]
    fn failures_are_placed_in_time() {
        let lines = [
            r#"{"code":502,"latency":1,"error":"","timestamp":"2026-12-02T12:00:03.5Z"}"#,
            r#"{"code":200,"latency":1,"error":"","timestamp":"2026-12-02T12:00:09Z"}"#,
            r#"{"code":0,"latency":1,"error":"EOF","timestamp":"2026-12-02T12:00:01.25Z"}"#,
        ]
        .join("\n");
        let r = LoadReport::from_vegeta_json(&lines, Duration::from_secs(1)).unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            r.failed_span,
            Some((at("2026-12-02T12:00:01.25Z"), at("2026-12-02T12:00:03.5Z")))
        );
        let what: Vec<_> = r
            .failures
            .iter()
            .map(|f| (f.sent_at, f.what.as_str()))
            .collect();
        assert_eq!(
            what,
            [
                (at("2026-12-02T12:00:03.5Z"), "HTTP 502"),
                (at("2026-12-02T12:00:01.25Z"), "EOF"),
            ]
        );
        let mut merged = LoadReport::default();
        merged.merge(&r);
        assert_eq!(merged.failed_span, r.failed_span);
        assert_eq!(merged.failures, r.failures);
        assert!(
            LoadReport::from_vegeta_json(
                r#"{"code":0,"latency":1,"timestamp":"soon"}"#,
                Duration::ZERO
            )
            .is_err()
        );
    }

    #[test]
    fn a_line_vegeta_did_not_write_is_an_error() {
        assert!(LoadReport::from_vegeta_json("not json", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn p99_is_the_latency_99_percent_stay_under() {
        let mut l: Vec<_> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(p99_ms(&mut l), 198.0);
        assert!(p99_ms(&mut []).is_nan());
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
