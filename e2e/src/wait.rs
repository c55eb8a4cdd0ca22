//! Waiting with a deadline: every wait names what it waits for, so a timeout says what never
//! happened.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;

use crate::{Error, Result};

const POLL: Duration = Duration::from_millis(250);

/// Polls `check` until it returns Some, or fails after `timeout`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(timeout, what.to_string()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// True when the Deployment's current template is fully rolled out: every replica updated,
/// ready and available, and no pod of an older ReplicaSet counted any more.
pub fn rollout_complete(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    let generation = d.metadata.generation.unwrap_or(0);
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) == want
        && status.ready_replicas.unwrap_or(0) == want
        && status.available_replicas.unwrap_or(0) == want
        && status.replicas.unwrap_or(0) == want
}

/// Waits until Deployment `name` is fully rolled out.
pub async fn rollout(api: &Api<Deployment>, name: &str, timeout: Duration) -> Result<Deployment> {
    until(
        &format!("rollout of deployment {name}"),
        timeout,
        || async {
            let d = api.get(name).await?;
            Ok(rollout_complete(&d).then_some(d))
        },
    )
    .await
}

/// Waits until no pod matching `selector` is left (terminating ones included).
pub async fn pods_gone(api: &Api<Pod>, selector: &str, timeout: Duration) -> Result<()> {
    until(&format!("pods {selector} gone"), timeout, || async {
        let pods = api
            .list(&kube::api::ListParams::default().labels(selector))
            .await?;
        Ok(pods.items.is_empty().then_some(()))
    })
    .await
}

/// Waits until pod `name` reached phase Succeeded or Failed; returns the phase.
pub async fn pod_finished(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<String> {
    until(&format!("pod {name} finished"), timeout, || async {
        let pod = api.get(name).await?;
        let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
        Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
    })
    .await
}

/// Waits until pod `name` is Ready.
pub async fn pod_ready(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    until(&format!("pod {name} ready"), timeout, || async {
        let pod = api.get(name).await?;
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(ready.then_some(pod))
    })
    .await
}

/// Waits until `name` is deleted (get answers 404).
pub async fn pod_deleted(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<()> {
    until(&format!("pod {name} deleted"), timeout, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// The Service's ClusterIP.
pub async fn cluster_ip(api: &Api<Service>, name: &str) -> Result<String> {
    let svc = api.get(name).await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| Error::Cluster(format!("service {name} has no ClusterIP")))
}
