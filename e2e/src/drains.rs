//! The sidecar's own account of each drain: the JSON summary it writes to its termination
//! message on exit, which exists only between that exit and the pod's deletion, so a watch
//! collects it as it passes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use serde::Deserialize;

use crate::namespace::TestNamespace;

/// The sidecar's container name in injected pods.
const SIDECAR: &str = "graceful-sidecar";

/// The fields of the sidecar's drain summary the tests read.
#[derive(Clone, Debug, Deserialize)]
pub struct DrainSummary {
    pub deregistration: String,
    pub deregistering_seconds: f64,
    pub quiescing_seconds: f64,
    pub total_seconds: f64,
    pub requests_after_trigger: u64,
    pub quiet_window: QuietWindow,
    pub traffic_after_deregistration_seconds: f64,
    pub forced: bool,
    /// The hold for the data planes other than kube-proxy (0: none).
    #[serde(default)]
    pub data_plane_lag_seconds: f64,
    /// "traffic", "lag", "siblings" or "timeout".
    #[serde(default)]
    pub released_by: String,
    #[serde(default)]
    pub sources: u64,
    #[serde(default)]
    pub sources_let_go: u64,
    /// When the sidecar exited (its container's `finishedAt`): the drain began
    /// `total_seconds` before.
    #[serde(skip)]
    pub exited_at: Option<Timestamp>,
    /// The pod's IP, to find it in kube-proxy's rules.
    #[serde(skip)]
    pub pod_ip: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct QuietWindow {
    pub seconds: f64,
    pub basis: String,
}

impl std::fmt::Display for DrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s = deregister {:.1}s ({}) + quiesce {:.1}s; traffic for {:.1}s after deregistration, \
             window {:.2}s ({}), {} requests after the trigger, data-plane lag {:.0}s, released by {} \
             ({} of {} sources let go){}",
            self.total_seconds,
            self.deregistering_seconds,
            self.deregistration,
            self.quiescing_seconds,
            self.traffic_after_deregistration_seconds,
            self.quiet_window.seconds,
            self.quiet_window.basis,
            self.requests_after_trigger,
            self.data_plane_lag_seconds,
            self.released_by,
            self.sources_let_go,
            self.sources,
            if self.forced { ", FORCED" } else { "" }
        )
    }
}

/// Collects the drain summaries of the namespace's pods until dropped.
pub struct DrainWatch {
    seen: Arc<Mutex<BTreeMap<String, DrainSummary>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DrainWatch {
    pub fn start(ns: &TestNamespace) -> Self {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let pods = ns.api::<Pod>();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                // A pod's last status may come after its sandbox, and so its IP, is gone: the
                // IP it had before.
                let mut ips: BTreeMap<String, String> = BTreeMap::new();
                let events = watcher::watcher(pods, watcher::Config::default());
                futures::pin_mut!(events);
                while let Some(event) = events.next().await {
                    let Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) = event
                    else {
                        continue;
                    };
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
                        ips.insert(name.clone(), ip);
                    }
                    if let Some(mut summary) = summary_of(&pod) {
                        summary.pod_ip = summary.pod_ip.or_else(|| ips.get(&name).cloned());
                        seen.lock().expect("not poisoned").insert(name, summary);
                    }
                }
            }
        });
        Self { seen, task }
    }

    /// Pod name -> its sidecar's summary, for every drain seen so far.
    pub fn summaries(&self) -> BTreeMap<String, DrainSummary> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn summary_of(pod: &Pod) -> Option<DrainSummary> {
    let status = pod.status.as_ref()?;
    let sidecar = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR)?;
    let terminated = sidecar.state.as_ref()?.terminated.as_ref()?;
    let mut summary: DrainSummary = serde_json::from_str(terminated.message.as_ref()?).ok()?;
    summary.exited_at = terminated.finished_at.as_ref().map(|t| t.0);
    summary.pod_ip = status.pod_ip.clone();
    Some(summary)
}
