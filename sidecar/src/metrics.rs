//! Prometheus metrics: every step of a drain is visible from /metrics. Handles are resolved
//! once at startup so the request path only touches atomics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::drain::Phase;
use crate::latency::LatencyHistogram;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    /// Accepted, no request seen yet (so neither h1 nor h2 known).
    pending,
    http1,
    http2,
    /// An Upgrade (WebSocket) tunnel to the app.
    upgraded,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: Protocol,
}

/// Why a request failed because the app restarted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RestartFailure {
    /// Sent to the app, which died before answering; not safe to send again (502).
    cut_in_flight,
    /// The app was not back within --upstream-restart-wait (503).
    wait_expired,
    /// --upstream-max-held requests were already waiting (503).
    too_many_held,
}

const RESTART_FAILURES: [RestartFailure; 3] = [
    RestartFailure::cut_in_flight,
    RestartFailure::wait_expired,
    RestartFailure::too_many_held,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: RestartFailure,
}

/// What the app's restarts did to requests (see `restarts`).
#[derive(Clone)]
pub struct RestartMetrics {
    pub app_up: Gauge,
    pub app_restarts: Counter,
    pub requests_held: Counter,
    pub requests_waiting: Gauge,
    pub longest_hold_seconds: Gauge<f64, AtomicU64>,
    pub requests_retried: Counter,
    failed: [Counter; 3],
}

impl RestartMetrics {
    fn register(registry: &mut Registry) -> Self {
        let app_up = Gauge::default();
        registry.register(
            "app_up",
            "1 while the app accepts connections, 0 while it is starting or restarting",
            app_up.clone(),
        );
        let app_restarts = Counter::default();
        registry.register(
            "app_restarts",
            "Times the app stopped accepting connections after it had (crash, kill, restart)",
            app_restarts.clone(),
        );
        let requests_held = Counter::default();
        registry.register(
            "requests_held",
            "Requests that waited for the app to accept connections again",
            requests_held.clone(),
        );
        let requests_waiting = Gauge::default();
        registry.register(
            "requests_waiting_for_app",
            "Requests waiting for the app now",
            requests_waiting.clone(),
        );
        let longest_hold_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "longest_hold_seconds",
            "The longest a request has waited for the app",
            longest_hold_seconds.clone(),
        );
        let requests_retried = Counter::default();
        registry.register(
            "requests_retried",
            "Idempotent requests cut in flight by the app's death and sent again once it was back",
            requests_retried.clone(),
        );
        let failed_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "restart_failed_requests",
            "Requests that failed because the app restarted, by reason",
            failed_family.clone(),
        );
        let failed = RESTART_FAILURES
            .map(|reason| failed_family.get_or_create(&ReasonLabel { reason }).clone());
        Self {
            app_up,
            app_restarts,
            requests_held,
            requests_waiting,
            longest_hold_seconds,
            requests_retried,
            failed,
        }
    }

    pub fn failed(&self, why: RestartFailure) -> &Counter {
        &self.failed[why as usize]
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: Phase,
}

/// What the drain did to long-lived streams: WebSocket close handshakes, event streams ended
/// (docs/long-lived.md).
#[derive(Clone, Default)]
pub struct StreamMetrics {
    /// Tunnels the drain closed with its 1001 handshake.
    pub closed: Counter,
    /// Of those, the ones whose app did not answer the Close within its wait.
    pub app_silent: Counter,
    /// Of those, the ones whose client did not answer the Close within its wait.
    pub client_silent: Counter,
    /// Client data frames that came after the app was asked to close, and reached no one.
    pub frames_unsent: Counter,
    /// Server-sent event streams ended at an event boundary.
    pub event_streams_ended: Counter,
}

impl StreamMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "websocket_drain_closes",
            "WebSocket tunnels the drain closed with a Close 1001 handshake",
            m.closed.clone(),
        );
        registry.register(
            "websocket_app_close_unanswered",
            "Drain closes whose app did not answer the Close in time",
            m.app_silent.clone(),
        );
        registry.register(
            "websocket_client_close_unanswered",
            "Drain closes whose client did not answer the Close in time",
            m.client_silent.clone(),
        );
        registry.register(
            "websocket_frames_unsent",
            "Client data frames sent after the app was asked to close, which reached no one",
            m.frames_unsent.clone(),
        );
        registry.register(
            "event_streams_ended",
            "Server-sent event streams the drain ended at an event boundary",
            m.event_streams_ended.clone(),
        );
        m
    }

    pub fn record(&self, leaving: &crate::websocket::Leaving) {
        if !leaving.asked {
            return;
        }
        self.closed.inc();
        if !leaving.app_answered {
            self.app_silent.inc();
        }
        if !leaving.client_answered {
            self.client_silent.inc();
        }
        self.frames_unsent.inc_by(leaving.client_frames_unsent);
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Counter,
    pub in_flight: Gauge,
    pub request_duration: LatencyHistogram,
    open: [Gauge; 4],
    phase: [Gauge; 4],
    phase_seconds: [Gauge<f64, AtomicU64>; 4],
    pub requests_after_trigger: Counter,
    pub quiet_window_seconds: Gauge<f64, AtomicU64>,
    pub last_arrival_seconds: Gauge<f64, AtomicU64>,
    pub data_plane_lag_seconds: Gauge<f64, AtomicU64>,
    pub sources: Gauge,
    pub sources_let_go: Gauge,
    pub requests_force_closed: Counter,
    pub connections_force_closed: Counter,
    pub upstream_errors: Counter,
    pub restarts: RestartMetrics,
    pub streams: StreamMetrics,
}

