//! A draining pod's own account of its drain: its sidecar's `/metrics`, read through the API
//! server's pod proxy (`pods/proxy`), so it works from wherever kubectl does.

use graceful_operator::names::ADMIN_PORT_NAME;
use graceful_operator::webhook::data_planes::ENV_DATA_PLANES;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;

/// What the sidecar's metrics say about its drain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DrainFigures {
    /// serving, deregistering, quiescing or done.
    pub phase: String,
    /// Seconds in that phase so far.
    pub phase_seconds: f64,
    /// Requests that arrived after the trigger, all served.
    pub requests_after_trigger: u64,
    /// Seconds after the trigger of the last new connection or request.
    pub last_arrival_seconds: f64,
    /// The silence that ends the drain.
    pub quiet_window_seconds: f64,
    pub in_flight: u64,
    pub open_connections: u64,
    /// Requests cut at the drain deadline.
    pub requests_cut: u64,
    /// The slowest data plane's lag the drain holds for (0: kube-proxy alone).
    pub data_plane_lag_seconds: f64,
    /// Sources of the pod's recent connections, and those its siblings show let go.
    pub sources: u64,
    pub sources_let_go: u64,
}

impl DrainFigures {
    /// Reads the classic text exposition the sidecar answers a plain GET with.
    pub fn parse(metrics: &str) -> Self {
        let mut f = DrainFigures::default();
        let mut phase_seconds = Vec::new();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let phase = label(labels, "phase");
            match name {
                "graceful_drain_phase" if value == 1.0 => f.phase = phase.unwrap_or_default(),
                "graceful_drain_phase_seconds" => {
                    phase_seconds.push((phase.unwrap_or_default(), value))
                }
                "graceful_requests_after_trigger_total" => f.requests_after_trigger = value as u64,
                "graceful_drain_last_arrival_seconds" => f.last_arrival_seconds = value,
                "graceful_drain_quiet_window_seconds" => f.quiet_window_seconds = value,
                "graceful_in_flight_requests" => f.in_flight = value as u64,
                "graceful_open_connections" => f.open_connections += value as u64,
                "graceful_requests_force_closed_total" => f.requests_cut = value as u64,
                "graceful_drain_data_plane_lag_seconds" => f.data_plane_lag_seconds = value,
                "graceful_drain_sources" => f.sources = value as u64,
                "graceful_drain_sources_let_go" => f.sources_let_go = value as u64,
                _ => {}
            }
        }
        f.phase_seconds = phase_seconds
            .iter()
            .find(|(p, _)| *p == f.phase)
            .map_or(0.0, |(_, s)| *s);
        f
    }

    /// One line for the status table: "quiescing 3.2s, 1032 requests since the trigger (last
    /// 0.1s after it), window 0.30s, 2 open".
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {:.1}s, {} requests since the trigger",
            self.phase, self.phase_seconds, self.requests_after_trigger
        );
        if self.requests_after_trigger > 0 {
            s.push_str(&format!(" (last at +{:.1}s)", self.last_arrival_seconds));
        }
        if self.quiet_window_seconds > 0.0 {
            s.push_str(&format!(", window {:.2}s", self.quiet_window_seconds));
        }
        s.push_str(&format!(
            ", {} open, {} in flight",
            self.open_connections, self.in_flight
        ));
        if self.data_plane_lag_seconds > 0.0 && self.phase == "quiescing" {
            s.push_str(&format!(
                ", holding for a data-plane lag of {:.0}s ({} of {} sources let go)",
                self.data_plane_lag_seconds, self.sources_let_go, self.sources
            ));
        }
        if self.requests_cut > 0 {
            s.push_str(&format!(", {} cut", self.requests_cut));
        }
        s
    }
}

fn label(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let end = labels[start..].find('"')? + start;
    Some(labels[start..end].to_owned())
}

/// The data planes the injector found in front of the pod and their lags, as its sidecar was
/// told (`kube-proxy 5s, load-balancer/web 120s`); None without an injected sidecar.
pub fn data_planes(pod: &Pod) -> Option<String> {
    let value = pod
        .spec
        .as_ref()?
        .init_containers
        .iter()
        .flatten()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == ENV_DATA_PLANES)?
        .value
        .clone()?;
    Some(value.replace('=', " ").replace(',', ", "))
}

/// The port number of the pod's sidecar admin port, if it has an injected sidecar.
pub fn admin_port(pod: &Pod) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .map(|p| p.container_port)
}

/// The pod's drain figures, or None when it has no sidecar or the sidecar no longer answers
/// (it exits at the end of its drain).
pub async fn fetch(client: &Client, pod: &Pod) -> Option<DrainFigures> {
    let port = admin_port(pod)?;
    let ns = pod.metadata.namespace.as_deref()?;
    let name = pod.metadata.name.as_deref()?;
    let request = http::Request::get(format!(
        "/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/metrics"
    ))
    .body(Vec::new())
    .ok()?;
    let text = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        client.request_text(request),
    )
    .await
    .ok()?
    .ok()?;
    Some(DrainFigures::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIESCING: &str = r#"# HELP graceful_drain_phase 1 for the current drain phase, 0 for the others
# TYPE graceful_drain_phase gauge
graceful_drain_phase{phase="serving"} 0
graceful_drain_phase{phase="deregistering"} 0
graceful_drain_phase{phase="quiescing"} 1
graceful_drain_phase{phase="done"} 0
graceful_drain_phase_seconds{phase="serving"} 0.0
graceful_drain_phase_seconds{phase="deregistering"} 0.1
graceful_drain_phase_seconds{phase="quiescing"} 3.25
graceful_requests_after_trigger_total 1032
graceful_drain_last_arrival_seconds 3.1
graceful_drain_quiet_window_seconds 0.3
graceful_in_flight_requests 1
graceful_open_connections{protocol="http1"} 2
graceful_open_connections{protocol="http2"} 1
graceful_requests_force_closed_total 0
graceful_drain_data_plane_lag_seconds 120.0
graceful_drain_sources 4
graceful_drain_sources_let_go 3
"#;

    #[test]
    fn reads_the_current_phase_and_its_figures() {
        let f = DrainFigures::parse(QUIESCING);
        assert_eq!(f.phase, "quiescing");
        assert_eq!(f.phase_seconds, 3.25);
        assert_eq!(f.requests_after_trigger, 1032);
        assert_eq!(f.open_connections, 3);
        assert_eq!(f.in_flight, 1);
        assert_eq!(
            f.describe(),
            "quiescing 3.2s, 1032 requests since the trigger (last at +3.1s), window 0.30s, \
             3 open, 1 in flight, holding for a data-plane lag of 120s (3 of 4 sources let go)"
        );
    }

    #[test]
    fn the_sidecars_own_exposition_parses() {
        use graceful_sidecar::drain::Phase;
        let m = graceful_sidecar::metrics::Metrics::new();
        let serving = graceful_sidecar::exposition::to_classic(&m.encode());
        assert_eq!(DrainFigures::parse(&serving).phase, "serving");
        m.enter_phase(Phase::Serving, Phase::Quiescing);
        m.set_phase_seconds(Phase::Quiescing, 1.5);
        m.requests_after_trigger.inc();
        let quiescing = graceful_sidecar::exposition::to_classic(&m.encode());
        let f = DrainFigures::parse(&quiescing);
        assert_eq!(
            (f.phase.as_str(), f.phase_seconds, f.requests_after_trigger),
            ("quiescing", 1.5, 1),
            "{quiescing}"
        );
    }
}
