//! Options from flags and `GRACEFUL_*` env vars, checked once at startup so a bad value is a
//! one-line error that names the option, never a surprise during a drain.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

use crate::arrivals::QuietRule;
use crate::data_planes::{self, DataPlane};
use crate::defaults;
use crate::deregister::PodRef;
use crate::drain::{Following, WindowChoice};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "graceful-sidecar",
    version,
    about = "Drain-aware proxy: turns preStop and SIGTERM into readiness-off, deregistration and a clean drain"
)]
pub struct Config {
    /// Traffic address: Services reach the app through here.
    #[arg(long, env = "GRACEFUL_LISTEN", value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], defaults::TRAFFIC_PORT)))]
    pub listen: SocketAddr,

    /// The app, inside the pod.
    #[arg(long, env = "GRACEFUL_UPSTREAM", value_name = "ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], defaults::UPSTREAM_PORT)))]
    pub upstream: SocketAddr,

    /// Speak HTTP/2 cleartext (prior knowledge) to the app instead of HTTP/1.1.
    #[arg(long, env = "GRACEFUL_UPSTREAM_H2C")]
    pub upstream_h2c: bool,

    /// Admin address: /healthz, /readyz, /prestop, /metrics.
    #[arg(long, env = "GRACEFUL_ADMIN", value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], defaults::ADMIN_PORT)))]
    pub admin: SocketAddr,

    /// Wait after readiness turns off when the pod cannot read EndpointSlices.
    #[arg(long, env = "GRACEFUL_DEREGISTER_DELAY", value_name = "DUR", value_parser = parse_duration, default_value = "5s")]
    pub deregister_delay: Duration,

    /// From the trigger to the forced close of whatever is still open.
    #[arg(long, env = "GRACEFUL_DRAIN_TIMEOUT", value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// The least time from deregistration to the end of the drain, for a pod that had traffic:
    /// a bound on kube-proxy's lag, which the pod cannot see (an idle pod skips it).
    #[arg(long, env = "GRACEFUL_PROPAGATION_MARGIN", value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub propagation_margin: Duration,

    /// Silence (no new connection, no new request) that tells the data planes have let the pod
    /// go: `auto` derives it from the traffic before the trigger (3x its typical gap, within
    /// --min-quiet-window and 10s; 1s for a pod that had none); a duration fixes it (0s: stop
    /// as soon as nothing is open).
    #[arg(long, env = "GRACEFUL_QUIET_WINDOW", value_name = "auto|DUR", value_parser = parse_quiet_window, default_value = "auto")]
    pub quiet_window: QuietWindowArg,

    /// The shortest quiet window `auto` picks. Raise it when a balancer that sends sparse
    /// traffic lags (a silence shorter than its gaps proves nothing).
    #[arg(long, env = "GRACEFUL_MIN_QUIET_WINDOW", value_name = "DUR", value_parser = parse_duration, default_value = "250ms")]
    pub min_quiet_window: Duration,

    /// The data planes in front of the pod, each with its lag: the longest it may keep sending
    /// new connections after the pod leaves the EndpointSlices (the injector finds them; see
    /// docs/data-planes.md). Silence does not end a drain before the longest lag but
    /// kube-proxy's has passed, unless the siblings show every source gone elsewhere.
    #[arg(long, env = defaults::ENV_DATA_PLANES, value_name = "NAME=DUR,...", value_delimiter = ',', value_parser = data_planes::parse)]
    pub data_planes: Vec<DataPlane>,

    /// Admin addresses of the sibling sidecars to compare notes with during a drain; default:
    /// the other ready endpoints of the pod's Services, on this sidecar's admin port.
    #[arg(
        long,
        env = "GRACEFUL_SIBLINGS",
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub siblings: Vec<SocketAddr>,

    /// How long a WebSocket stream runs on once every data plane has let go of the pod, before
    /// the drain asks it to leave with a Close 1001 (docs/long-lived.md).
    #[arg(long, env = "GRACEFUL_STREAM_LEAVE_AFTER", value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub stream_leave_after: Duration,

    /// How long a request may wait for the app while it restarts (its port refusing
    /// connections), before a 503 with Retry-After; 0s turns waiting off (502 at once).
    #[arg(long, env = "GRACEFUL_UPSTREAM_RESTART_WAIT", value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    pub upstream_restart_wait: Duration,