const PROTOCOLS: [Protocol; 4] = [
    Protocol::pending,
    Protocol::http1,
    Protocol::http2,
    Protocol::upgraded,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("graceful");
        let requests = Counter::default();
        registry.register(
            "requests",
            "Requests received on the traffic address",
            requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests whose response is not finished yet",
            in_flight.clone(),
        );
        let request_duration = LatencyHistogram::default();
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response (or the client leaving)",
            request_duration.clone(),
        );
        let open_family = Family::<ProtocolLabel, Gauge>::default();
        registry.register(
            "open_connections",
            "Open client connections by protocol",
            open_family.clone(),
        );
        let open = PROTOCOLS.map(|protocol| {
            open_family
                .get_or_create(&ProtocolLabel { protocol })
                .clone()
        });
        let phase_family = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "drain_phase",
            "1 for the current drain phase, 0 for the others",
            phase_family.clone(),
        );
        let phase =
            Phase::ALL.map(|phase| phase_family.get_or_create(&PhaseLabel { phase }).clone());
        phase[0].set(1);
        let seconds_family = Family::<PhaseLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "drain_phase_seconds",
            "Seconds spent in each drain phase so far",
            seconds_family.clone(),
        );
        let phase_seconds =
            Phase::ALL.map(|phase| seconds_family.get_or_create(&PhaseLabel { phase }).clone());
        let requests_after_trigger = Counter::default();
        registry.register(
            "requests_after_trigger",
            "Requests received after the drain was triggered (served, not refused)",
            requests_after_trigger.clone(),
        );
        let quiet_window_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_quiet_window_seconds",
            "Silence (no new connection, no new request) that ends the drain, from the traffic before the trigger",
            quiet_window_seconds.clone(),
        );
        let last_arrival_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_last_arrival_seconds",
            "Seconds after the trigger of the last new connection or request",
            last_arrival_seconds.clone(),
        );
        let data_plane_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_data_plane_lag_seconds",
            "The lag of the slowest data plane in front of the pod other than kube-proxy: silence ends no drain before it has passed since deregistration",
            data_plane_lag_seconds.clone(),
        );
        let sources = Gauge::default();
        registry.register(
            "drain_sources",
            "Sources (peer addresses) of this pod's recent new connections, while a drain holds for the data planes' lag",
            sources.clone(),
        );
        let sources_let_go = Gauge::default();
        registry.register(
            "drain_sources_let_go",
            "Of those, the sources the pod's siblings show routing elsewhere; all of them end the hold",
            sources_let_go.clone(),
        );
        let requests_force_closed = Counter::default();
        registry.register(
            "requests_force_closed",
            "In-flight requests cut at the drain deadline or by a second SIGTERM",
            requests_force_closed.clone(),
        );
        let connections_force_closed = Counter::default();
        registry.register(
            "connections_force_closed",
            "Connections closed at the drain deadline or by a second SIGTERM",
            connections_force_closed.clone(),
        );
        let upstream_errors = Counter::default();
        registry.register(
            "upstream_errors",
            "Requests answered 502 because the app could not be reached",
            upstream_errors.clone(),
        );
        let restarts = RestartMetrics::register(&mut registry);
        let streams = StreamMetrics::register(&mut registry);
        Self {
            registry,
            requests,
            in_flight,
            request_duration,
            open,
            phase,
            phase_seconds,
            requests_after_trigger,
            quiet_window_seconds,
            last_arrival_seconds,
            data_plane_lag_seconds,
            sources,
            sources_let_go,
            requests_force_closed,
            connections_force_closed,
            upstream_errors,
            restarts,
            streams,
        }
    }

    pub fn open(&self, protocol: Protocol) -> &Gauge {
        &self.open[protocol as usize]
    }

    pub fn open_total(&self) -> i64 {
        self.open.iter().map(Gauge::get).sum()
    }

    pub fn enter_phase(&self, from: Phase, to: Phase) {
        self.phase[from as usize].set(0);
        self.phase[to as usize].set(1);
    }

    pub fn set_phase_seconds(&self, phase: Phase, seconds: f64) {
        self.phase_seconds[phase as usize].set(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition;

    #[test]
    fn the_exposition_passes_promtool() {
        let m = Metrics::new();
        m.requests.inc();
        m.request_duration
            .observe(std::time::Duration::from_millis(3));
        m.requests_force_closed.inc();
        m.restarts.requests_held.inc();
        m.set_phase_seconds(Phase::Quiescing, 1.5);
        let classic = exposition::to_classic(&m.encode());
        exposition::promtool_check(&classic).unwrap_or_else(|e| panic!("{e}\n{classic}"));
    }
}
