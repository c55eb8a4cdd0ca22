//! The data planes in front of the pod, as the injector found them (or the user declared
//! them): each with its lag, the longest it may keep sending new connections after the pod
//! leaves the EndpointSlices (docs/data-planes.md). kube-proxy's lag is the propagation margin;
//! the others' longest is the drain's hold: silence does not end a drain before it has passed.

use std::time::Duration;

use serde::Serialize;

/// The name of kube-proxy's entry, whose lag the propagation margin covers.
pub const KUBE_PROXY: &str = "kube-proxy";
/// The longest name `--data-planes` takes.
pub const MAX_NAME_LEN: usize = 100;
/// The most items `--data-planes` takes.
pub const MAX_DATA_PLANES: usize = 16;

/// One item of `--data-planes` (`GRACEFUL_DATA_PLANES`), as the injector writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataPlane {
    pub name: String,
    #[serde(rename = "lag_seconds", serialize_with = "seconds")]
    pub lag: Duration,
}

impl DataPlane {
    pub fn is_kube_proxy(&self) -> bool {
        self.name == KUBE_PROXY
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `NAME=DUR`, as `--data-planes` takes each item.
pub fn parse(item: &str) -> Result<DataPlane, String> {
    let (name, lag) = item
        .split_once('=')
        .ok_or_else(|| format!("{item:?}: expected NAME=DURATION (e.g. load-balancer/web=120s)"))?;
    let name = name.trim();
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "./-".contains(c);
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(valid) {
        return Err(format!(
            "{name:?}: a data plane's name is 1-{MAX_NAME_LEN} characters of a-z, 0-9, '.', '/', '-'"
        ));
    }
    let lag = humantime::parse_duration(lag.trim())
        .map_err(|e| format!("{name}: {e} (use e.g. 120s)"))?;
    Ok(DataPlane {
        name: name.to_owned(),
        lag,
    })
}

/// The longest lag of the data planes other than kube-proxy: zero when there is none.
pub fn hold(planes: &[DataPlane]) -> Duration {
    planes
        .iter()
        .filter(|p| !p.is_kube_proxy())
        .map(|p| p.lag)
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_name_and_lag() {
        let p = parse("load-balancer/web=2m").unwrap();
        assert_eq!(p.name, "load-balancer/web");
        assert_eq!(p.lag, Duration::from_secs(120));
        for bad in ["web", "=5s", "Web=5s", "web=soon", "a b=5s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_hold_is_the_slowest_but_kube_proxy() {
        let planes: Vec<_> = ["kube-proxy=5s", "ingress/traefik=10s", "aws-nlb/web=120s"]
            .into_iter()
            .map(|s| parse(s).unwrap())
            .collect();
        assert_eq!(hold(&planes), Duration::from_secs(120));
        assert_eq!(hold(&planes[..1]), Duration::ZERO);
        assert_eq!(hold(&[]), Duration::ZERO);
    }
}