    /// The most requests that may wait for the app at once; past it, 503 at once.
    #[arg(long, env = "GRACEFUL_UPSTREAM_MAX_HELD", value_name = "N", default_value_t = defaults::UPSTREAM_MAX_HELD)]
    pub upstream_max_held: usize,

    /// Bearer token /prestop requires; without it /prestop only accepts loopback peers.
    #[arg(long, env = defaults::ENV_PRESTOP_TOKEN, value_name = "TOKEN", hide_env_values = true)]
    pub prestop_token: Option<String>,

    /// URL the sidecar POSTs to once when a drain starts, so the app can close long-lived
    /// connections its own way. Its failure is logged and never stops the drain.
    #[arg(long, env = "GRACEFUL_APP_DRAIN_URL", value_name = "URL", value_parser = parse_http_url)]
    pub app_drain_url: Option<hyper::Uri>,

    /// Path on the app that must answer 2xx for /readyz to be 200 (e.g. /healthz).
    #[arg(long, env = "GRACEFUL_APP_READY_PATH", value_name = "PATH", value_parser = parse_path)]
    pub app_ready_path: Option<String>,

    /// The pod's IP (downward API), to find it in EndpointSlices.
    #[arg(long, env = defaults::ENV_POD_IP, value_name = "IP")]
    pub pod_ip: Option<IpAddr>,

    /// The node's address (downward API `status.hostIP`): a restart's preStop is the kubelet's
    /// only from it or from the pod's default gateway (docs/security.md).
    #[arg(long, env = defaults::ENV_HOST_IP, value_name = "IP")]
    pub host_ip: Option<IpAddr>,

    /// The pod's namespace (downward API), where its EndpointSlices live.
    #[arg(long, env = defaults::ENV_POD_NAMESPACE, value_name = "NS")]
    pub pod_namespace: Option<String>,

    /// The Services that select the pod: the drain watches only their EndpointSlices. Empty:
    /// every slice of the namespace.
    #[arg(long, env = defaults::ENV_SERVICES, value_name = "NAME,...", value_delimiter = ',')]
    pub services: Vec<String>,

    /// Traffic threads, each with its own event loop and listening socket (SO_REUSEPORT);
    /// 0 means one per core of the container's CPU limit, or 2 without a limit.
    #[arg(long, env = "GRACEFUL_WORKERS", value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// Client connections served at once on the traffic port; more wait in the listen backlog.
    #[arg(
        long,
        env = "GRACEFUL_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = defaults::MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_connections: usize,

    /// How long a new connection on the traffic port may take to start its first request
    /// (silent, or still sending the head, it is closed then).
    #[arg(long, env = "GRACEFUL_HEADER_READ_TIMEOUT", value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    pub header_read_timeout: Duration,

    /// How long a connection may sit idle between requests (and send a later request's head).
    /// Keep it longer than the clients and load balancers in front keep theirs, so that they
    /// close first: a server's close can cross a request on the wire.
    #[arg(long, env = "GRACEFUL_IDLE_TIMEOUT", value_name = "DUR", value_parser = parse_duration, default_value = "620s")]
    pub idle_timeout: Duration,

    /// Log filter (tracing env-filter syntax).
    #[arg(
        long,
        env = "GRACEFUL_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log: String,
}

/// `--quiet-window`: derived from the traffic, or fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietWindowArg {
    Auto,
    Fixed(Duration),
}

impl Config {
    /// How Quiescing decides that the data planes have let go.
    pub fn following(&self) -> Following {
        let window = match self.quiet_window {
            QuietWindowArg::Auto => WindowChoice::Traffic(QuietRule {
                min: self.min_quiet_window,
                idle: defaults::IDLE_QUIET_WINDOW.max(self.min_quiet_window),
                max: defaults::MAX_QUIET_WINDOW.max(self.min_quiet_window),
            }),
            QuietWindowArg::Fixed(d) => WindowChoice::Fixed(d),
        };
        Following {
            window,
            margin: self.propagation_margin,
            data_planes: self.data_planes.clone(),
        }
    }

    /// The pod as its EndpointSlices know it, when the downward API told enough.
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            ip: self.pod_ip?,
            namespace: self.pod_namespace.clone()?,
            services: self
                .services
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    }
}

