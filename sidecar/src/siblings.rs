//! Positive evidence that the data planes have let the pod go, for a drain that would otherwise
//! wait for their documented lag: the pod's siblings (the other ready pods of its Services) keep
//! getting new connections from the sources that used to reach this pod, and this pod gets none.
//! A silence says nothing when the clients merely paused; a sibling's traffic from the same
//! source, while none comes here, says that source's data plane routes elsewhere now.
//!
//! The comparison counts new connections only: a request on a connection a data plane pinned
//! to a sibling long ago is no routing decision, while every connection is one (and from
//! Quiescing on, every response here says `Connection: close`, so each request that still
//! reaches this pod comes on a new connection). docs/drain.md gives the rule and its limits.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use crate::defaults;
use crate::deregister::{EndpointWatch, PodRef};
use crate::sources::{Source, Sources};

/// How often the siblings are asked.
pub const POLL: Duration = Duration::from_secs(1);
/// Siblings asked at most: the evidence needs a few, the cost grows with each.
pub const MAX_SIBLINGS: usize = 8;
/// Sources asked about at most; past it, the drain waits for the lag.
pub const MAX_ASKED: usize = 256;
/// How often the siblings' list is read again (a rollout adds pods and removes others).
const REFRESH: Duration = Duration::from_secs(15);
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// The chance, accepted per source, that a data plane still sending here happened to send all
/// the needed connections to siblings.
const FALSE_LET_GO: f64 = 0.001;

/// New connections the siblings must get from a source, with none here meanwhile, before that
/// source counts as let go. While its data plane still spreads connections over this pod and
/// `siblings` others, each misses this pod with chance s/(s+1) at most (even spreading; a
/// least-connections balancer favours a pod that is closing its connections), so k in a row
/// happen with chance (s/(s+1))^k: k is the least that makes it `FALSE_LET_GO`.
pub fn needed(siblings: usize) -> u64 {
    let s = siblings as f64;
    (FALSE_LET_GO.ln() / (s / (s + 1.0)).ln()).ceil() as u64
}

/// What the siblings have shown so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LetGo {
    /// Sources that sent this pod connections within `sources::HORIZON`.
    pub sources: u64,
    /// Those whose data plane the siblings show routing elsewhere.
    pub let_go: u64,
}

impl LetGo {
    /// Every source known has let go. Never true for a pod that knows no source: silence is no
    /// evidence.
    pub fn all(&self) -> bool {
        self.sources > 0 && self.let_go == self.sources
    }
}

/// Per source: since when it is watched (after its last connection here), and each sibling's
/// count at that time.
struct Watched {
    since: Instant,
    baselines: HashMap<SocketAddr, u64>,
}

/// The comparison across rounds.
#[derive(Default)]
pub struct Comparison {
    watched: HashMap<IpAddr, Watched>,
}

impl Comparison {
    /// One round: the siblings were asked at `asked_at`; `sources` is this pod's table read
    /// after their answers (so a connection here while they answered starts its source over);
    /// `answers`, per sibling that answered, its count for each source.
    pub fn round(
        &mut self,
        asked_at: Instant,
        sources: &[(IpAddr, Source)],
        answers: &[(SocketAddr, HashMap<IpAddr, u64>)],
    ) -> LetGo {
        self.watched
            .retain(|ip, _| sources.iter().any(|(s, _)| s == ip));
        let mut let_go = 0;
        for (ip, source) in sources {
            let w = self.watched.entry(*ip).or_insert_with(|| Watched {
                since: asked_at,
                baselines: HashMap::new(),
            });
            if source.last >= w.since {
                // It reached this pod since: what the siblings got before proves nothing.
                *w = Watched {
                    since: asked_at,
                    baselines: HashMap::new(),
                };
                continue;
            }
            let (mut moved, mut siblings) = (0, 0);
            for (sibling, counts) in answers {
                let Some(&count) = counts.get(ip) else {
                    continue;
                };
                match w.baselines.get_mut(sibling) {
                    Some(base) if count >= *base => {
                        moved += count - *base;
                        siblings += 1;
                    }
                    // The sibling restarted its count: start over with it.
                    Some(base) => *base = count,
                    None => {
                        w.baselines.insert(*sibling, count);
                    }
                }
            }
            if siblings > 0 && moved >= needed(siblings) {
                let_go += 1;
            }
        }
        LetGo {
            sources: sources.len() as u64,
            let_go,
        }
    }
}

