//! Ports, paths, env names and timing defaults of the sidecar: the one place for these facts.
//! The operator's injector depends on this module, so what it writes into a pod always matches
//! what the sidecar expects.

use std::time::Duration;

/// Traffic port: Services reach the app through the sidecar here.
pub const TRAFFIC_PORT: u16 = 9080;
/// Admin port: probes, preStop and metrics. Never served on the traffic port.
pub const ADMIN_PORT: u16 = 9901;
/// Where the app listens by default, inside the pod.
pub const UPSTREAM_PORT: u16 = 8080;

pub const HEALTHZ_PATH: &str = "/healthz";
pub const READYZ_PATH: &str = "/readyz";
pub const PRESTOP_PATH: &str = "/prestop";
pub const METRICS_PATH: &str = "/metrics";

/// Used when the pod may not read EndpointSlices: how long to wait for the pod to leave the
/// load-balancing path after readiness turns off.
pub const DEREGISTER_DELAY: Duration = Duration::from_secs(5);
/// From the trigger to the forced close of whatever is still open.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// After no EndpointSlice lists the pod as ready: time for kube-proxy (and other consumers of
/// the slices) to apply the change.
pub const PROPAGATION_MARGIN: Duration = Duration::from_secs(2);

/// Environment variables (downward API) the injector sets and the sidecar reads.
pub const ENV_POD_IP: &str = "GRACEFUL_POD_IP";
pub const ENV_POD_NAMESPACE: &str = "GRACEFUL_POD_NAMESPACE";
pub const ENV_POD_NAME: &str = "GRACEFUL_POD_NAME";
/// Shared secret the kubelet's preStop httpGet presents (`Authorization: Bearer <token>`).
pub const ENV_PRESTOP_TOKEN: &str = "GRACEFUL_PRESTOP_TOKEN";

/// Where the final drain summary goes, so it shows in the container status after exit.
pub const TERMINATION_LOG_PATH: &str = "/dev/termination-log";
/// How often the EndpointSlices are listed while deregistering.
pub const ENDPOINTSLICE_POLL: Duration = Duration::from_millis(500);
/// During quiesce an HTTP/1.1 connection is closed once it has sent no request for this long
/// (a busy one closes itself after its next response, which says `Connection: close`): closing
/// it at once could cross a request already on the wire, which the client sees as a failure.
pub const QUIESCE_IDLE_GRACE: Duration = Duration::from_secs(1);
/// Quiesce ends only when no connection is open and none was accepted for this long: while
/// kube-proxy (or any balancer) still sends new connections here, the drain keeps serving them.
pub const QUIET_PERIOD: Duration = Duration::from_secs(1);
