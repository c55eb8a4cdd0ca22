//! `graceful-operator uninstall`: what `helm uninstall` runs before it removes anything (the
//! chart's pre-delete hook), so that removing graceful leaves nothing stuck.
//!
//! A GracefulRollout carries a finalizer that only a running operator lifts (it hands the
//! Deployment back first). With the operator gone, deleting such a GracefulRollout, or the
//! namespace that holds it, would wait forever. So, first:
//! 1. the operator's Deployment is scaled to zero and its pods waited out: no controller may
//!    take a Deployment over again or put a finalizer back while this runs;
//! 2. every GracefulRollout's Deployment is handed back exactly as a deletion hands it back
//!    (`rollout::cleanup`: the user's own values, a rollout in progress finished by the
//!    Deployment controller), and the finalizer is lifted. A namespaced install
//!    (`--namespaces`) lists, and may only list, the namespaces it acted in.
//!
//! The GracefulRollouts themselves stay, like the CRD that Helm keeps: inert while no operator
//! runs, deleted at once with their namespace, and taken up again by a new install.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::crd::GracefulRollout;
use crate::metrics::Metrics;
use crate::names::{FINALIZER, MANAGER};
use crate::outage::ApiOutages;
use crate::rollout::{self, Context};
use crate::scope::ScopeArgs;

/// How long the operator's pods may take to go (their preStop sleep, then the Lease hand-back).
const PODS_GONE: Duration = Duration::from_secs(90);

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The namespace of the operator's Deployment.
    #[arg(long, env = "GRACEFUL_OPERATOR_NAMESPACE")]
    pub namespace: String,
    /// The operator's Deployment, scaled to zero first.
    #[arg(long, env = "GRACEFUL_OPERATOR_DEPLOYMENT")]
    pub deployment: String,
    /// The namespaces the operator acted in: their GracefulRollouts are released.
    #[command(flatten)]
    pub scope: ScopeArgs,
}

pub async fn run(client: Client, args: &Args) -> anyhow::Result<()> {
    stop_operator(&client, args).await?;
    let mut all = Vec::new();
    for rollouts in args.scope.scope().apis::<GracefulRollout>(&client) {
        let place = rollouts.namespace().unwrap_or("any namespace").to_owned();
        let list = rollouts
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing GracefulRollouts in {place}"))?;
        all.extend(list.items);
    }
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Metrics::new(&mut Registry::default())),
        Arc::new(ApiOutages::default()),
    ));
    let mut handed_back = 0;
    for gr in all {
        if !gr.finalizers().iter().any(|f| f == FINALIZER) {
            continue;
        }
        let name = format!("{}/{}", gr.namespace().unwrap_or_default(), gr.name_any());
        release(&ctx, gr)
            .await
            .with_context(|| format!("handing GracefulRollout {name}'s Deployment back"))?;
        tracing::info!(rollout = %name, "Deployment handed back, finalizer lifted");
        handed_back += 1;
    }
    tracing::info!(
        handed_back,
        "every GracefulRollout released: graceful can be removed"
    );
    Ok(())
}

/// Scales the operator to zero and waits until none of its pods is left.
async fn stop_operator(client: &Client, args: &Args) -> anyhow::Result<()> {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &args.namespace);
    let deploy = deploys
        .get(&args.deployment)
        .await
        .with_context(|| format!("the operator's Deployment {}", args.deployment))?;
    let selector = deploy
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .context("the operator's Deployment has no matchLabels selector")?;
    deploys
        .patch(
            &args.deployment,
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .context("scaling the operator to zero")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let started = Instant::now();
    loop {
        let left = pods.list(&ListParams::default().labels(&selector)).await?;
        if left.items.is_empty() {
            tracing::info!(
                waited_s = started.elapsed().as_secs_f64(),
                "operator stopped"
            );
            return Ok(());
        }
        if started.elapsed() > PODS_GONE {
            anyhow::bail!(
                "{} operator pod(s) still there after {}s: {}",
                left.items.len(),
                PODS_GONE.as_secs(),
                left.items
                    .iter()
                    .map(|p| p.name_any())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Hands one GracefulRollout's Deployment back and lifts its finalizer; on a conflict (the
/// Deployment controller wrote meanwhile) it reads both again and retries.
async fn release(ctx: &Arc<Context>, gr: GracefulRollout) -> anyhow::Result<()> {
    let api: Api<GracefulRollout> =
        Api::namespaced(ctx.client.clone(), &gr.namespace().unwrap_or_default());
    let mut gr = gr;
    for attempt in 1.. {
        let result = async {
            rollout::cleanup(Arc::new(gr.clone()), ctx.clone()).await?;
            api.patch(
                &gr.name_any(),
                &PatchParams::default(),
                &Patch::<()>::Json(finalizer_removal(&gr)?),
            )
            .await?;
            Ok::<_, crate::Error>(())
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            // A conflict, or a finalizer list that changed since it was read (the patch's test).
            Err(e) if attempt < 10 => {
                tracing::debug!(error = %e, attempt, "retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                gr = api.get(&gr.name_any()).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// A JSON patch that removes our finalizer and only ours, if the list is still as read.
fn finalizer_removal(gr: &GracefulRollout) -> crate::Result<json_patch::Patch> {
    let now = gr.finalizers().to_vec();
    let kept: Vec<&String> = now.iter().filter(|f| *f != FINALIZER).collect();
    serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": now},
        {"op": "replace", "path": "/metadata/finalizers", "value": kept},
    ]))
    .map_err(|e| crate::Error::Invalid(format!("finalizer patch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_patch_keeps_every_other_finalizer_and_tests_the_list_it_read() {
        let gr: GracefulRollout = serde_json::from_value(json!({
            "apiVersion": "graceful.dev/v1alpha1", "kind": "GracefulRollout",
            "metadata": {"name": "web", "namespace": "ns",
                         "finalizers": ["example.com/keep", FINALIZER]},
            "spec": {"targetRef": {"name": "web"}},
        }))
        .unwrap();
        let patch = serde_json::to_value(finalizer_removal(&gr).unwrap()).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep", FINALIZER]},
                {"op": "replace", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
            ])
        );
    }
}
