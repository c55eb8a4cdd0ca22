//! The drains of a rollout's old pods, for its record: when each began (the pod's deletion),
//! when it ended (the sidecar's exit, else when the pod was seen gone) and how many connections
//! the sidecar had to cut.
//!
//! The sidecar says the last two in its termination message, which exists only between its
//! exit and the pod's deletion: well under a second, so a reconcile's list almost never sees
//! it. A watch on injected pods (label `graceful.dev/injected`) keeps it as it passes.
//! Both are in memory: an operator that restarts mid-rollout records the drains it saw.
//!
//! Newer sidecars also say which data planes they assumed in front of the pod, the lag they
//! held for, and what released the drain (docs/data-planes.md); older ones omit these, which
//! then read as unknown.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::scope::Scope;
use crate::webhook::annotations::INJECTED_LABEL;

/// How long a sidecar's report waits to be claimed by a rollout before it is forgotten.
const REPORT_TTL: SignedDuration = SignedDuration::from_secs(3600);

/// One data plane the sidecar assumed in front of its pod, and its lag.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DataPlaneLag {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub lag_seconds: f64,
}

/// The drain summary a sidecar writes into its termination message and answers /prestop with:
/// the fields the operator and kubectl-graceful read. Everything but `connections_cut` may be
/// missing (older sidecars), and fields it does not know are ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DrainSummary {
    pub connections_cut: i64,
    #[serde(default)]
    pub requests_cut: i64,
    #[serde(default)]
    pub forced: bool,
    #[serde(default)]
    pub total_seconds: Option<f64>,
    /// The data planes assumed (GRACEFUL_DATA_PLANES), kube-proxy included.
    #[serde(default)]
    pub data_planes: Vec<DataPlaneLag>,
    /// The hold: the largest lag of the data planes other than kube-proxy.
    #[serde(default)]
    pub data_plane_lag_seconds: Option<f64>,
    /// What ended the wait for the data planes: "traffic", "lag", "siblings" or "timeout".
    #[serde(default)]
    pub released_by: Option<String>,
    #[serde(default)]
    pub sources: u64,
    #[serde(default)]
    pub sources_let_go: u64,
}

impl DrainSummary {
    /// Reads a summary; None for anything else (a crash's log tail, an older format).
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// "lag 120s, released by lag", or None from an older sidecar that said neither.
    pub fn release(&self) -> Option<String> {
        let lag = self
            .data_plane_lag_seconds
            .map(|l| format!("data-plane lag {}", seconds_text(l)));
        let by = self
            .released_by
            .as_ref()
            .map(|b| format!("released by {b}"));
        let both: Vec<String> = lag.into_iter().chain(by).collect();
        (!both.is_empty()).then(|| both.join(", "))
    }