fn parse_quiet_window(s: &str) -> Result<QuietWindowArg, String> {
    if s == "auto" {
        return Ok(QuietWindowArg::Auto);
    }
    parse_duration(s)
        .map(QuietWindowArg::Fixed)
        .map_err(|e| format!("{e}, or auto"))
}

/// A configuration that parses but cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--drain-timeout ({timeout}) must not be shorter than --deregister-delay ({delay})")]
    DrainShorterThanDeregister { timeout: String, delay: String },
    #[error(
        "--drain-timeout ({timeout}) must be at least {need}: the longest data-plane lag ({lag}, {plane}) plus {after} for the drain's end"
    )]
    DrainShorterThanLag {
        timeout: String,
        need: String,
        lag: String,
        plane: String,
        after: String,
    },
    #[error("--data-planes names {given} data planes; at most {max}")]
    TooManyDataPlanes { given: usize, max: usize },
    #[error(
        "--header-read-timeout and --idle-timeout must be longer than 0s: they would close every connection at once"
    )]
    ZeroTimeout,
    #[error("--upstream {0} has port 0: name the port the app listens on")]
    UpstreamPortZero(SocketAddr),
    #[error("--{a} and --{b} are both {addr}: each needs its own address")]
    SameAddress {
        a: &'static str,
        b: &'static str,
        addr: SocketAddr,
    },
}

impl Config {
    /// Checks what clap cannot: relations between options.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.drain_timeout < self.deregister_delay {
            return Err(ConfigError::DrainShorterThanDeregister {
                timeout: humantime::format_duration(self.drain_timeout).to_string(),
                delay: humantime::format_duration(self.deregister_delay).to_string(),
            });
        }
        if self.data_planes.len() > data_planes::MAX_DATA_PLANES {
            return Err(ConfigError::TooManyDataPlanes {
                given: self.data_planes.len(),
                max: data_planes::MAX_DATA_PLANES,
            });
        }
        let hold = data_planes::hold(&self.data_planes);
        if !hold.is_zero() && self.drain_timeout < hold + defaults::DRAIN_AFTER_LAG {
            let fmt = |d: Duration| humantime::format_duration(d).to_string();
            let plane = self
                .data_planes
                .iter()
                .find(|p| p.lag == hold && p.name != data_planes::KUBE_PROXY)
                .map_or_else(String::new, |p| p.name.clone());
            return Err(ConfigError::DrainShorterThanLag {
                timeout: fmt(self.drain_timeout),
                need: fmt(hold + defaults::DRAIN_AFTER_LAG),
                lag: fmt(hold),
                plane,
                after: fmt(defaults::DRAIN_AFTER_LAG),
            });
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        // Port 0 lets the kernel pick for a socket the sidecar binds; the app's is not ours to pick.
        if self.upstream.port() == 0 {
            return Err(ConfigError::UpstreamPortZero(self.upstream));
        }
        let addrs = [
            ("listen", self.listen),
            ("admin", self.admin),
            ("upstream", self.upstream),
        ];
        for (i, (a, x)) in addrs.iter().enumerate() {
            for (b, y) in &addrs[i + 1..] {
                if overlap(*x, *y) {
                    return Err(ConfigError::SameAddress { a, b, addr: *x });
                }
            }
        }
        Ok(())
    }
}

/// Same port, and the same IP or a wildcard on either side: one socket would shadow the other
/// (or the proxy would forward to itself). Port 0 lets the kernel pick, and it picks apart.
fn overlap(x: SocketAddr, y: SocketAddr) -> bool {
    x.port() != 0
        && x.port() == y.port()
        && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 5s, 1500ms)"))
}

fn parse_http_url(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err("expected an http:// URL with a host".into());
    }
    Ok(uri)
}

