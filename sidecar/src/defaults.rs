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
/// Siblings ask here how many new connections came from the sources they name (`siblings`).
pub const CONNECTIONS_PATH: &str = "/connections";

/// Used when the pod may not read EndpointSlices: how long to wait for the pod to leave the
/// load-balancing path after readiness turns off.
pub const DEREGISTER_DELAY: Duration = Duration::from_secs(5);
/// From the trigger to the forced close of whatever is still open.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time from deregistration to the end of a drain of a pod that had traffic (a bound
/// on kube-proxy's lag). None by default: the quiet window measures what a margin guesses, and
/// the injector sets its own (see the operator's annotations).
pub const PROPAGATION_MARGIN: Duration = Duration::ZERO;
/// The quiet window's bounds (see `arrivals::QuietRule` and docs/drain.md): the shortest
/// silence that counts, the silence asked of a pod that had no traffic, and the longest.
pub const MIN_QUIET_WINDOW: Duration = Duration::from_millis(250);
pub const IDLE_QUIET_WINDOW: Duration = Duration::from_secs(1);
pub const MAX_QUIET_WINDOW: Duration = Duration::from_secs(10);

/// How long a request may wait for the app while it restarts (`--upstream-restart-wait`): the
/// kubelet restarts a crashed container at once the first time, and most apps listen again
/// within a few seconds, while clients and proxies in front commonly give up after 15-60 s. Past
/// it the request gets a 503 with `Retry-After`, which a client can retry on another pod.
pub const UPSTREAM_RESTART_WAIT: Duration = Duration::from_secs(10);
/// How long a WebSocket stream runs on once every data plane has let go of the pod, before the
/// drain asks it to leave (`--stream-leave-after`): at once, as the pod is going and the
/// client's reconnect goes elsewhere.
pub const STREAM_LEAVE_AFTER: Duration = Duration::ZERO;
/// The most requests that may wait for the app at once (`--upstream-max-held`): a few KiB each
/// (headers and a task; bodies stay in the client's socket), so a few MiB at most.
pub const UPSTREAM_MAX_HELD: usize = 1024;
/// /readyz says 503 once the app has refused connections this long: a blip does not move the
/// traffic, a restart does.
pub const APP_AWAY_UNREADY_AFTER: Duration = Duration::from_secs(1);
/// While the app is away, how often its port is tried, and how long one try may take.
pub const APP_KNOCK_INTERVAL: Duration = Duration::from_millis(50);
pub const APP_KNOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// A preStop for a pod that is not terminating is a container restart (a failed liveness
/// probe, a resize): how long to wait for the EndpointSlice to say "terminating" before
/// concluding that (docs/restarts.md).
pub const TERMINATING_PATIENCE: Duration = Duration::from_secs(2);
/// How long the API server may take to answer a drain's first EndpointSlice list: past it the
/// API is taken as out of reach (a partition, an overloaded server) and the drain goes on
/// without it (`--deregister-delay`, no siblings) instead of waiting on a connect timeout.
pub const FIRST_LIST_PATIENCE: Duration = Duration::from_secs(2);
/// A restart's preStop from a caller that is not the node (a pod holding a token read from the
/// spec): requests wait at most this long after the answer for the app to stop, then go to it
/// again. The kubelet stops the app the moment its preStop is answered (docs/security.md).
pub const UNCONFIRMED_STOP_WAIT: Duration = Duration::from_secs(2);

/// Environment variables (downward API) the injector sets and the sidecar reads.
pub const ENV_POD_IP: &str = "GRACEFUL_POD_IP";
pub const ENV_POD_NAMESPACE: &str = "GRACEFUL_POD_NAMESPACE";
pub const ENV_POD_NAME: &str = "GRACEFUL_POD_NAME";
/// The node's address: the kubelet's calls come from it (or from the pod's gateway).
pub const ENV_HOST_IP: &str = "GRACEFUL_HOST_IP";
/// The Services that select the pod (comma-separated), whose EndpointSlices the drain watches.
pub const ENV_SERVICES: &str = "GRACEFUL_SERVICES";
/// The data planes in front of the pod and their lags (`NAME=DUR,...`, docs/data-planes.md).
pub const ENV_DATA_PLANES: &str = "GRACEFUL_DATA_PLANES";
/// Extra time the drain timeout must leave after the data planes' longest lag: the quiet window
/// (at most 10 s) and the last connections' closing.
pub const DRAIN_AFTER_LAG: Duration = Duration::from_secs(15);
/// The label the EndpointSlice controller puts on each slice: the name of its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Shared secret the kubelet's preStop httpGet presents (`Authorization: Bearer <token>`).
pub const ENV_PRESTOP_TOKEN: &str = "GRACEFUL_PRESTOP_TOKEN";

/// Where the final drain summary goes, so it shows in the container status after exit.
pub const TERMINATION_LOG_PATH: &str = "/dev/termination-log";
/// During quiesce an idle HTTP/1.1 connection is closed once the traffic is quiet and it has
/// sent no request for this long (a busy one closes itself after its next response, which says
/// `Connection: close`): closing it sooner could cross a request already on the wire, which the
/// client sees as a failure.
pub const QUIESCE_IDLE_GRACE: Duration = Duration::from_secs(1);

/// The traffic port's connection limit (`--max-connections`): past it, new connections wait in
/// the listen backlog. A keep-alive client with its upstream connection costs about 22 KiB, so
/// 4096 of them take about 90 MiB, inside the injected 128 MiB limit (docs/security.md).
pub const MAX_CONNECTIONS: usize = 4096;
/// The admin port's: kubelet probes, preStop, scrapes and `kubectl graceful`; room for a
/// flood of idle ones (about 5 MiB) beside them while they time out.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// An idle HTTP/2 client is pinged this often, and dropped if it does not answer in
/// `H2_KEEP_ALIVE_TIMEOUT` (gRPC's own server defaults are 2 h and 20 s; a minute finds a
/// vanished client well before its slot matters).
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
