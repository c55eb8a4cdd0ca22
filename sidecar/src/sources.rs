//! Where new connections come from: each connection's peer address, counted at its first
//! request (as `arrivals` counts it). A data plane shows up here as its sources: the client pods
//! kube-proxy routes, an ingress controller's pods, a load balancer's own addresses. The drain
//! compares this pod's sources with what its siblings got from the same sources
//! (`siblings`), and siblings read this table through the admin address's /connections.
//!
//! The request path pays one lock per new connection, never per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Sources kept at most. A balancer that keeps the clients' addresses (an NLB with client IP
/// preservation) may show more; then no comparison can account for all of them and the drain
/// waits for the data planes' lag instead.
pub const MAX_SOURCES: usize = 1024;
/// A source not seen for this long is forgotten when room is needed. Longer than any lag a
/// data plane is documented to have (docs/data-planes.md), so a data plane whose clients paused
/// for less is still accounted for.
pub const HORIZON: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// New connections from it since the sidecar started.
    pub connections: u64,
    pub last: Instant,
}

#[derive(Default)]
struct Table {
    by_ip: HashMap<IpAddr, Source>,
    /// The last time a source could not be recorded for lack of room.
    overflowed: Option<Instant>,
}

#[derive(Default)]
pub struct Sources {
    table: Mutex<Table>,
}

impl Sources {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new connection from `ip` made its first request.
    pub fn connection(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let mut t = self.table.lock().expect("not poisoned");
        if let Some(s) = t.by_ip.get_mut(&ip) {
            s.connections += 1;
            s.last = now;
            return;
        }
        if t.by_ip.len() >= MAX_SOURCES {
            t.by_ip
                .retain(|_, s| now.saturating_duration_since(s.last) < HORIZON);
            if t.by_ip.len() >= MAX_SOURCES {
                t.overflowed = Some(now);
                return;
            }
        }
        t.by_ip.insert(
            ip,
            Source {
                connections: 1,
                last: now,
            },
        );
    }

    /// New connections from each of `ips` so far (0 for one never seen): a sibling's answer.
    pub fn counts(&self, ips: &[IpAddr]) -> Vec<u64> {
        let t = self.table.lock().expect("not poisoned");
        ips.iter()
            .map(|ip| t.by_ip.get(&ip.to_canonical()).map_or(0, |s| s.connections))
            .collect()
    }

    /// Every source seen within `HORIZON` of `now`; None when some could not be recorded
    /// within it (the table is not the whole story then).
    pub fn recent(&self, now: Instant) -> Option<Vec<(IpAddr, Source)>> {
        let t = self.table.lock().expect("not poisoned");
        let within = |at: Instant| now.saturating_duration_since(at) < HORIZON;
        if t.overflowed.is_some_and(within) {
            return None;
        }
        Some(
            t.by_ip
                .iter()
                .filter(|(_, s)| within(s.last))
                .map(|(ip, s)| (*ip, *s))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn counts_connections_per_source_and_mapped_v4_as_v4() {
        let s = Sources::new();
        s.connection(ip("10.0.0.1"));
        s.connection(ip("::ffff:10.0.0.1"));
        s.connection(ip("10.0.0.2"));
        assert_eq!(
            s.counts(&[ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]),
            [2, 1, 0]
        );
        assert_eq!(s.recent(Instant::now()).unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_forgets_old_sources_and_says_when_it_could_not() {
        let s = Sources::new();
        for i in 0..MAX_SOURCES {
            s.connection(IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]));
        }
        s.connection(ip("10.9.9.9"));
        assert!(s.recent(Instant::now()).is_none(), "one source was lost");
        tokio::time::advance(HORIZON).await;
        assert!(s.recent(Instant::now()).unwrap().is_empty());
        s.connection(ip("10.9.9.9"));
        assert_eq!(s.recent(Instant::now()).unwrap().len(), 1);
    }
}