fn parse_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err("expected a path starting with /".into());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cfg =
            Config::try_parse_from(std::iter::once("graceful-sidecar").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.listen.port(), defaults::TRAFFIC_PORT);
        assert_eq!(cfg.admin.port(), defaults::ADMIN_PORT);
        assert_eq!(cfg.upstream.port(), defaults::UPSTREAM_PORT);
        assert_eq!(cfg.deregister_delay, defaults::DEREGISTER_DELAY);
        assert_eq!(cfg.drain_timeout, defaults::DRAIN_TIMEOUT);
        assert_eq!(cfg.propagation_margin, defaults::PROPAGATION_MARGIN);
        assert_eq!(cfg.quiet_window, QuietWindowArg::Auto);
        assert_eq!(cfg.min_quiet_window, defaults::MIN_QUIET_WINDOW);
        assert_eq!(cfg.upstream_restart_wait, defaults::UPSTREAM_RESTART_WAIT);
        assert_eq!(cfg.stream_leave_after, defaults::STREAM_LEAVE_AFTER);
        assert_eq!(cfg.upstream_max_held, defaults::UPSTREAM_MAX_HELD);
    }

    #[test]
    fn port_zero_on_both_sockets_is_not_a_clash() {
        parse(&["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]).unwrap();
    }

    #[test]
    fn quiet_window_is_auto_or_a_duration() {
        let cfg = parse(&["--quiet-window", "0s"]).unwrap();
        assert_eq!(cfg.quiet_window, QuietWindowArg::Fixed(Duration::ZERO));
        let e = parse(&["--quiet-window", "soon"]).unwrap_err();
        assert!(e.contains("--quiet-window") && e.contains("auto"), "{e}");
        let cfg = parse(&["--min-quiet-window", "3s"]).unwrap();
        let WindowChoice::Traffic(rule) = cfg.following().window else {
            panic!("auto follows the traffic")
        };
        assert_eq!(
            rule.idle,
            Duration::from_secs(3),
            "idle never below the minimum"
        );
    }

    #[test]
    fn services_are_a_comma_separated_list() {
        let services = |list: &str| {
            let args = [
                "--pod-ip",
                "10.0.0.1",
                "--pod-namespace",
                "web",
                "--services",
                list,
            ];
            parse(&args).unwrap().pod().unwrap().services
        };
        assert_eq!(services("a,b"), ["a", "b"]);
        assert!(services("").is_empty());
        assert!(parse(&["--pod-ip", "10.0.0.1"]).unwrap().pod().is_none());
    }

    #[test]
    fn data_planes_need_a_drain_timeout_that_outlasts_their_lag() {
        let cfg = parse(&[
            "--data-planes",
            "kube-proxy=5s,load-balancer/web=60s",
            "--drain-timeout",
            "75s",
        ])
        .unwrap();
        assert_eq!(cfg.following().hold(), Duration::from_secs(60));
        let e = parse(&["--data-planes", "load-balancer/web=60s"]).unwrap_err();
        assert!(
            e.contains("--drain-timeout (30s) must be at least 1m 15s")
                && e.contains("load-balancer/web"),
            "{e}"
        );
        let e = parse(&["--data-planes", "web"]).unwrap_err();
        assert!(
            e.contains("--data-planes") && e.contains("NAME=DURATION"),
            "{e}"
        );
        // kube-proxy's lag is the margin: no hold, no longer timeout needed.
        let cfg = parse(&["--data-planes", "kube-proxy=5s"]).unwrap();
        assert_eq!(cfg.following().hold(), Duration::ZERO);
    }

    #[test]
    fn durations_take_units() {
        let cfg = parse(&["--deregister-delay", "1500ms", "--drain-timeout", "1m"]).unwrap();
        assert_eq!(cfg.deregister_delay, Duration::from_millis(1500));
        assert_eq!(cfg.drain_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_the_option() {
        let e = parse(&["--drain-timeout", "soon"]).unwrap_err();
        assert!(e.contains("--drain-timeout"), "{e}");
        let e = parse(&["--drain-timeout", "2s", "--deregister-delay", "3s"]).unwrap_err();
        assert!(
            e.contains("--drain-timeout") && e.contains("--deregister-delay"),
            "{e}"
        );
        let e = parse(&["--listen", "0.0.0.0:9000", "--admin", "127.0.0.1:9000"]).unwrap_err();
        assert!(e.contains("--listen and --admin"), "{e}");
        let e = parse(&["--listen", "0.0.0.0:8080"]).unwrap_err();
        assert!(e.contains("--listen and --upstream"), "{e}");
        assert!(parse(&["--listen", "127.0.0.1:9000", "--admin", "127.0.0.2:9000"]).is_ok());
        let e = parse(&["--max-connections", "0"]).unwrap_err();
        assert!(e.contains("--max-connections"), "{e}");
        let e = parse(&["--header-read-timeout", "0s"]).unwrap_err();
        assert!(e.contains("--header-read-timeout"), "{e}");
        let e = parse(&["--idle-timeout", "0s"]).unwrap_err();
        assert!(e.contains("--idle-timeout"), "{e}");
    }
}
