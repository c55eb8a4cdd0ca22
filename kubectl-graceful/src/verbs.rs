//! The verbs users reach for, each one patch (two for retry) of what they would edit by hand.
//! Each returns the sentence to print.

use anyhow::{Context, Result, bail};
use graceful_operator::crd::{GracefulRollout, Phase};
use graceful_operator::names::POD_TEMPLATE_HASH;
use graceful_operator::revision;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::{Client, ResourceExt};
use serde_json::json;

/// Who wrote it, in managedFields.
const FIELD_MANAGER: &str = "kubectl-graceful";

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// A JSON merge patch of the GracefulRollout's spec; `what` names the change in an error.
async fn patch_rollout(
    client: &Client,
    gr: &GracefulRollout,
    spec: serde_json::Value,
    what: &str,
) -> Result<()> {
    let (ns, name, _) = names(gr);
    Api::<GracefulRollout>::namespaced(client.clone(), &ns)
        .patch(&name, &params(), &Patch::Merge(&json!({ "spec": spec })))
        .await
        .with_context(|| format!("{what} GracefulRollout {ns}/{name}"))?;
    Ok(())
}

/// A JSON merge patch of the target Deployment's spec.
async fn patch_deployment(
    client: &Client,
    gr: &GracefulRollout,
    spec: serde_json::Value,
    what: &str,
) -> Result<()> {
    let (ns, _, target) = names(gr);
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch(&target, &params(), &Patch::Merge(&json!({ "spec": spec })))
        .await
        .with_context(|| format!("{what} Deployment {ns}/{target}"))?;
    Ok(())
}

fn names(gr: &GracefulRollout) -> (String, String, String) {
    (
        gr.namespace().unwrap_or_default(),
        gr.name_any(),
        gr.spec.target_ref.name.clone(),
    )
}

/// A new rollout of the same template, as `kubectl rollout restart` starts one: the template's
/// `kubectl.kubernetes.io/restartedAt` annotation set to now.
pub async fn restart(client: &Client, gr: &GracefulRollout) -> Result<String> {
    let (_, _, target) = names(gr);
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let annotation = json!({"kubectl.kubernetes.io/restartedAt": now});
    let spec = json!({"template": {"metadata": {"annotations": annotation}}});
    patch_deployment(client, gr, spec, "restarting").await?;
    Ok(format!("deployment.apps/{target} restarted"))
}

/// Holds the rollout at its next step, as `kubectl rollout pause` does: the Deployment's own
/// `spec.paused`, which Argo CD shows as Suspended and which stops its progress deadline
/// (docs/rollout.md, "Pause").
pub async fn pause(client: &Client, gr: &GracefulRollout) -> Result<String> {
    let (_, _, target) = names(gr);
    patch_deployment(client, gr, json!({"paused": true}), "pausing").await?;
    Ok(format!("deployment.apps/{target} paused"))
}

/// Lets the rollout go on: whatever holds it, the Deployment's `spec.paused` or the
/// GracefulRollout's, is set back to false.
pub async fn resume(client: &Client, gr: &GracefulRollout) -> Result<String> {
    let (ns, name, target) = names(gr);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let paused = deployments
        .get(&target)
        .await
        .with_context(|| format!("reading Deployment {ns}/{target}"))?
        .spec
        .and_then(|s| s.paused)
        .unwrap_or(false);
    let mut done = Vec::new();
    if paused {
        patch_deployment(client, gr, json!({"paused": false}), "resuming").await?;
        done.push(format!("deployment.apps/{target} resumed"));
    }
    if gr.spec.paused {
        patch_rollout(client, gr, json!({"paused": false}), "resuming").await?;
        done.push(format!("gracefulrollout.graceful.dev/{name} resumed"));
    }
    if done.is_empty() {
        bail!("neither Deployment {ns}/{target} nor GracefulRollout {ns}/{name} is paused");
    }
    Ok(done.join("\n"))
}

/// Rolls the rollout in progress back to the stable pods now (`spec.abort`).
pub async fn abort(client: &Client, gr: &GracefulRollout) -> Result<String> {
    let (_, name, _) = names(gr);
    patch_rollout(client, gr, json!({"abort": true}), "aborting").await?;
    Ok(format!(
        "gracefulrollout.graceful.dev/{name} aborted: rolling back to the stable pods; \
         every new rollout is rolled back until `kubectl graceful retry {name}`"
    ))
}

/// Rolls out again what failed or was aborted: `spec.abort` back to false, and when the last
/// rollout was rolled back (Degraded), the failed revision's template back into the
/// Deployment, as `kubectl rollout undo --to-revision` of that revision would.
pub async fn retry(client: &Client, gr: &GracefulRollout) -> Result<String> {
    let (ns, name, target) = names(gr);
    let status = gr.status.clone().unwrap_or_default();
    let failed = status
        .failed_revision
        .filter(|_| status.phase == Phase::Degraded);
    if !gr.spec.abort && failed.is_none() {
        bail!(
            "GracefulRollout {ns}/{name} is {:?}: nothing was aborted or rolled back to retry",
            status.phase
        );
    }
    let mut done = Vec::new();
    if gr.spec.abort {
        patch_rollout(
            client,
            gr,
            json!({"abort": false}),
            "clearing spec.abort of",
        )
        .await?;
        done.push(format!(
            "gracefulrollout.graceful.dev/{name}: abort cleared"
        ));
    }
    if let Some(failed) = failed {
        let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
            .get(&target)
            .await
            .with_context(|| format!("reading Deployment {ns}/{target}"))?;
        let selector = deployment
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .context("the Deployment has no spec")?;
        let selector = Selector::try_from(selector).context("the Deployment's selector")?;
        let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels_from(&selector))
            .await
            .with_context(|| format!("listing the ReplicaSets of {ns}/{target}"))?;
        let template = replica_sets
            .items
            .iter()
            .find(|rs| rs.labels().get(POD_TEMPLATE_HASH) == Some(&failed))
            .and_then(|rs| rs.spec.as_ref()?.template.clone())
            .with_context(|| {
                format!("the ReplicaSet of revision {failed} is gone: nothing to roll out again")
            })?;
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/resourceVersion",
             "value": deployment.resource_version()},
            {"op": "replace", "path": "/spec/template",
             "value": revision::normalized(&template)},
        ]))?;
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .patch(&target, &params(), &Patch::Json::<()>(patch))
            .await
            .with_context(|| {
                format!("putting revision {failed} back into Deployment {ns}/{target}")
            })?;
        done.push(format!(
            "deployment.apps/{target}: rolling out revision {failed} again"
        ));
    }
    Ok(done.join("\n"))
}
