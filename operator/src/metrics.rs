//! Prometheus metrics of the controller, and the plain-HTTP health/metrics server (never the
//! webhook's TLS port).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use graceful_sidecar::accept::Acceptor;

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
        m
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
    let mut listener = Acceptor::backing_off(listener, "metrics");
    loop {
        let (stream, _) = listener.accept().await;
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                    "/readyz" if ready.load(Ordering::Relaxed) => {
                        (StatusCode::OK, "ready\n".into())
                    }
                    "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
                    "/metrics" => {
                        let mut out = String::new();
                        match prometheus_client::encoding::text::encode(&mut out, &registry) {
                            Ok(()) => (StatusCode::OK, out),
                            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encode failed\n".into()),
                        }
                    }
                    _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if req.uri().path() == "/metrics" {
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                }
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
