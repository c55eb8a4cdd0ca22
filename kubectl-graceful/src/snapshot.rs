//! What `status` shows, read from the API at one moment: the GracefulRollout, its Deployment,
//! and the Deployment's pods, each serving or draining, with the drain figures of the draining
//! ones from their sidecars. One read costs 3 requests plus one per draining pod.

use anyhow::{Context, Result, bail};
use graceful_operator::crd::GracefulRollout;
use graceful_operator::names::POD_TEMPLATE_HASH;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::Selector;
use kube::{Client, ResourceExt};

use crate::drain::{self, DrainFigures};

/// Where one pod stands, in the order a pod goes through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PodState {
    /// Not ready yet.
    Starting,
    /// Ready, in the Service's endpoints.
    Serving,
    /// Deleted, its sidecar draining (or, without a sidecar, terminating).
    Draining,
    /// Deleted, its sidecar done: the pod is about to go.
    Drained,
}

impl PodState {
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Starting => "starting",
            PodState::Serving => "serving",
            PodState::Draining => "draining",
            PodState::Drained => "drained",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodRow {
    pub name: String,
    /// The pod template's hash: the revision the pod runs.
    pub revision: String,
    /// "2/2": ready containers of all (the sidecar included).
    pub ready: String,
    pub state: PodState,
    /// For a draining pod with a sidecar that still answers.
    pub drain: Option<DrainFigures>,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub rollout: GracefulRollout,
    /// None when the Deployment does not exist (phase Missing).
    pub deployment: Option<Deployment>,
    /// The updated revision's pods first, then by name.
    pub pods: Vec<PodRow>,
    /// The data planes in front of the first pod listed, and their lags (docs/data-planes.md).
    pub data_planes: Option<String>,
}

/// The GracefulRollout `name`, or the one managing the Deployment `name`.
pub async fn find_rollout(client: &Client, ns: &str, name: &str) -> Result<GracefulRollout> {
    let api: Api<GracefulRollout> = Api::namespaced(client.clone(), ns);
    if let Some(gr) = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading GracefulRollout {ns}/{name}"))?
    {
        return Ok(gr);
    }
    let all = api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing GracefulRollouts in {ns}"))?;
    match all
        .items
        .into_iter()
        .find(|gr| gr.spec.target_ref.name == name)
    {
        Some(gr) => Ok(gr),
        None => bail!(
            "no GracefulRollout named {name} or managing a Deployment named {name} in namespace {ns}"
        ),
    }
}

/// Reads everything `status` shows.
pub async fn take(client: &Client, ns: &str, name: &str) -> Result<Snapshot> {
    let rollout = find_rollout(client, ns, name).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let target = &rollout.spec.target_ref.name;
    let deployment = deployments
        .get_opt(target)
        .await
        .with_context(|| format!("reading Deployment {ns}/{target}"))?;
    let mut pods = Vec::new();
    let mut data_planes = None;
    if let Some(selector) = deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .map(|s| s.selector.clone())
    {
        let selector = Selector::try_from(selector)
            .with_context(|| format!("the selector of Deployment {ns}/{target}"))?;
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let listed = api
            .list(&ListParams::default().labels_from(&selector))
            .await
            .with_context(|| format!("listing the pods of Deployment {ns}/{target}"))?;
        // The draining pods' sidecars are asked at once: one slow answer delays the read by
        // at most one timeout, not one per pod.
        pods = futures::future::join_all(listed.items.iter().map(|pod| row(client, pod))).await;
        data_planes = listed.items.iter().find_map(crate::drain::data_planes);
    }
    let updated = rollout
        .status
        .as_ref()
        .and_then(|s| s.updated_revision.clone())
        .unwrap_or_default();
    pods.sort_by(|a, b| (a.revision != updated, &a.name).cmp(&(b.revision != updated, &b.name)));
    Ok(Snapshot {
        rollout,
        deployment,
        pods,
        data_planes,
    })
}

async fn row(client: &Client, pod: &Pod) -> PodRow {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    // A native sidecar is an init container that keeps running (restartPolicy Always): it
    // counts with the others, as kubectl's READY column counts it.
    let sidecar_names: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    let sidecars: Vec<_> = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| sidecar_names.contains(&s.name.as_str()))
        .collect();
    // Once done, the sidecar exits.
    let sidecar_exited = sidecars
        .iter()
        .any(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()));
    let all: Vec<_> = statuses.into_iter().chain(sidecars).collect();
    let ready_count = all.iter().filter(|s| s.ready).count();
    let mut state = if pod.metadata.deletion_timestamp.is_some() {
        PodState::Draining
    } else if pod_ready(pod) {
        PodState::Serving
    } else {
        PodState::Starting
    };
    let mut drain = None;
    if state == PodState::Draining {
        // Done by its own account, or its sidecar already exited: an exited one is not asked.
        if !sidecar_exited {
            drain = drain::fetch(client, pod).await;
        }
        if sidecar_exited || drain.as_ref().is_some_and(|d| d.phase == "done") {
            state = PodState::Drained;
        }
    }
    PodRow {
        name: pod.name_any(),
        revision: pod
            .labels()
            .get(POD_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        ready: format!("{ready_count}/{}", all.len()),
        state,
        drain,
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
