//! Where kube-proxy on this node actually sends a Service's new connections: the DNAT targets of
//! its `KUBE-SEP-*` chains, read from `iptables-save -t nat` (the rules kube-proxy wrote, not the
//! EndpointSlices it was told). Sampled in the background, so a test can say when kube-proxy let a
//! pod go, beside when the API said so and when the pod stopped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::{Error, Result};

/// How often the rules are read: iptables-save of this node's nat table takes a few ms.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// The endpoints (`ip:port`) kube-proxy DNATs a Service port's connections to, from one
/// `iptables-save -t nat`. `service` is kube-proxy's comment: `<namespace>/<name>[:<port>]`.
pub fn endpoints(nat: &str, service: &str) -> BTreeSet<String> {
    let of_service = |comment: &str| {
        comment == service
            || comment
                .strip_prefix(service)
                .is_some_and(|port| port.starts_with(':'))
    };
    nat.lines()
        .filter(|l| l.starts_with("-A KUBE-SEP-"))
        .filter(|l| comment(l).is_some_and(of_service))
        .filter_map(|l| {
            let (_, to) = l.split_once("--to-destination ")?;
            Some(to.split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// The `--comment` of an iptables-save line, unquoted.
fn comment(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("--comment ")?;
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').map(|(c, _)| c),
        None => rest.split_whitespace().next(),
    }
}

/// When kube-proxy's endpoints of a Service changed, and to what.
pub type RouteChange = (Timestamp, BTreeSet<String>);

/// The NAT rules of a network namespace's kube-proxy (`None`: the host's).
pub fn nat_rules(netns: Option<&str>) -> Result<String> {
    let out = crate::node_proxies::command_in(netns, "iptables-save")
        .args(["-t", "nat"])
        .output()
        .map_err(Error::io("running iptables-save"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("iptables-save -t nat in {netns:?}"),
            message: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every change of some Services' endpoints (together) in one kube-proxy's rules, from when it
/// started to when it is dropped.
pub struct RouteWatch {
    changes: Arc<Mutex<Vec<RouteChange>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RouteWatch {
    /// The host's kube-proxy.
    pub fn start(service: &str) -> Self {
        Self::start_in(None, &[service])
    }

    /// The kube-proxy of network namespace `netns` (`None`: the host's), the endpoints of all of
    /// `services` as one set: one iptables-save per sample, however many Services.
    pub fn start_in(netns: Option<&str>, services: &[&str]) -> Self {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (changes, stop) = (changes.clone(), stop.clone());
            let netns = netns.map(str::to_owned);
            let services: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
            move || {
                let mut last: Option<BTreeSet<String>> = None;
                while !stop.load(Ordering::Relaxed) {
                    let rules = match nat_rules(netns.as_deref()) {
                        Ok(rules) => rules,
                        Err(e) => {
                            eprintln!("kube-proxy's rules unreadable: {e}");
                            return;
                        }
                    };
                    let now: BTreeSet<String> = services
                        .iter()
                        .flat_map(|service| endpoints(&rules, service))
                        .collect();
                    if last.as_ref() != Some(&now) {
                        let mut seen = changes.lock().expect("not poisoned");
                        seen.push((Timestamp::now(), now.clone()));
                        last = Some(now);
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            }
        });
        Self {
            changes,
            stop,
            thread: Some(thread),
        }
    }

    /// When the endpoints changed, and to what (the first entry: what they were at the start).
    pub fn changes(&self) -> Vec<RouteChange> {
        self.changes.lock().expect("not poisoned").clone()
    }

    /// The sampling interval: a removal is seen at most this much (and one iptables-save) late.
    pub fn resolution() -> Duration {
        SAMPLE_EVERY
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// When the rules first stopped sending to `ip` (any port) at or after `since`, having sent to
/// it just before: when that kube-proxy let the pod go.
pub fn removed_at(changes: &[RouteChange], ip: &str, since: Timestamp) -> Option<Timestamp> {
    let has = |set: &BTreeSet<String>| {
        set.iter()
            .any(|e| e.rsplit_once(':').is_some_and(|(a, _)| a == ip))
    };
    changes
        .windows(2)
        .find(|w| w[1].0 >= since && has(&w[0].1) && !has(&w[1].1))
        .map(|w| w[1].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_endpoints_are_its_sep_chains_dnat_targets() {
        let nat = r#"
-A KUBE-SEP-AAA -s 10.244.0.25/32 -m comment --comment "ns-1/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAA -p tcp -m comment --comment "ns-1/web" -m tcp -j DNAT --to-destination 10.244.0.25:9080
-A KUBE-SEP-BBB -p tcp -m comment --comment "ns-1/web" -m tcp -j DNAT --to-destination 10.244.0.26:9080
-A KUBE-SEP-CCC -p tcp -m comment --comment "ns-1/webber" -m tcp -j DNAT --to-destination 10.244.0.9:9080
-A KUBE-SEP-DDD -p tcp -m comment --comment ns-2/web -m tcp -j DNAT --to-destination 10.244.0.7:80
-A KUBE-SEP-EEE -p tcp -m comment --comment "ns-3/web:http" -m tcp -j DNAT --to-destination 10.244.0.8:80
-A KUBE-SVC-XXX -m comment --comment "ns-1/web -> 10.244.0.25:9080" -j KUBE-SEP-AAA
"#;
        let got: Vec<_> = endpoints(nat, "ns-1/web").into_iter().collect();
        assert_eq!(got, ["10.244.0.25:9080", "10.244.0.26:9080"]);
        let got: Vec<_> = endpoints(nat, "ns-2/web").into_iter().collect();
        assert_eq!(got, ["10.244.0.7:80"]);
        let got: Vec<_> = endpoints(nat, "ns-3/web").into_iter().collect();
        assert_eq!(got, ["10.244.0.8:80"]);
        assert!(endpoints(nat, "ns-4/web").is_empty());
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn set(eps: &[&str]) -> BTreeSet<String> {
        eps.iter().map(|e| (*e).to_owned()).collect()
    }

    #[test]
    fn a_pod_is_removed_when_the_rules_stop_naming_its_ip() {
        let changes = vec![
            (at("2026-12-07T10:00:00Z"), set(&["10.244.0.5:9080"])),
            (
                at("2026-12-07T10:00:01Z"),
                set(&["10.244.0.5:9080", "10.244.0.6:9080"]),
            ),
            (at("2026-12-07T10:00:05Z"), set(&["10.244.0.6:9080"])),
            (
                at("2026-12-07T10:00:30Z"),
                set(&["10.244.0.5:9080", "10.244.0.6:9080"]),
            ),
            (at("2026-12-07T10:00:40Z"), set(&["10.244.0.6:9080"])),
        ];
        let since = at("2026-12-07T10:00:03Z");
        assert_eq!(
            removed_at(&changes, "10.244.0.5", since),
            Some(at("2026-12-07T10:00:05Z"))
        );
        // The same IP given to a later pod: its own removal.
        assert_eq!(
            removed_at(&changes, "10.244.0.5", at("2026-12-07T10:00:20Z")),
            Some(at("2026-12-07T10:00:40Z"))
        );
        assert_eq!(removed_at(&changes, "10.244.0.6", since), None);
        // A prefix of another address is not that address.
        assert_eq!(removed_at(&changes, "10.244.0.", since), None);
    }
}
