//! Deregister: wait until the pod is out of the API's endpoints. Where the pod may read
//! EndpointSlices, until no slice lists its IP as ready; otherwise a fixed delay. The API client
//! is built only here, at drain time, so an idle sidecar holds no watch, no TLS state and no
//! extra memory.
//!
//! One drain costs at most two API requests: a LIST of the slices of the pod's Services (label
//! `kubernetes.io/service-name`, names given by the injector), and a WATCH only if that list
//! still shows the pod ready. Its cost does not grow with the namespace. Without names it reads
//! the whole namespace's slices, with the same two requests at most. A drain on preStop starts
//! with the same LIST, made to tell a deletion from a container restart (`Listing`); when it
//! shows the pod deleted and no longer ready, the drain makes no request of its own.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::Api;
use kube::runtime::watcher::{self, Event};
use tokio::time::{Instant, sleep_until};
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
    #[error("cannot watch EndpointSlices: {0}")]
    Watch(#[from] watcher::Error),
    #[error("the EndpointSlice watch ended")]
    Ended,
    #[error("no EndpointSlice list within {0:?}")]
    Unanswered(Duration),
}

/// The pod as its EndpointSlices know it.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub ip: IpAddr,
    pub namespace: String,
    /// The Services that select the pod; empty: any slice of the namespace.
    pub services: Vec<String>,
}

pub struct Deregister {
    pod: Option<PodRef>,
    delay: Duration,
}

impl Deregister {
    pub fn new(pod: Option<PodRef>, delay: Duration) -> Self {
        Self { pod, delay }
    }

    /// Returns the path taken: "endpointslices" or "delay" (logged once).
    pub async fn wait(&self, since: Instant) -> &'static str {
        match &self.pod {
            Some(pod) => match EndpointWatch::until_not_ready(pod).await {
                Ok(()) => {
                    info!(pod_ip = %pod.ip, "no EndpointSlice lists the pod as ready");
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

/// What the EndpointSlices say of the pod when its preStop comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Some slice lists it as terminating: the pod is being deleted. `ready`: some slice
    /// still lists it ready (if none does, the drain's deregistration is already done).
    Terminating { ready: bool },
    /// Listed, and not terminating all through the patience: the kubelet is restarting a
    /// container of a pod that stays.
    Staying,
    /// No slice lists it: nothing to tell by.
    Absent,
}

/// Watches the pod's EndpointSlices until none lists it as ready.
pub struct EndpointWatch;

impl EndpointWatch {
    fn api(pod: &PodRef) -> Result<Api<EndpointSlice>, EndpointWatchError> {
        // Only ring is compiled in; make that explicit for rustls.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::incluster()?;
        let client = kube::Client::try_from(config).map_err(EndpointWatchError::Client)?;
        Ok(Api::namespaced(client, &pod.namespace))
    }

    fn watch(
        pod: &PodRef,
    ) -> Result<
        impl futures::Stream<Item = watcher::Result<Event<EndpointSlice>>>,
        EndpointWatchError,
    > {
        let mut config = watcher::Config::default();
        if let Some(selector) = service_selector(&pod.services) {
            config = config.labels(&selector);
        }
        // No backoff: an error (forbidden, say) falls back at once.
        Ok(watcher::watcher(Self::api(pod)?, config))
    }

    /// The other pods the pod's Services list as ready: its siblings. One LIST.
    pub async fn ready_peers(pod: &PodRef) -> Result<Vec<IpAddr>, EndpointWatchError> {
        // Without its Services, a pod has no siblings: another Service's pods getting connections
        // from a shared source (an ingress controller) say nothing about this one.
        let Some(selector) = service_selector(&pod.services) else {
            return Ok(Vec::new());
        };
        let params = kube::api::ListParams::default().labels(&selector);
        let patience = defaults::FIRST_LIST_PATIENCE;
        let slices = tokio::time::timeout(patience, Self::api(pod)?.list(&params))
            .await
            .map_err(|_| EndpointWatchError::Unanswered(patience))?
            .map_err(EndpointWatchError::List)?;
        Ok(ready_others(&slices.items, pod.ip))
    }

    pub async fn until_not_ready(pod: &PodRef) -> Result<(), EndpointWatchError> {
        let events = Self::watch(pod)?;
        futures::pin_mut!(events);
        let lists_me = |s: &EndpointSlice| listed_ready(std::slice::from_ref(s), pod.ip);
        let mut slices = SliceSet::default();
        let patience = defaults::FIRST_LIST_PATIENCE;
        let first_list_by = Instant::now() + patience;
        loop {
            let event = tokio::select! {
                event = events.try_next() => event?.ok_or(EndpointWatchError::Ended)?,
                // Once listed, the drain's own timeout bounds the wait.
                _ = sleep_until(first_list_by), if !slices.synced => {
                    return Err(EndpointWatchError::Unanswered(patience));
                }
            };
            if slices.apply(event, lists_me) && slices.listing.is_empty() {
                return Ok(());
            }
        }
    }

    /// Whether the pod is being deleted, waiting up to `patience` for a slice to say so: the
    /// EndpointSlice controller marks a deleted pod terminating, usually before its preStop.
    pub async fn listing(pod: &PodRef, patience: Duration) -> Result<Listing, EndpointWatchError> {
        let events = Self::watch(pod)?;
        futures::pin_mut!(events);
        let deadline = Instant::now() + patience;
        let terminating = |s: &EndpointSlice| listed_terminating(std::slice::from_ref(s), pod.ip);
        let listed = |s: &EndpointSlice| listed_at_all(std::slice::from_ref(s), pod.ip);
        let ready = |s: &EndpointSlice| listed_ready(std::slice::from_ref(s), pod.ip);
        let mut terminating_in = SliceSet::default();
        let mut listed_in = SliceSet::default();
        let mut ready_in = SliceSet::default();
        loop {
            let event = tokio::select! {
                event = events.try_next() => event?.ok_or(EndpointWatchError::Ended)?,
                // Staying only on evidence: a first list that has not come is no reading.
                _ = sleep_until(deadline) => return match listed_in.synced {
                    true => Ok(Listing::Staying),
                    false => Err(EndpointWatchError::Unanswered(patience)),
                },
            };
            let synced = listed_in.apply(event.clone(), listed);
            ready_in.apply(event.clone(), ready);
            terminating_in.apply(event, terminating);
            if !synced {
                continue;
            }
            if !terminating_in.listing.is_empty() {
                return Ok(Listing::Terminating {
                    ready: !ready_in.listing.is_empty(),
                });
            }
            if listed_in.listing.is_empty() {
                return Ok(Listing::Absent);
            }
        }
    }
}

/// The slices for which a test holds, kept across a watch's (re)lists.
#[derive(Default)]
struct SliceSet {
    listing: HashSet<String>,
    /// Filled while a (re)list runs.
    pending: HashSet<String>,
    synced: bool,
}

impl SliceSet {
    /// Applies one watch event; true once the first list is complete.
    fn apply(
        &mut self,
        event: Event<EndpointSlice>,
        test: impl Fn(&EndpointSlice) -> bool,
    ) -> bool {
        match event {
            Event::Init => self.pending.clear(),
            Event::InitApply(s) if test(&s) => {
                self.pending.insert(name(&s));
            }
            Event::InitApply(_) => {}
            Event::InitDone => {
                self.listing = std::mem::take(&mut self.pending);
                self.synced = true;
            }
            Event::Apply(s) if test(&s) => {
                self.listing.insert(name(&s));
            }
            Event::Apply(s) | Event::Delete(s) => {
                self.listing.remove(&name(&s));
            }
        }
        self.synced
    }
}

fn name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// `kubernetes.io/service-name in (a,b)`: the label the EndpointSlice controller puts on
/// every slice of a Service.
pub fn service_selector(services: &[String]) -> Option<String> {
    (!services.is_empty()).then(|| {
        format!(
            "{} in ({})",
            defaults::SERVICE_NAME_LABEL,
            services.join(",")
        )
    })
}

/// True while some slice lists `ip` as an endpoint whose `ready` condition is not false
/// (an absent condition means ready, as the EndpointSlice API says).
pub fn listed_ready(slices: &[EndpointSlice], ip: IpAddr) -> bool {
    listed_where(slices, ip, |e| {
        e.conditions.as_ref().and_then(|c| c.ready) != Some(false)
    })
}

/// The addresses `slices` list as ready, other than `me`, each once and in order.
pub fn ready_others(slices: &[EndpointSlice], me: IpAddr) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| *a != me)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

fn listed_where(slices: &[EndpointSlice], ip: IpAddr, test: impl Fn(&Endpoint) -> bool) -> bool {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| test(e))
        .flat_map(|e| e.addresses.iter())
        .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a == ip))
}