    /// "kube-proxy 5s, load-balancer/web 120s".
    pub fn data_planes_text(&self) -> String {
        self.data_planes
            .iter()
            .map(|d| format!("{} {}", d.name, seconds_text(d.lag_seconds)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `5s`, `1.5s`.
pub fn seconds_text(seconds: f64) -> String {
    if seconds.fract() == 0.0 {
        format!("{seconds:.0}s")
    } else {
        format!("{seconds:.1}s")
    }
}

/// What one sidecar said when it exited.
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarReport {
    pub connections_cut: i64,
    pub requests_cut: i64,
    /// The drain timeout ended the drain, cutting what was open.
    pub forced: bool,
    /// From the trigger to the end (absent from the reports of older sidecars).
    pub seconds: Option<f64>,
    pub finished: Timestamp,
    /// The hold for the data planes in front, and what released the drain (absent from the
    /// reports of older sidecars).
    pub data_plane_lag_seconds: Option<f64>,
    pub released_by: Option<String>,
}

/// One old pod's drain as seen by the reconciles of one rollout.
#[derive(Clone, Debug, Default)]
struct DrainSeen {
    /// The GracefulRollout and its rollout's start time.
    rollout: String,
    started: Option<Timestamp>,
    /// When a reconcile first found the pod gone: the fallback end without a report.
    gone: Option<Timestamp>,
}

/// What a finished rollout's record says about its drains.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DrainTotals {
    pub pods: i32,
    /// Drains whose sidecar report arrived (the rest end when their pod was seen gone).
    pub reported: i32,
    pub longest_seconds: i64,
    pub connections_cut: i64,
    /// The longest drain's data-plane lag and what released it, when its sidecar said.
    pub longest_data_plane_lag_seconds: Option<f64>,
    pub longest_released_by: Option<String>,
}

#[derive(Default)]
pub struct Drains {
    /// Pod uid -> its drain, while the rollout is in progress.
    seen: Mutex<HashMap<String, DrainSeen>>,
    /// Pod uid -> its sidecar's report, from the pod watch.
    reports: Mutex<HashMap<String, SidecarReport>>,
}

impl Drains {
    /// Notes, for `rollout` (its GracefulRollout and start: one map serves them all), each of
    /// its `pods` being deleted and each of its pods seen before that is no longer there.
    pub fn track(&self, rollout: &str, pods: &[Pod]) {
        let now = Timestamp::now();
        let mut seen = self.seen.lock().expect("drains lock");
        for pod in pods {
            let Some(deleted) = pod.metadata.deletion_timestamp.as_ref() else {
                continue;
            };
            // deletionTimestamp is the deadline (deletion + grace period), not the deletion.
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
            let began = deleted
                .0
                .checked_sub(SignedDuration::from_secs(grace))
                .unwrap_or(deleted.0);
            seen.entry(uid_of(pod))
                .or_insert_with(|| DrainSeen {
                    rollout: rollout.into(),
                    ..Default::default()
                })
                .started
                .get_or_insert(began);
        }
        for (uid, d) in seen.iter_mut() {
            if d.rollout == rollout && d.gone.is_none() && !pods.iter().any(|p| uid_of(p) == *uid) {
                d.gone = Some(now);
            }
        }
    }

    /// Keeps what a sidecar reported on exit.
    pub fn report(&self, uid: String, report: SidecarReport) {
        let mut reports = self.reports.lock().expect("reports lock");
        let horizon = report.finished.checked_sub(REPORT_TTL).ok();
        reports.retain(|_, r| horizon.is_none_or(|h| r.finished > h));
        reports.insert(uid, report);
    }

    /// The totals of `rollout` so far.
    pub fn totals(&self, rollout: &str) -> DrainTotals {
        let seen = self.seen.lock().expect("drains lock");
        let reports = self.reports.lock().expect("reports lock");
        let mut totals = DrainTotals::default();
        let mut timed = false;
        for (uid, d) in seen.iter().filter(|(_, d)| d.rollout == rollout) {
            let report = reports.get(uid);
            totals.pods += 1;
            totals.reported += i32::from(report.is_some());
            totals.connections_cut += report.map_or(0, |r| r.connections_cut);
            let ended = report.map(|r| r.finished).or(d.gone);
            if let (Some(start), Some(end)) = (d.started, ended) {
                let secs = end.duration_since(start).as_secs();
                if !timed || secs > totals.longest_seconds {
                    timed = true;
                    totals.longest_seconds = secs;
                    totals.longest_data_plane_lag_seconds =
                        report.and_then(|r| r.data_plane_lag_seconds);
                    totals.longest_released_by = report.and_then(|r| r.released_by.clone());
                }
            }
        }
        totals
    }

    /// Drops what was kept for `rollout`, once its record is written.
    pub fn forget(&self, rollout: &str) {
        let mut seen = self.seen.lock().expect("drains lock");
        let mut reports = self.reports.lock().expect("reports lock");
        seen.retain(|uid, d| {
            let mine = d.rollout == rollout;
            if mine {
                reports.remove(uid);
            }
            !mine
        });
    }
}

/// The sidecar's drain summary, from its terminated container's message.
pub fn sidecar_report(pod: &Pod) -> Option<SidecarReport> {
    let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let terminated = s.state.as_ref()?.terminated.as_ref()?;
        let summary = DrainSummary::parse(terminated.message.as_ref()?)?;
        Some(SidecarReport {
            connections_cut: summary.connections_cut,
            requests_cut: summary.requests_cut,
            forced: summary.forced,
            seconds: summary.total_seconds,
            finished: terminated
                .finished_at
                .as_ref()
                .map_or_else(Timestamp::now, |t| t.0),
            data_plane_lag_seconds: summary.data_plane_lag_seconds,
            released_by: summary.released_by,
        })
    })
}

/// Feeds `drains` with every injected pod's sidecar report in `scope`, and counts each report
/// once in `metrics`, until the watch ends (never, on its own: errors are retried with backoff).
pub async fn watch_reports(client: Client, scope: &Scope, drains: &Drains, metrics: &Metrics) {
    let config = watcher::Config::default().labels(&format!("{INJECTED_LABEL}=true"));
    let mut events = scope.watch::<Pod>(&client, config).applied_objects();
    // A terminated pod's every later event carries the same report.
    let mut counted = Counted::default();
    let mut namespaces = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(pod) => {
                // Long before its pods drain, a namespace's series exist at 0.
                let ns = pod.namespace().unwrap_or_default();
                if !namespaces.contains(&ns) {
                    metrics.watch_namespace(&ns);
                    namespaces.insert(ns.clone());
                }
                if let Some(report) = sidecar_report(&pod) {
                    let uid = uid_of(&pod);
                    if counted.first(&uid, report.finished) {
                        metrics.observe_drain(&ns, &report);
                    }
                    drains.report(uid, report);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "pod watch for drain reports");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The pods whose report was counted, for as long as a report is kept.
#[derive(Default)]
struct Counted(HashMap<String, Timestamp>);

impl Counted {
    /// Whether `uid`'s report (finished at `finished`) is seen for the first time.
    fn first(&mut self, uid: &str, finished: Timestamp) -> bool {
        if self.0.contains_key(uid) {
            return false;
        }
        if let Ok(horizon) = finished.checked_sub(REPORT_TTL) {
            self.0.retain(|_, f| *f > horizon);
        }
        self.0.insert(uid.to_owned(), finished);
        true
    }
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn pod(uid: &str, deleted_at: Option<i64>, grace: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                deletion_timestamp: deleted_at.map(|s| Time(at(s + grace))),
                deletion_grace_period_seconds: deleted_at.map(|_| grace),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn terminated_sidecar(message: &str, finished: i64) -> Pod {
        Pod {
            status: Some(PodStatus {
                init_container_statuses: Some(vec![ContainerStatus {
                    name: "graceful-sidecar".into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            message: Some(message.into()),
                            finished_at: Some(Time(at(finished))),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..pod("a", None, 0)
        }
    }

    /// A clean drain's report.
    fn report(connections_cut: i64, finished: i64) -> SidecarReport {
        SidecarReport {
            connections_cut,
            requests_cut: 0,
            forced: false,
            seconds: None,
            finished: at(finished),
            data_plane_lag_seconds: None,
            released_by: None,
        }
    }

    #[test]
    fn each_report_counts_once_and_is_forgotten_after_its_ttl() {
        let mut counted = Counted::default();
        assert!(counted.first("a", at(0)));
        assert!(!counted.first("a", at(5)), "the same pod's later events");
        assert!(counted.first("b", at(10)));
        // An hour and more later, "a" is no longer kept.
        assert!(counted.first("c", at(3601)));
        assert!(!counted.0.contains_key("a") && counted.0.contains_key("b"));
    }

    #[test]
    fn a_sidecar_report_is_read_from_its_termination_message() {
        let summary = r#"{"trigger":"prestop","connections_cut":2,"requests_cut":1,"forced":true,"total_seconds":30.5}"#;
        assert_eq!(
            sidecar_report(&terminated_sidecar(summary, 7)),
            Some(SidecarReport {
                connections_cut: 2,
                requests_cut: 1,
                forced: true,
                seconds: Some(30.5),
                finished: at(7),
                data_plane_lag_seconds: None,
                released_by: None,
            })
        );
        // An older sidecar's summary: only what the record needs.
        assert_eq!(
            sidecar_report(&terminated_sidecar(r#"{"connections_cut":0}"#, 7)),
            Some(report(0, 7))
        );
        assert_eq!(sidecar_report(&terminated_sidecar("exit 137", 7)), None);
        assert_eq!(sidecar_report(&pod("a", None, 0)), None);
    }

    #[test]
    fn a_report_gives_the_drain_its_end_and_cut_count() {
        let drains = Drains::default();
        // "a" deleted at 10 with a 30 s grace period; "b" running.
        drains.track("r1", &[pod("a", Some(10), 30), pod("b", None, 0)]);
        drains.report("a".into(), report(3, 16));
        let totals = drains.totals("r1");
        assert_eq!(
            totals,
            DrainTotals {
                pods: 1,
                reported: 1,
                longest_seconds: 6,
                connections_cut: 3,
                longest_data_plane_lag_seconds: None,
                longest_released_by: None,
            }
        );
        assert_eq!(drains.totals("r1"), totals, "unchanged until forgotten");
        drains.forget("r1");
        assert_eq!(drains.totals("r1"), DrainTotals::default());
    }

    #[test]
    fn without_a_report_the_drain_ends_when_the_pod_is_seen_gone() {
        let drains = Drains::default();
        drains.track("r1", &[pod("a", Some(-100), 30)]);
        drains.track("r1", &[]);
        let totals = drains.totals("r1");
        assert_eq!(
            (totals.pods, totals.reported, totals.connections_cut),
            (1, 0, 0)
        );
        // Deleted long before "now", gone now: the whole wait counts.
        assert!(totals.longest_seconds > 100, "{totals:?}");
    }

    #[test]
    fn other_rollouts_drains_are_kept() {
        let drains = Drains::default();
        drains.track("r1", &[pod("a", Some(10), 30)]);
        // r2's pods never include r1's: its reconciles must not end r1's drains.
        drains.track("r2", &[pod("b", Some(20), 30)]);
        drains.track("r2", &[pod("b", Some(20), 30)]);
        assert_eq!(drains.totals("r2").pods, 1);
        drains.forget("r2");
        drains.report("a".into(), report(0, 15));
        assert_eq!(drains.totals("r1").longest_seconds, 5);
    }
}
