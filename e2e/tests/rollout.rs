//! GracefulRollout on the real cluster (issue: graceful-operator). Each scenario: the demo app
//! with the sidecar injected, behind a Service, managed by a GracefulRollout, rolled out under
//! steady load from oha; failed requests are counted by oha, serving pods are sampled from the
//! EndpointSlices all along.
//!
//! Needs the cluster, the images and the chart (`make e2e` does all three).

use std::time::Duration;

use graceful_e2e::graceful::{self, ServingSampler};
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{cluster, wait};
use graceful_operator::crd::{GracefulRollout, Phase};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const APP: &str = "web";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);

async fn setup(prefix: &str, strategy: serde_json::Value) -> (TestNamespace, String) {
    let client = cluster::client()
        .await
        .expect("e2e cluster (make cluster-up)");
    let ns = TestNamespace::create(&client, prefix)
        .await
        .expect("namespace");
    let url = graceful::deploy_managed_demo(&ns, APP, 3, strategy)
        .await
        .unwrap_or_else(|e| {
            ns.print_diagnostics();
            panic!("managed demo did not come up: {e}")
        });
    (ns, url)
}

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn three_replica_rollout_drops_nothing_and_keeps_three_serving() {
    let (ns, url) = setup("grro-basic", json!({})).await;
    let sampler = ServingSampler::start(&ns, APP);
    let (gr, report, wall) =
        graceful::rollout_under_load(&ns, APP, &url, &Load::default(), ROLLOUT_TIMEOUT)
            .await
            .unwrap_or_else(|e| fail(&ns, format!("rollout did not finish: {e}")));
    let min_serving = sampler.stop().await;
    eprintln!(
        "rollout in {:.1}s: {report}; fewest serving pods sampled: {min_serving}",
        wall.as_secs_f64()
    );
    let last = gr
        .status
        .and_then(|s| s.last_rollout)
        .expect("last rollout recorded");
    assert_eq!(last.outcome, "Succeeded");
    if report.failed != 0 || min_serving < 3 {
        fail(
            &ns,
            format!(
                "failed requests: {} (want 0), fewest serving: {min_serving} (want >= 3)",
                report.failed
            ),
        );
    }
    assert!(
        report.sent > 300,
        "the load generator sent too little to prove anything: {report}"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn paused_stops_at_the_next_step_and_resume_completes() {
    let (ns, url) = setup("grro-pause", json!({"minServingSeconds": 3})).await;
    let grs = ns.api::<GracefulRollout>();
    let (result, report) = Load::default()
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            // Wait for the first step, then pause.
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            graceful::patch_spec(&ns, APP, json!({"paused": true})).await?;
            wait::until("phase Paused", Duration::from_secs(30), || async {
                Ok(grs
                    .get(APP)
                    .await?
                    .status
                    .filter(|s| s.phase == Phase::Paused)
                    .map(|_| ()))
            })
            .await?;
            // Paused: the ReplicaSet sizes must not move.
            let sizes = graceful::replica_set_sizes(&ns).await?;
            tokio::time::sleep(Duration::from_secs(8)).await;
            let later = graceful::replica_set_sizes(&ns).await?;
            graceful::patch_spec(&ns, APP, json!({"paused": false})).await?;
            let gr = graceful::wait_rollout_finished(&ns, APP, since, ROLLOUT_TIMEOUT).await?;
            Ok::<_, graceful_e2e::Error>((sizes, later, gr))
        })
        .await
        .expect("load run");
    let (sizes, later, _gr) = result.unwrap_or_else(|e| fail(&ns, format!("pause/resume: {e}")));
    eprintln!("paused sizes {sizes:?} then {later:?}; {report}");
    assert_eq!(sizes, later, "ReplicaSets were scaled while paused");
    if report.failed != 0 {
        fail(
            &ns,
            format!("failed requests across pause/resume: {report}"),
        );
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn a_revision_that_never_becomes_ready_is_rolled_back_with_old_pods_untouched() {
    let (ns, url) = setup("grro-rollback", json!({"progressDeadlineSeconds": 20})).await;
    let pods = ns.api::<Pod>();
    let old: Vec<String> = pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("pods")
        .items
        .iter()
        .map(|p| p.uid().unwrap_or_default())
        .collect();
    assert_eq!(old.len(), 3);
    let (result, report) = Load::default()
        .during(&url, async {
            // The new revision's readiness path answers 404: its pods never become ready.
            let patch = json!({"spec": {"template": {"spec": {"containers": [
                {"name": "demo", "readinessProbe": {"httpGet": {"path": "/never-ready", "port": 8080}}}
            ]}}}});
            ns.api::<Deployment>().patch(APP, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
            wait::until("rolled back (phase Degraded, failed revision recorded)", Duration::from_secs(120), || async {
                let gr = ns.api::<GracefulRollout>().get(APP).await?;
                Ok(gr.status.filter(|s| s.phase == Phase::Degraded && s.failed_revision.is_some()).map(|_| ()))
            })
            .await
        })
        .await
        .expect("load run");
    result.unwrap_or_else(|e| fail(&ns, format!("no rollback: {e}")));
    let now: Vec<Pod> = pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("pods")
        .items;
    for uid in &old {
        let p = now.iter().find(|p| p.uid().as_deref() == Some(uid));
        match p {
            Some(p) if p.metadata.deletion_timestamp.is_none() => {}
            _ => fail(&ns, format!("old pod {uid} was touched by the rollback")),
        }
    }
    eprintln!("rolled back; {report}");
    if report.failed != 0 {
        fail(
            &ns,
            format!("failed requests during a failed rollout: {report}"),
        );
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn operator_killed_mid_rollout_finishes_after_restart() {
    let (ns, url) = setup("grro-kill", json!({"minServingSeconds": 5})).await;
    let (result, report) = Load::default()
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            let killed = graceful::kill_operator_pods(&ns.client).await?;
            eprintln!("killed operator pods {killed:?} mid-rollout");
            graceful::wait_rollout_finished(&ns, APP, since, ROLLOUT_TIMEOUT).await
        })
        .await
        .expect("load run");
    result.unwrap_or_else(|e| {
        fail(
            &ns,
            format!("rollout did not finish after the operator restarted: {e}"),
        )
    });
    eprintln!("operator restart mid-rollout: {report}");
    if report.failed != 0 {
        fail(&ns, format!("failed requests: {report}"));
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn deleting_the_rollout_hands_the_deployment_back() {
    let (ns, url) = setup("grro-handback", json!({})).await;
    ns.api::<GracefulRollout>()
        .delete(APP, &DeleteParams::default())
        .await
        .expect("delete grro");
    wait::until("GracefulRollout gone", Duration::from_secs(60), || async {
        Ok(ns
            .api::<GracefulRollout>()
            .get_opt(APP)
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let d = ns.api::<Deployment>().get(APP).await.expect("deployment");
    // `paused: false` is the API's default, so it reads back as absent.
    assert!(
        !d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false),
        "paused restored"
    );
    assert!(!d.annotations().contains_key("graceful.dev/rollout"));
    for rs in ns
        .api::<ReplicaSet>()
        .list(&ListParams::default())
        .await
        .expect("rs")
        .items
    {
        let controller = rs
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))
            .map(|o| o.kind.clone());
        assert_eq!(
            controller.as_deref(),
            Some("Deployment"),
            "ReplicaSet {} not handed back",
            rs.name_any()
        );
    }
    // The native controller rolls it out again, as plain `kubectl rollout restart` does.
    let (done, report) = Load::default()
        .during(&url, async {
            cluster::kubectl_output(&[
                "-n",
                &ns.name,
                "rollout",
                "restart",
                &format!("deployment/{APP}"),
            ])?;
            wait::rollout(&ns.api(), APP, ROLLOUT_TIMEOUT).await
        })
        .await
        .expect("load run");
    done.unwrap_or_else(|e| fail(&ns, format!("plain rollout after hand-back: {e}")));
    eprintln!("plain rollout after hand-back (sidecar still injected): {report}");
}