/// True while some slice lists `ip` as a terminating endpoint (its pod is being deleted).
pub fn listed_terminating(slices: &[EndpointSlice], ip: IpAddr) -> bool {
    listed_where(slices, ip, |e| {
        e.conditions.as_ref().and_then(|c| c.terminating) == Some(true)
    })
}

/// True while some slice lists `ip`, whatever its conditions.
pub fn listed_at_all(slices: &[EndpointSlice], ip: IpAddr) -> bool {
    listed_where(slices, ip, |_| true)
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
    fn a_deleted_pods_endpoint_is_terminating_and_a_restarting_ones_is_not() {
        let deleted = slice(serde_json::json!([
            {"addresses": [ME], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        assert!(listed_terminating(std::slice::from_ref(&deleted), me()));
        assert!(listed_at_all(&[deleted], me()));
        let restarting = slice(serde_json::json!([
            {"addresses": [ME], "conditions": {"ready": false, "serving": false, "terminating": false}},
            {"addresses": ["10.88.0.6"], "conditions": {"terminating": true}},
        ]));
        assert!(!listed_terminating(std::slice::from_ref(&restarting), me()));
        assert!(listed_at_all(&[restarting], me()));
        let elsewhere = slice(serde_json::json!([{"addresses": ["10.88.0.6"]}]));
        assert!(!listed_at_all(&[elsewhere], me()));
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

    #[test]
    fn the_selector_names_the_pods_services() {
        assert_eq!(service_selector(&[]), None);
        assert_eq!(
            service_selector(&["web".into(), "web-canary".into()]).as_deref(),
            Some("kubernetes.io/service-name in (web,web-canary)")
        );
    }

    #[tokio::test]
    async fn without_pod_env_it_waits_the_delay() {
        let d = Deregister::new(None, Duration::from_millis(200));
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
            Some(PodRef {
                ip: me(),
                namespace: "default".into(),
                services: vec!["web".into()],
            }),
            Duration::from_millis(200),
        );
        let t0 = Instant::now();
        assert_eq!(d.wait(t0).await, "delay");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
