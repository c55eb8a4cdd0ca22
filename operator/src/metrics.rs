//! Prometheus metrics of the controller, and the plain-HTTP health/metrics server (never the
//! webhook's TLS port).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::drains::SidecarReport;
use graceful_sidecar::accept::{
    Accepted, Acceptor, FirstRequest, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, Slots,
};
use graceful_sidecar::exposition;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
}

/// One GracefulRollout's current phase (kube-state-metrics' style: one series per object, the
/// phase a label, 1 while current).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub namespace: String,
    /// `clean`, or `forced` when the drain timeout cut what was open.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `inject` (pods) or `pace` (managed Deployments).
    pub webhook: String,
    /// `patched`, `unchanged`, `rejected` (refused, with a message) or `bad_request`.
    pub outcome: String,
}

pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub rollouts: Family<OutcomeLabels, Counter>,
    pub rollout_duration: Histogram,
    pub steps: Family<StepLabels, Counter>,
    pub step_duration: Histogram,
    /// 1 while this replica holds the leader Lease and acts.
    pub leader: Gauge,
    rollout_phase: Family<PhaseLabels, Gauge>,
    /// (namespace, name) -> the phase exported for it, to drop its series when it changes.
    phases: Mutex<HashMap<(String, String), String>>,
    /// Sidecar drain reports, counted by the leader's pod watch: they outlive the pods, whose
    /// own `/metrics` is gone within a scrape interval of the drain's end.
    pub drains: Family<DrainLabels, Counter>,
    pub drain_requests_cut: Family<NamespaceLabels, Counter>,
    pub drain_connections_cut: Family<NamespaceLabels, Counter>,
    pub drain_duration: Histogram,
    pub webhook_reviews: Family<ReviewLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            rollouts: Family::default(),
            rollout_duration: Histogram::new(exponential_buckets(5.0, 2.0, 10)),
            steps: Family::default(),
            step_duration: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
            leader: Gauge::default(),
            rollout_phase: Family::default(),
            phases: Mutex::default(),
            drains: Family::default(),
            drain_requests_cut: Family::default(),
            drain_connections_cut: Family::default(),
            drain_duration: Histogram::new(exponential_buckets(0.5, 2.0, 10)),
            webhook_reviews: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("graceful_operator");
        r.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controller",
            m.leader.clone(),
        );
        r.register(
            "reconciles",
            "Reconciles of GracefulRollouts",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles, by error kind",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            m.reconcile_duration.clone(),
        );
        r.register(
            "rollouts",
            "Finished rollouts, by outcome",
            m.rollouts.clone(),
        );
        r.register(
            "rollout_duration_seconds",
            "Wall time of finished rollouts",
            m.rollout_duration.clone(),
        );
        r.register("steps", "Rollout steps taken, by kind", m.steps.clone());
        r.register(
            "step_duration_seconds",
            "Time from one rollout step to the next",
            m.step_duration.clone(),
        );
        r.register(
            "rollout_phase",
            "1 for each GracefulRollout's current phase (on the leader)",
            m.rollout_phase.clone(),
        );
        r.register(
            "drains",
            "Drains of injected pods, by namespace and outcome (forced: the drain timeout cut what was open)",
            m.drains.clone(),
        );
        r.register(
            "drain_requests_cut",
            "Requests in flight cut at a drain's deadline, by namespace",
            m.drain_requests_cut.clone(),
        );
        r.register(
            "drain_connections_cut",
            "Connections closed at a drain's deadline, by namespace",
            m.drain_connections_cut.clone(),
        );
        r.register(
            "drain_duration_seconds",
            "Time from a drain's trigger to its end, as the sidecar reported it",
            m.drain_duration.clone(),
        );
        r.register(
            "webhook_reviews",
            "AdmissionReviews answered, by webhook and outcome",
            m.webhook_reviews.clone(),
        );
        // Every series a first event would create exists from the start at 0: increase() and
        // rate() see nothing in a counter whose first sample already holds the event.
        for outcome in ["Succeeded", "RolledBack"] {
            let _ = m.rollouts.get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            });
        }
        for step in ["release_old_pods", "finish", "roll_back"] {
            let _ = m.steps.get_or_create(&StepLabels { step: step.into() });
        }
        for webhook in ["inject", "pace"] {
            for outcome in ["patched", "unchanged", "rejected", "bad_request"] {
                let _ = m.webhook_reviews.get_or_create(&ReviewLabels {
                    webhook: webhook.into(),
                    outcome: outcome.into(),
                });
            }
        }
        m
    }

    /// Creates a namespace's drain series at 0, before its first drain (see `new`): the leader
    /// calls it for each namespace where it sees an injected pod.
    pub fn watch_namespace(&self, namespace: &str) {
        for outcome in ["clean", "forced"] {
            let _ = self.drains.get_or_create(&DrainLabels {
                namespace: namespace.into(),
                outcome: outcome.into(),
            });
        }
        let ns = NamespaceLabels {
            namespace: namespace.into(),
        };
        let _ = self.drain_requests_cut.get_or_create(&ns);
        let _ = self.drain_connections_cut.get_or_create(&ns);
    }

    /// Exports `phase` as the current phase of GracefulRollout `namespace/name`.
    pub fn set_phase(&self, namespace: &str, name: &str, phase: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut phases = self.phases.lock().expect("phases lock");
        if let Some(old) = phases.insert(key.clone(), phase.to_owned()) {
            if old == phase {
                return;
            }
            self.rollout_phase.remove(&phase_labels(&key, &old));
        }
        self.rollout_phase
            .get_or_create(&phase_labels(&key, phase))
            .set(1);
    }

    /// Drops the phase of a GracefulRollout that is gone.
    pub fn forget_phase(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.phases.lock().expect("phases lock").remove(&key) {
            self.rollout_phase.remove(&phase_labels(&key, &old));
        }
    }

    /// Counts one sidecar's drain report.
    pub fn observe_drain(&self, namespace: &str, report: &SidecarReport) {
        let outcome = if report.forced { "forced" } else { "clean" };
        self.drains
            .get_or_create(&DrainLabels {
                namespace: namespace.into(),
                outcome: outcome.into(),
            })
            .inc();
        let ns = NamespaceLabels {
            namespace: namespace.into(),
        };
        self.drain_requests_cut
            .get_or_create(&ns)
            .inc_by(report.requests_cut.max(0) as u64);
        self.drain_connections_cut
            .get_or_create(&ns)
            .inc_by(report.connections_cut.max(0) as u64);
        if let Some(seconds) = report.seconds {
            self.drain_duration.observe(seconds);
        }
    }

    pub fn observe_review(&self, webhook: &str, outcome: &str) {
        self.webhook_reviews
            .get_or_create(&ReviewLabels {
                webhook: webhook.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn observe_step(&self, step: &str, since_last: Option<Duration>) {
        self.steps
            .get_or_create(&StepLabels { step: step.into() })
            .inc();
        if let Some(d) = since_last {
            self.step_duration.observe(d.as_secs_f64());
        }
    }
}

fn phase_labels((namespace, name): &(String, String), phase: &str) -> PhaseLabels {
    PhaseLabels {
        namespace: namespace.clone(),
        name: name.clone(),
        phase: phase.into(),
    }
}

/// Connections the health and metrics port serves at once: the kubelet's probes and a few
/// scrapers, with room for a flood of idle ones while they time out. Past it new ones wait in
/// the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// `/healthz` (process up), `/readyz` (controller or webhook ready), `/metrics`.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "health and metrics listening");
    let mut listener = Acceptor::backing_off(listener, "metrics", Slots::new(MAX_CONNECTIONS));
    loop {
        let Accepted { stream, slot, .. } = listener.accept().await;
        let accepted = tokio::time::Instant::now();
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let first = FirstRequest::default();
            let seen = first.clone();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                seen.seen();
                let mut kind = None;
                let (status, body) = match req.uri().path() {
                    "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                    "/readyz" if ready.load(Ordering::Relaxed) => {
                        (StatusCode::OK, "ready\n".into())
                    }
                    "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
                    "/metrics" => {
                        let mut out = String::new();
                        match prometheus_client::encoding::text::encode(&mut out, &registry) {
                            Ok(()) => {
                                let (k, body) = exposition::negotiate(
                                    req.headers().get(http::header::ACCEPT),
                                    out,
                                );
                                kind = Some(k);
                                (StatusCode::OK, body)
                            }
                            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encode failed\n".into()),
                        }
                    }
                    _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if let Some(kind) = kind {
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(kind),
                    );
                }
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            // HTTP/1.1 only: probes and Prometheus speak it, and hyper times its heads.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                () = first.unused(accepted, HEADER_READ_TIMEOUT) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        exposition::to_classic(&out)
    }

    #[test]
    fn the_exposition_passes_promtool() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.set_phase("shop", "web", "Progressing");
        m.watch_namespace("shop");
        m.observe_drain(
            "shop",
            &SidecarReport {
                connections_cut: 2,
                requests_cut: 1,
                forced: true,
                seconds: Some(30.0),
                finished: Timestamp::now(),
                data_plane_lag_seconds: Some(120.0),
                released_by: Some("siblings".into()),
            },
        );
        m.observe_review("inject", "patched");
        m.observe_step("finish", Some(Duration::from_secs(3)));
        let classic = encode(&registry);
        exposition::promtool_check(&classic).unwrap_or_else(|e| panic!("{e}\n{classic}"));
        for line in [
            "graceful_operator_drains_total{namespace=\"shop\",outcome=\"forced\"} 1",
            // Created at 0 before any event, so that increase() sees the first one.
            "graceful_operator_drains_total{namespace=\"shop\",outcome=\"clean\"} 0",
            "graceful_operator_rollouts_total{outcome=\"RolledBack\"} 0",
            "graceful_operator_drain_requests_cut_total{namespace=\"shop\"} 1",
            "graceful_operator_webhook_reviews_total{webhook=\"inject\",outcome=\"patched\"} 1",
        ] {
            assert!(classic.contains(line), "{line} missing from\n{classic}");
        }
    }

    #[test]
    fn a_rollout_exports_only_its_current_phase() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.set_phase("shop", "web", "Progressing");
        m.set_phase("shop", "web", "Degraded");
        let text = encode(&registry);
        assert!(text.contains("phase=\"Degraded\"} 1"), "{text}");
        assert!(!text.contains("Progressing"), "{text}");
        m.forget_phase("shop", "web");
        assert!(!encode(&registry).contains("name=\"web\""));
    }
}
