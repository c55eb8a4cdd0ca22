//! Waiting with a deadline: every wait names what it waits for, so a timeout says what never
//! happened.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Error, Result};

const POLL: Duration = Duration::from_millis(250);

/// Polls `check` until it returns Some, or fails after `timeout`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    until_seen(what, timeout, || {
        let checked = check();
        async move { Ok(checked.await?.ok_or_else(String::new)) }
    })
    .await
}

/// `until` for a check that says what it saw instead (`Err`): a timeout then names the last
/// thing seen, so a failure in CI says why it never happened, not only that.
pub async fn until_seen<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match check().await? {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            let what = match seen.is_empty() {
                true => what.to_string(),
                false => format!("{what}; last seen: {seen}"),
            };
            return Err(Error::Timeout(timeout, what));
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

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until pod `name` is Ready.
pub async fn pod_ready(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    until(&format!("pod {name} ready"), timeout, || async {
        let pod = api.get(name).await?;
        Ok(is_ready(&pod).then_some(pod))
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

/// How long one probing GET may take: a connect to an address nobody answers hangs for minutes.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.0 GET on a plain socket (no client library between the test and the wire):
/// the status line and the body, within `GET_TIMEOUT`.
pub async fn http_get(addr: &str, path: &str) -> Result<(String, String)> {
    http_get_host(addr, path, addr).await
}

/// `http_get` with another Host header (name-based routing).
pub async fn http_get_host(addr: &str, path: &str, host: &str) -> Result<(String, String)> {
    let exchange = async {
        let io = |what: &str| Error::io(format!("GET http://{addr}{path} (Host {host}): {what}"));
        let mut stream = TcpStream::connect(addr).await.map_err(io("connect"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(io("write"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(io("read"))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.lines().next().unwrap_or_default().to_string();
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(GET_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            Error::Timeout(
                GET_TIMEOUT,
                format!("GET http://{addr}{path} (Host {host})"),
            )
        })?
}

/// Waits until Service `name` serves from this host: its EndpointSlices list `ready` ready
/// endpoints and `GET /` on the ClusterIP answers 2xx ten times in a row. Pods being Ready is
/// not enough: kube-proxy programs the new endpoints a moment later, and a measurement started
/// in between counts refusals that no rollout caused.
pub async fn service_serving(
    slices: &Api<EndpointSlice>,
    name: &str,
    cluster_ip: &str,
    port: u16,
    ready: usize,
    timeout: Duration,
) -> Result<()> {
    let selector = format!("kubernetes.io/service-name={name}");
    let addr = format!("{cluster_ip}:{port}");
    until_seen(
        &format!("service {name} serving {ready} endpoints at {addr}"),
        timeout,
        || async {
            let list = slices
                .list(&ListParams::default().labels(&selector))
                .await?;
            let listed = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                .count();
            if listed != ready {
                return Ok(Err(format!("{listed} ready endpoints listed")));
            }
            Ok(ten_2xx_in_a_row(&addr, &addr).await)
        },
    )
    .await
}

/// Whether `GET /` with `Host: host` at `addr` answers 2xx ten times in a row; if not, what the
/// first other answer was.
pub async fn ten_2xx_in_a_row(addr: &str, host: &str) -> Result<(), String> {
    for attempt in 1..=10 {
        match http_get_host(addr, "/", host).await {
            Ok((status, _))
                if status
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|c| c.starts_with('2')) => {}
            Ok((status, body)) => {
                let body: String = body.chars().take(120).collect();
                return Err(format!("GET {attempt}/10: {status:?} {body:?}"));
            }
            Err(e) => return Err(format!("GET {attempt}/10: {e}")),
        }
    }
    Ok(())
}
