//! Scenario pieces for graceful itself: the demo with the sidecar injected and managed by a
//! GracefulRollout, triggering and awaiting its rollouts, and sampling how many pods serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use graceful_operator::crd::{GracefulRollout, Phase};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::load::{Load, LoadReport};
use crate::namespace::TestNamespace;
use crate::{Error, Result, demo, wait};

/// Namespace and labels of the operator installed by `make deploy`.
pub const OPERATOR_NAMESPACE: &str = "graceful-system";
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=graceful,app.kubernetes.io/component=operator";

/// The demo with `graceful.dev/inject: "true"` on its pod template, behind a Service that
/// targets the named port (which the sidecar takes over).
pub fn injected_deployment(name: &str, replicas: i32, version: &str) -> Deployment {
    let mut d = demo::deployment(name, replicas, version);
    let template = &mut d.spec.as_mut().expect("spec").template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default)
        .insert("graceful.dev/inject".into(), "true".into());
    d
}

/// [`injected_deployment`] with more pod template annotations.
pub fn injected_with(name: &str, replicas: i32, annotations: &[(&str, &str)]) -> Deployment {
    let mut d = injected_deployment(name, replicas, "v1");
    let template = &mut d.spec.as_mut().expect("spec").template;
    let all = template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default);
    for (k, v) in annotations {
        all.insert((*k).into(), (*v).into());
    }
    d
}

pub fn named_port_service(name: &str) -> Service {
    let mut s = demo::service(name);
    if let Some(port) = s
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .and_then(|p| p.first_mut())
    {
        port.target_port =
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()));
    }
    s
}

pub fn graceful_rollout(name: &str, strategy: serde_json::Value) -> GracefulRollout {
    serde_json::from_value(json!({
        "apiVersion": "graceful.dev/v1alpha1",
        "kind": "GracefulRollout",
        "metadata": {"name": name},
        "spec": {"targetRef": {"name": name}, "strategy": strategy},
    }))
    .expect("GracefulRollout manifest")
}

/// Injected demo + Service + GracefulRollout, settled (Healthy, every pod serving); returns the
/// Service URL for the load generator.
pub async fn deploy_managed_demo(
    ns: &TestNamespace,
    name: &str,
    replicas: i32,
    strategy: serde_json::Value,
) -> Result<String> {
    // The Service first, as Helm orders them: the webhook names in each sidecar the Services
    // that select its pod when it injects it, and a pod created before its Service drains on
    // every EndpointSlice of the namespace. Applied the other way, the first pods raced the
    // Service once the controller manager created pods faster (scale.rs saw one such drain).
    ns.apply(&named_port_service(name)).await?;
    ns.apply(&injected_deployment(name, replicas, "v1")).await?;
    wait::rollout(&ns.api(), name, Duration::from_secs(120)).await?;
    ns.apply(&graceful_rollout(name, strategy)).await?;
    wait_phase(ns, name, Phase::Healthy, Duration::from_secs(60)).await?;
    let ip = wait::cluster_ip(&ns.api(), name).await?;
    wait::service_serving(
        &ns.api(),
        name,
        &ip,
        80,
        replicas as usize,
        Duration::from_secs(60),
    )
    .await?;
    Ok(format!("http://{ip}/"))
}

pub async fn wait_phase(
    ns: &TestNamespace,
    name: &str,
    phase: Phase,
    timeout: Duration,
) -> Result<GracefulRollout> {
    let api = ns.api::<GracefulRollout>();
    wait::until(
        &format!("GracefulRollout {name} phase {phase:?}"),
        timeout,
        || async {
            let gr = api.get(name).await?;
            Ok(gr
                .status
                .as_ref()
                .is_some_and(|s| s.phase == phase)
                .then_some(gr))
        },
    )
    .await
}

/// Changes the pod template as `kubectl rollout restart` does; returns the moment of the change.
pub async fn trigger(ns: &TestNamespace, name: &str) -> Result<Timestamp> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now.to_string()}}}}});
    let since = Timestamp::now();
    ns.api::<Deployment>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(since)
}

