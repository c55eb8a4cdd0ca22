//! How a GracefulRollout shares a Deployment with the Deployment controller (docs/rollout.md).
//!
//! - The Deployment stays the source of truth for the template and replicas; the only field we
//!   write on it is `spec.paused: true` (plus two annotations), so the Deployment controller
//!   never creates a ReplicaSet or starts a rolling update of its own.
//! - While a rollout runs, every ReplicaSet of the Deployment has the GracefulRollout as its
//!   controller owner (the Deployment stays a non-controller owner, so garbage collection never
//!   orphans or deletes pods if either object goes away). A paused Deployment that owns no
//!   ReplicaSet has nothing to scale: its proportional scaling cannot fight ours.
//! - Between rollouts the ReplicaSets are handed back, so `kubectl scale` and the Deployment's
//!   status work as usual; on deletion of the GracefulRollout the Deployment gets its
//!   ReplicaSets back and `spec.paused` as it was.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::crd::GracefulRollout;
use crate::{Error, Result};

/// On the Deployment: the GracefulRollout that manages it.
pub const MANAGED_BY: &str = "graceful.dev/rollout";
/// On the Deployment: `spec.paused` before the take-over, restored on hand-back.
pub const PAUSED_BEFORE: &str = "graceful.dev/paused-before";
/// Field manager of every write of the operator.
pub const MANAGER: &str = "graceful-operator";

/// Pause the Deployment and mark it as ours. Refuses a Deployment another GracefulRollout manages.
pub async fn take_over(
    api: &Api<Deployment>,
    deploy: &Deployment,
    gr: &GracefulRollout,
) -> Result<Option<Deployment>> {
    let annotations = deploy.annotations();
    match annotations.get(MANAGED_BY) {
        Some(owner) if owner != &gr.name_any() => {
            return Err(Error::Invalid(format!(
                "Deployment {} is already managed by GracefulRollout {owner}",
                deploy.name_any()
            )));
        }
        Some(_) if paused(deploy) => return Ok(None),
        _ => {}
    }
    let before = annotations
        .get(PAUSED_BEFORE)
        .cloned()
        .unwrap_or_else(|| paused(deploy).to_string());
    let patch = json!({
        "metadata": {"annotations": {MANAGED_BY: gr.name_any(), PAUSED_BEFORE: before}},
        "spec": {"paused": true},
    });
    let d = api
        .patch(
            &deploy.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Some(d))
}

/// Undo `take_over`: `spec.paused` as it was, our annotations gone.
pub async fn release(api: &Api<Deployment>, deploy: &Deployment) -> Result<()> {
    let before = deploy
        .annotations()
        .get(PAUSED_BEFORE)
        .is_some_and(|v| v == "true");
    let patch = json!({
        "metadata": {"annotations": {MANAGED_BY: null, PAUSED_BEFORE: null}},
        "spec": {"paused": before},
    });
    api.patch(
        &deploy.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

pub fn paused(deploy: &Deployment) -> bool {
    deploy.spec.as_ref().and_then(|s| s.paused).unwrap_or(false)
}

fn deployment_ref(deploy: &Deployment, controller: bool) -> OwnerReference {
    let mut r = deploy
        .controller_owner_ref(&())
        .expect("a Deployment read from the API has a uid");
    r.controller = Some(controller);
    r.block_owner_deletion = Some(true);
    r
}

fn rollout_ref(gr: &GracefulRollout) -> OwnerReference {
    let mut r = gr
        .controller_owner_ref(&())
        .expect("a GracefulRollout read from the API has a uid");
    // Blocking the owner's deletion would need update on gracefulrollouts/finalizers; the
    // finalizer already keeps the GracefulRollout until its ReplicaSets are handed back.
    r.block_owner_deletion = Some(false);
    r
}

/// Owner references a ReplicaSet carries while the rollout controls it.
pub fn rollout_owners(gr: &GracefulRollout, deploy: &Deployment) -> Vec<OwnerReference> {
    vec![rollout_ref(gr), deployment_ref(deploy, false)]
}

/// Who controls a ReplicaSet now.
pub fn controlled_by(rs: &ReplicaSet, uid: &str) -> bool {
    rs.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

pub fn owned_by(rs: &ReplicaSet, uid: &str) -> bool {
    rs.owner_references().iter().any(|o| o.uid == uid)
}

/// Replace a ReplicaSet's owners; the resourceVersion makes it fail (and requeue) rather than
/// overwrite a concurrent change.
async fn set_owners(
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    owners: Vec<OwnerReference>,
) -> Result<ReplicaSet> {
    let patch = json!({
        "metadata": {"ownerReferences": owners, "resourceVersion": rs.resource_version()},
    });
    Ok(api
        .patch(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

fn size(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

/// Take every ReplicaSet not yet ours, the empty ones first: a paused Deployment left owning
/// only empty ReplicaSets would scale the newest of them up to its replicas, so it must keep
/// its active one until the very last adoption.
pub async fn adopt_all(
    api: &Api<ReplicaSet>,
    sets: &[ReplicaSet],
    gr: &GracefulRollout,
    deploy: &Deployment,
) -> Result<()> {
    let uid = uid_of(gr);
    let mut todo: Vec<&ReplicaSet> = sets.iter().filter(|rs| !controlled_by(rs, &uid)).collect();
    todo.sort_by_key(|rs| size(rs));
    for rs in todo {
        adopt(api, rs, gr, deploy).await?;
    }
    Ok(())
}

/// Give every ReplicaSet we control back, the largest first, for the same reason: at no moment
/// may the Deployment own only empty ReplicaSets.
pub async fn hand_back_all(
    api: &Api<ReplicaSet>,
    sets: &[ReplicaSet],
    gr_uid: &str,
    deploy: &Deployment,
) -> Result<()> {
    let mut todo: Vec<&ReplicaSet> = sets.iter().filter(|rs| controlled_by(rs, gr_uid)).collect();
    todo.sort_by_key(|rs| std::cmp::Reverse(size(rs)));
    for rs in todo {
        hand_back(api, rs, deploy).await?;
    }
    Ok(())
}

/// Make the GracefulRollout the controller of a ReplicaSet of its Deployment.
pub async fn adopt(
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    gr: &GracefulRollout,
    deploy: &Deployment,
) -> Result<ReplicaSet> {
    set_owners(api, rs, rollout_owners(gr, deploy)).await
}

/// Give a ReplicaSet back to its Deployment.
pub async fn hand_back(
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    deploy: &Deployment,
) -> Result<ReplicaSet> {
    set_owners(api, rs, vec![deployment_ref(deploy, true)]).await
}

/// Drop the GracefulRollout from a ReplicaSet whose Deployment is gone, leaving it to the garbage
/// collector like any ReplicaSet of a deleted Deployment.
pub async fn disown(api: &Api<ReplicaSet>, rs: &ReplicaSet, gr_uid: &str) -> Result<()> {
    let owners: Vec<OwnerReference> = rs
        .owner_references()
        .iter()
        .filter(|o| o.uid != gr_uid)
        .cloned()
        .collect();
    if owners.is_empty() {
        api.delete(&rs.name_any(), &Default::default()).await?;
    } else {
        set_owners(api, rs, owners).await?;
    }
    Ok(())
}

/// The GracefulRollout's uid (present on anything read from the API).
pub fn uid_of<K: Resource>(obj: &K) -> String {
    obj.meta().uid.clone().unwrap_or_default()
}
