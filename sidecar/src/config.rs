//! Options from flags and `GRACEFUL_*` env vars, checked once at startup so a bad value is a
//! one-line error that names the option, never a surprise during a drain.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

use crate::defaults;

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

    /// After no EndpointSlice lists the pod as ready: time for kube-proxy to catch up.
    #[arg(long, env = "GRACEFUL_PROPAGATION_MARGIN", value_name = "DUR", value_parser = parse_duration, default_value = "2s")]
    pub propagation_margin: Duration,

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

    /// The pod's namespace (downward API), where its EndpointSlices live.
    #[arg(long, env = defaults::ENV_POD_NAMESPACE, value_name = "NS")]
    pub pod_namespace: Option<String>,

    /// Traffic threads, each with its own event loop and listening socket (SO_REUSEPORT);
    /// 0 means one per available core.
    #[arg(long, env = "GRACEFUL_WORKERS", value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// Log filter (tracing env-filter syntax).
    #[arg(
        long,
        env = "GRACEFUL_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log: String,
}

/// A configuration that parses but cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--drain-timeout ({timeout}) must not be shorter than --deregister-delay ({delay})")]
    DrainShorterThanDeregister { timeout: String, delay: String },
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
/// (or the proxy would forward to itself).
fn overlap(x: SocketAddr, y: SocketAddr) -> bool {
    x.port() == y.port() && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
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
    }
}
