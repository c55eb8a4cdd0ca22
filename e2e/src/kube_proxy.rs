//! Where kube-proxy on this node actually sends a Service's new connections: the DNAT targets of
//! its `KUBE-SEP-*` chains, read from `iptables-save -t nat` (the rules kube-proxy wrote, not the
//! EndpointSlices it was told). Sampled in the background, so a test can say when kube-proxy let a
//! pod go, beside when the API said so and when the pod stopped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

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

/// Every change of a Service's endpoints in kube-proxy's rules, from when it started to when it
/// is dropped.
pub struct RouteWatch {
    changes: Arc<Mutex<Vec<RouteChange>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RouteWatch {
    pub fn start(service: &str) -> Self {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (changes, stop, service) = (changes.clone(), stop.clone(), service.to_owned());
            move || {
                let mut last: Option<BTreeSet<String>> = None;
                while !stop.load(Ordering::Relaxed) {
                    let out = std::process::Command::new("iptables-save")
                        .args(["-t", "nat"])
                        .output();
                    match &out {
                        Ok(out) if out.status.success() => {}
                        _ => {
                            eprintln!("kube-proxy's rules unreadable: iptables-save: {out:?}");
                            return;
                        }
                    }
                    if let Ok(out) = out {
                        let now = endpoints(&String::from_utf8_lossy(&out.stdout), &service);
                        if last.as_ref() != Some(&now) {
                            let mut seen = changes.lock().expect("not poisoned");
                            seen.push((Timestamp::now(), now.clone()));
                            last = Some(now);
                        }
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
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
}