/// One rollout of `name` to its end: `kubectl rollout restart`'s patch and the Deployment's
/// rollout, or (`managed`) a GracefulRollout's rollout.
pub async fn restart(
    ns: &TestNamespace,
    name: &str,
    managed: bool,
    timeout: std::time::Duration,
) -> Result<()> {
    if managed {
        let since = trigger(ns, name).await?;
        wait_rollout_finished(ns, name, since, timeout).await?;
    } else {
        crate::rollout::restart(ns, name).await?;
        wait::rollout(&ns.api::<Deployment>(), name, timeout).await?;
    }
    Ok(())
}

/// Waits until a rollout that started after `since` finished successfully.
pub async fn wait_rollout_finished(
    ns: &TestNamespace,
    name: &str,
    since: Timestamp,
    timeout: Duration,
) -> Result<GracefulRollout> {
    let api = ns.api::<GracefulRollout>();
    wait::until(
        &format!("GracefulRollout {name} to finish a rollout"),
        timeout,
        || async {
            let gr = api.get(name).await?;
            let done = gr.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Healthy
                    && s.last_rollout.as_ref().is_some_and(|r| {
                        r.started_at.0
                            >= since
                                .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(2))
                                .unwrap_or(since)
                    })
            });
            Ok(done.then_some(gr))
        },
    )
    .await
}

/// One GracefulRollout rollout (a template change, then its end) under `load` against `url`:
/// the finished GracefulRollout, vegeta's counts, and the wall time from the change to the end.
pub async fn rollout_under_load(
    ns: &TestNamespace,
    name: &str,
    url: &str,
    load: &Load,
    timeout: Duration,
) -> Result<(GracefulRollout, LoadReport, Duration)> {
    let (done, report) = load
        .during(url, async {
            let started = std::time::Instant::now();
            let since = trigger(ns, name).await?;
            let gr = wait_rollout_finished(ns, name, since, timeout).await?;
            Ok::<_, Error>((gr, started.elapsed()))
        })
        .await?;
    let (gr, wall) = done?;
    Ok((gr, report, wall))
}

/// Waits until the rollout started by a template change has at least one pod of the new revision.
pub async fn wait_first_new_pod(
    ns: &TestNamespace,
    name: &str,
    timeout: Duration,
) -> Result<GracefulRollout> {
    wait_new_pods(ns, name, 1, timeout).await
}

/// Waits until the rollout started by a template change has at least `n` pods of the new
/// revision and is still going.
pub async fn wait_new_pods(
    ns: &TestNamespace,
    name: &str,
    n: i32,
    timeout: Duration,
) -> Result<GracefulRollout> {
    let api = ns.api::<GracefulRollout>();
    wait::until(
        &format!("{n} pod(s) of the new revision of {name}"),
        timeout,
        || async {
            let gr = api.get(name).await?;
            let started = gr.status.as_ref().is_some_and(|s| {
                s.rollout_started_at.is_some()
                    && s.updated_revision != s.stable_revision
                    && s.updated >= n
            });
            Ok(started.then_some(gr))
        },
    )
    .await
}

/// Waits until exactly `n` pods of `app` exist and none is terminating (old pods drained).
pub async fn wait_pods_settled(
    ns: &TestNamespace,
    app: &str,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let api = ns.api::<Pod>();
    let lp = ListParams::default().labels(&format!("app={app}"));
    wait::until(
        &format!("{n} pods of {app}, none terminating"),
        timeout,
        || async {
            let pods = api.list(&lp).await?.items;
            let settled =
                pods.len() == n && pods.iter().all(|p| p.metadata.deletion_timestamp.is_none());
            Ok(settled.then_some(()))
        },
    )
    .await
}

pub async fn patch_spec(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> Result<()> {
    ns.api::<GracefulRollout>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec})),
        )
        .await?;
    Ok(())
}

/// ReplicaSet name -> spec.replicas, sorted by name.
pub async fn replica_set_sizes(ns: &TestNamespace) -> Result<Vec<(String, i32)>> {
    let mut sizes: Vec<(String, i32)> = ns
        .api::<ReplicaSet>()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|rs| {
            (
                rs.name_any(),
                rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            )
        })
        .collect();
    sizes.sort();
    Ok(sizes)
}