/// Where the siblings are: given (`--siblings`), or the ready endpoints of the pod's Services.
pub struct Siblings {
    fixed: Vec<SocketAddr>,
    pod: Option<PodRef>,
    admin_port: u16,
}

impl Siblings {
    pub fn new(fixed: Vec<SocketAddr>, pod: Option<PodRef>, admin_port: u16) -> Self {
        Self {
            fixed,
            pod,
            admin_port,
        }
    }

    async fn list(&self) -> Vec<SocketAddr> {
        if !self.fixed.is_empty() {
            return self.fixed.clone();
        }
        let Some(pod) = &self.pod else {
            return Vec::new();
        };
        match EndpointWatch::ready_peers(pod).await {
            Ok(ips) => {
                // Start at this pod's place in the list, so drainers spread their questions.
                let at = ips.partition_point(|ip| *ip < pod.ip);
                let n = ips.len();
                (0..n.min(MAX_SIBLINGS))
                    .map(|i| SocketAddr::new(ips[(at + i) % n], self.admin_port))
                    .collect()
            }
            Err(e) => {
                warn!(error = %e, "cannot list the siblings: the drain waits for the data planes' lag");
                Vec::new()
            }
        }
    }

    /// Compares notes with the siblings every `POLL`, and tells `tx` what they show. Runs
    /// until dropped.
    pub async fn compare(&self, sources: &Sources, tx: watch::Sender<LetGo>) {
        let mut comparison = Comparison::default();
        let mut siblings = Vec::new();
        let mut listed: Option<Instant> = None;
        loop {
            if listed.is_none_or(|at| at.elapsed() >= REFRESH) {
                siblings = self.list().await;
                listed = Some(Instant::now());
                info!(siblings = siblings.len(), "comparing notes with siblings");
            }
            let asked_at = Instant::now();
            let asked = match sources.recent(asked_at) {
                Some(recent) if !recent.is_empty() && recent.len() <= MAX_ASKED => {
                    recent.into_iter().map(|(ip, _)| ip).collect::<Vec<_>>()
                }
                // No source, or more than the comparison can account for: nothing to show.
                _ => {
                    tx.send_replace(LetGo::default());
                    sleep(POLL).await;
                    continue;
                }
            };
            let answers: Vec<_> = join_all(siblings.iter().map(|s| ask(*s, &asked)))
                .await
                .into_iter()
                .zip(&siblings)
                .filter_map(|(answer, sibling)| match answer {
                    Ok(counts) if counts.len() == asked.len() => {
                        Some((*sibling, asked.iter().copied().zip(counts).collect()))
                    }
                    Ok(_) => None,
                    Err(e) => {
                        debug!(%sibling, error = %e, "sibling did not answer");
                        None
                    }
                })
                .collect();
            let now_known = sources.recent(Instant::now()).unwrap_or_default();
            let let_go = comparison.round(asked_at, &now_known, &answers);
            tx.send_if_modified(|old| std::mem::replace(old, let_go) != let_go);
            sleep(POLL).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(http::StatusCode),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// A sibling's counts of new connections from `sources` (POST /connections on its admin
/// address).
async fn ask(sibling: SocketAddr, sources: &[IpAddr]) -> Result<Vec<u64>, AskError> {
    timeout(ASK_TIMEOUT, async {
        let stream = TcpStream::connect(sibling).await?;
        let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(sources)?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(defaults::CONNECTIONS_PATH)
            .header(header::HOST, sibling.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let resp = send.send_request(req).await?;
        if !resp.status().is_success() {
            return Err(AskError::Status(resp.status()));
        }
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    })
    .await
    .map_err(|_| AskError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn sib(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::from([10, 1, 0, last]), 9901)
    }

    fn answer(sibling: u8, counts: &[(u8, u64)]) -> (SocketAddr, HashMap<IpAddr, u64>) {
        (
            sib(sibling),
            counts.iter().map(|(s, c)| (ip(*s), *c)).collect(),
        )
    }

    #[test]
    fn needed_grows_with_the_siblings() {
        assert_eq!(needed(1), 10);
        assert_eq!(needed(2), 18);
        assert_eq!(needed(3), 25);
        assert!(needed(8) < 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_lets_go_once_siblings_got_enough_of_its_connections_and_this_pod_none() {
        let mut c = Comparison::default();
        let t0 = Instant::now();
        let known = [(
            ip(1),
            Source {
                connections: 5,
                last: t0,
            },
        )];
        tokio::time::advance(POLL).await;
        // First round: baselines.
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 100)])]);
        assert_eq!(
            r,
            LetGo {
                sources: 1,
                let_go: 0
            }
        );
        tokio::time::advance(POLL).await;
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 109)])]);
        assert!(!r.all(), "9 < 10 with one sibling");
        tokio::time::advance(POLL).await;
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 110)])]);
        assert!(r.all());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_here_starts_the_source_over() {
        let mut c = Comparison::default();
        let t0 = Instant::now();
        let mut known = [(
            ip(1),
            Source {
                connections: 5,
                last: t0,
            },
        )];
        tokio::time::advance(POLL).await;
        c.round(Instant::now(), &known, &[answer(1, &[(1, 0)])]);
        tokio::time::advance(POLL).await;
        // The data plane still sends here now and then.
        known[0].1.last = Instant::now();
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 50)])]);
        assert!(!r.all());
        tokio::time::advance(POLL).await;
        // New baseline at 50: 9 more are not enough.
        c.round(Instant::now(), &known, &[answer(1, &[(1, 50)])]);
        tokio::time::advance(POLL).await;
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 59)])]);
        assert!(!r.all());
    }

    #[tokio::test(start_paused = true)]
    async fn every_source_must_let_go_and_no_source_is_no_evidence() {
        let mut c = Comparison::default();
        assert!(!c.round(Instant::now(), &[], &[]).all());
        let t0 = Instant::now();
        let known = [
            (
                ip(1),
                Source {
                    connections: 1,
                    last: t0,
                },
            ),
            // A second data plane's source (a load balancer), whose clients paused.
            (
                ip(2),
                Source {
                    connections: 1,
                    last: t0,
                },
            ),
        ];
        tokio::time::advance(POLL).await;
        c.round(
            Instant::now(),
            &known,
            &[answer(1, &[(1, 0), (2, 7)]), answer(2, &[(1, 0), (2, 7)])],
        );
        tokio::time::advance(POLL).await;
        let r = c.round(
            Instant::now(),
            &known,
            &[answer(1, &[(1, 20), (2, 7)]), answer(2, &[(1, 20), (2, 7)])],
        );
        assert_eq!(
            r,
            LetGo {
                sources: 2,
                let_go: 1
            }
        );
        assert!(!r.all(), "the paused source is not shown let go by silence");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sibling_that_restarted_its_count_is_taken_anew() {
        let mut c = Comparison::default();
        let known = [(
            ip(1),
            Source {
                connections: 1,
                last: Instant::now(),
            },
        )];
        tokio::time::advance(POLL).await;
        c.round(Instant::now(), &known, &[answer(1, &[(1, 500)])]);
        tokio::time::advance(POLL).await;
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 3)])]);
        assert!(!r.all());
        tokio::time::advance(POLL).await;
        let r = c.round(Instant::now(), &known, &[answer(1, &[(1, 13)])]);
        assert!(r.all());
    }
}
