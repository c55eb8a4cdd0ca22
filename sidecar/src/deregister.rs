//! Deregister: wait until the pod is out of the load-balancing path. Where the pod may read
//! EndpointSlices, until no slice lists its IP as ready (plus a propagation margin for
//! kube-proxy); otherwise a fixed delay. The API client is built only here, at drain time,
//! so an idle sidecar holds no watch, no TLS state and no extra memory.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{info, warn};

use crate::defaults;

#[derive(Debug, thiserror::Error)]
pub enum EndpointWatchError {
    #[error("no in-cluster config: {0}")]
    Config(#[from] kube::config::InClusterError),
    #[error("cannot build API client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot list EndpointSlices: {0}")]
    List(#[source] kube::Error),
}

pub struct Deregister {
    pod: Option<(IpAddr, String)>,
    delay: Duration,
    margin: Duration,
}

impl Deregister {
    pub fn new(
        pod_ip: Option<IpAddr>,
        namespace: Option<String>,
        delay: Duration,
        margin: Duration,
    ) -> Self {
        Self {
            pod: pod_ip.zip(namespace),
            delay,
            margin,
        }
    }

    /// Returns the path taken: "endpointslices" or "delay" (logged once).
    pub async fn wait(&self, since: Instant) -> &'static str {
        match &self.pod {
            Some((ip, ns)) => match EndpointWatch::until_not_ready(*ip, ns).await {
                Ok(()) => {
                    info!(
                        pod_ip = %ip,
                        margin = ?self.margin,
                        "no EndpointSlice lists the pod as ready; waiting the propagation margin"
                    );
                    sleep(self.margin).await;
                    return "endpointslices";
                }
                Err(e) => {
                    warn!(error = %e, delay = ?self.delay, "EndpointSlice check unavailable: waiting --deregister-delay")
                }
            },
            None => info!(
                delay = ?self.delay,
                "{} or {} not set: waiting --deregister-delay",
                defaults::ENV_POD_IP,
                defaults::ENV_POD_NAMESPACE
            ),
        }
        sleep_until(since + self.delay).await;
        "delay"
    }
}

/// Lists the namespace's EndpointSlices until none lists the pod as ready.
pub struct EndpointWatch;

impl EndpointWatch {
    pub async fn until_not_ready(ip: IpAddr, namespace: &str) -> Result<(), EndpointWatchError> {
        // Only ring is compiled in; make that explicit for rustls.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::incluster()?;
        let client = kube::Client::try_from(config).map_err(EndpointWatchError::Client)?;
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        loop {
            let slices = api
                .list(&ListParams::default())
                .await
                .map_err(EndpointWatchError::List)?;
            if !listed_ready(&slices.items, ip) {
                return Ok(());
            }
            sleep(defaults::ENDPOINTSLICE_POLL).await;
        }
    }
}

/// True while some slice lists `ip` as an endpoint whose `ready` condition is not false
/// (an absent condition means ready, as the EndpointSlice API says).
pub fn listed_ready(slices: &[EndpointSlice], ip: IpAddr) -> bool {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a == ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    const ME: &str = "10.88.0.7";

    fn me() -> IpAddr {
        ME.parse().unwrap()
    }

    #[test]
    fn ready_endpoint_is_listed() {
        let s = slice(serde_json::json!([
            {"addresses": ["10.88.0.6"], "conditions": {"ready": true}},
            {"addresses": [ME], "conditions": {"ready": true, "serving": true, "terminating": false}},
        ]));
        assert!(listed_ready(&[s], me()));
    }

    #[test]
    fn absent_ready_condition_means_ready() {
        let s = slice(serde_json::json!([{"addresses": [ME]}]));
        assert!(listed_ready(std::slice::from_ref(&s), me()));
        let s = slice(serde_json::json!([{"addresses": [ME], "conditions": {}}]));
        assert!(listed_ready(&[s], me()));
    }

    #[test]
    fn terminating_endpoint_is_not_ready() {
        let s = slice(serde_json::json!([
            {"addresses": [ME], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.88.0.6"], "conditions": {"ready": true}},
        ]));
        assert!(!listed_ready(&[s], me()));
    }

    #[test]
    fn any_slice_listing_it_ready_keeps_it_listed() {
        let gone = slice(serde_json::json!([{"addresses": [ME], "conditions": {"ready": false}}]));
        let other = slice(serde_json::json!([{"addresses": [ME], "conditions": {"ready": true}}]));
        assert!(listed_ready(&[gone.clone(), other], me()));
        assert!(!listed_ready(&[gone], me()));
    }

    #[test]
    fn not_listed_at_all_or_empty_slice() {
        let s = slice(serde_json::json!([{"addresses": ["10.88.0.70"]}]));
        assert!(!listed_ready(&[s], me()));
        let empty: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-empty"}, "addressType": "IPv4", "endpoints": null,
        }))
        .unwrap();
        assert!(!listed_ready(&[empty], me()));
        assert!(!listed_ready(&[], me()));
    }

    #[tokio::test]
    async fn without_pod_env_it_waits_the_delay() {
        let d = Deregister::new(
            None,
            None,
            Duration::from_millis(200),
            Duration::from_secs(9),
        );
        let t0 = Instant::now();
        assert_eq!(d.wait(t0).await, "delay");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn outside_a_cluster_it_falls_back_to_the_delay() {
        // No service-account env or files here: the in-cluster config fails at once.
        let d = Deregister::new(
            Some(me()),
            Some("default".into()),
            Duration::from_millis(200),
            Duration::from_secs(9),
        );
        let t0 = Instant::now();
        assert_eq!(d.wait(t0).await, "delay");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