/// Deletes every operator pod at once, without grace (a crash, as far as the rollout can tell).
pub async fn kill_operator_pods(client: &Client) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let names: Vec<String> = pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    if names.is_empty() {
        return Err(Error::Report(format!(
            "no operator pods ({OPERATOR_SELECTOR}) in {OPERATOR_NAMESPACE}: is the chart deployed?"
        )));
    }
    for n in &names {
        pods.delete(
            n,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(names)
}

/// Samples, every 200 ms, how many endpoints of a Service's slices are ready; `stop` returns the
/// fewest seen.
pub struct ServingSampler {
    stop: Arc<AtomicBool>,
    fewest: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ServingSampler {
    pub fn start(ns: &TestNamespace, service: &str) -> Self {
        let api: Api<EndpointSlice> = ns.api();
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        let stop = Arc::new(AtomicBool::new(false));
        let fewest = Arc::new(AtomicUsize::new(usize::MAX));
        let (s, f) = (stop.clone(), fewest.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Ok(list) = api.list(&lp).await {
                    let ready = list
                        .items
                        .iter()
                        .flat_map(|sl| sl.endpoints.iter())
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                        .count();
                    f.fetch_min(ready, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { stop, fewest, task }
    }

    pub async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.fewest.load(Ordering::Relaxed)
    }
}

/// What a [`DeploymentSampler`] saw of a Deployment, sampled every second as `kubectl get deploy`
/// shows it (READY = readyReplicas/replicas), with its Available condition and Argo CD's rating.
#[derive(Clone, Debug, Default)]
pub struct DeploymentSamples {
    pub samples: usize,
    /// The most ready pods were short of `spec.replicas` at any sample (0: never short).
    pub worst_shortfall: i32,
    /// Samples whose Available condition was not True.
    pub available_not_true: usize,
    pub health_seen: std::collections::BTreeSet<crate::argo::Health>,
}

impl std::fmt::Display for DeploymentSamples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples of the Deployment: ready short of replicas by at most {}, Available not True in {}, Argo CD health {:?}",
            self.samples, self.worst_shortfall, self.available_not_true, self.health_seen
        )
    }
}

/// Samples a Deployment every second until stopped.
pub struct DeploymentSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<DeploymentSamples>,
}

impl DeploymentSampler {
    pub fn start(ns: &TestNamespace, name: &str) -> Self {
        let api: Api<Deployment> = ns.api();
        let name = name.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = DeploymentSamples::default();
            while !s.load(Ordering::Relaxed) {
                if let Ok(d) = api.get(&name).await {
                    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let status = d.status.clone().unwrap_or_default();
                    let ready = status.ready_replicas.unwrap_or(0);
                    seen.samples += 1;
                    seen.worst_shortfall = seen.worst_shortfall.max(want - ready);
                    let available = status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Available" && c.status == "True");
                    seen.available_not_true += usize::from(!available);
                    seen.health_seen.insert(crate::argo::deployment_health(&d));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            seen
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> DeploymentSamples {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// `kubectl rollout status deployment/NAME`, running in the background: `finish` returns whether
/// it exited 0 and what it printed.
pub struct RolloutStatus {
    child: tokio::process::Child,
}

impl RolloutStatus {
    pub fn start(ns: &TestNamespace, name: &str, timeout: Duration) -> Result<Self> {
        let mut cmd = tokio::process::Command::new(crate::cluster::tool("kubectl")?);
        cmd.arg("--kubeconfig")
            .arg(crate::cluster::kubeconfig_path())
            .args([
                "-n",
                &ns.name,
                "rollout",
                "status",
                &format!("deployment/{name}"),
            ])
            .arg(format!("--timeout={}s", timeout.as_secs()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(Error::io("running kubectl rollout status"))?;
        Ok(Self { child })
    }

    pub async fn finish(self) -> Result<(bool, String)> {
        let out = self
            .child
            .wait_with_output()
            .await
            .map_err(Error::io("waiting for kubectl rollout status"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }
}
