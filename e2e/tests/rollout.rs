//! GracefulRollout on the real cluster: the Deployment stays a normal Deployment (docs/rollout.md).
//! Each scenario: the demo app with the sidecar injected, behind a Service, managed by a
//! GracefulRollout, changed with the kubectl verbs people use, under steady load from vegeta
//! (failed requests counted by vegeta); the Deployment is sampled every second as `kubectl get
//! deploy` shows it, with its Available condition and Argo CD's health rating.
//!
//! Needs the cluster, the images and the chart (`make e2e` does all three).

use std::time::Duration;

use graceful_e2e::argo::Health;
use graceful_e2e::graceful::{self, DeploymentSampler, DeploymentSamples, RolloutStatus};
use graceful_e2e::load::{Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{cluster, demo, wait};
use graceful_operator::crd::{GracefulRollout, Phase};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const APP: &str = "web";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);
const HELD: &str = "graceful.dev/held";

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

fn kubectl(ns: &TestNamespace, args: &[&str]) -> graceful_e2e::Result<String> {
    let mut all = vec!["-n", ns.name.as_str()];
    all.extend_from_slice(args);
    cluster::kubectl_output(&all)
}

/// The Deployment fields a user writes and graceful must leave as written at rest.
fn users_fields(d: &Deployment) -> DeploymentSpec {
    let spec = d.spec.clone().expect("spec");
    DeploymentSpec {
        template: Default::default(),
        replicas: None,
        ..spec
    }
}

/// Whether graceful-operator has a managedFields entry for the Deployment's spec.
fn owns_spec_fields(d: &Deployment) -> bool {
    d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some("graceful-operator")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
    })
}

/// The uids of the app's pods now.
async fn pod_uids(ns: &TestNamespace) -> Vec<String> {
    let lp = ListParams::default().labels(&format!("app={APP}"));
    let pods = ns.api::<Pod>().list(&lp).await.expect("pods").items;
    pods.iter().map(|p| p.uid().unwrap_or_default()).collect()
}

/// Every pod of `old` still runs, not terminating: `what` never touched it.
async fn assert_untouched(ns: &TestNamespace, old: &[String], what: &str) {
    let lp = ListParams::default().labels(&format!("app={APP}"));
    let now = ns.api::<Pod>().list(&lp).await.expect("pods").items;
    for uid in old {
        match now.iter().find(|p| p.uid().as_deref() == Some(uid)) {
            Some(p) if p.metadata.deletion_timestamp.is_none() => {}
            _ => fail(ns, format!("old pod {uid} was touched by the {what}")),
        }
    }
}

async fn deployment(ns: &TestNamespace) -> Deployment {
    ns.api::<Deployment>().get(APP).await.expect("deployment")
}

/// One change made with `verb` under load: `kubectl rollout status` (started right after it)
/// must exit 0, the GracefulRollout must record the rollout as Succeeded, and the Deployment,
/// sampled every second, must keep every replica ready, stay Available and never look
/// Suspended to Argo CD.
async fn change_under_load(
    ns: &TestNamespace,
    url: &str,
    verb: &[&str],
) -> (LoadReport, DeploymentSamples, String, Duration) {
    let sampler = DeploymentSampler::start(ns, APP);
    let (result, report) = Load::default()
        .during(url, async {
            let started = std::time::Instant::now();
            let since = Timestamp::now();
            kubectl(ns, verb)?;
            let status = RolloutStatus::start(ns, APP, ROLLOUT_TIMEOUT)?;
            let (ok, out) = status.finish().await?;
            let wall = started.elapsed();
            if !ok {
                return Err(graceful_e2e::Error::Cluster(format!(
                    "kubectl rollout status failed: {out}"
                )));
            }
            let gr = graceful::wait_rollout_finished(ns, APP, since, ROLLOUT_TIMEOUT).await?;
            Ok::<_, graceful_e2e::Error>((gr, out, wall))
        })
        .await
        .expect("load run");
    let samples = sampler.stop().await;
    let (gr, out, wall) = result.unwrap_or_else(|e| fail(ns, format!("{verb:?}: {e}")));
    let last = gr.status.and_then(|s| s.last_rollout).expect("recorded");
    assert_eq!(last.outcome, "Succeeded", "{verb:?}");
    (report, samples, out, wall)
}

fn check_whole(ns: &TestNamespace, what: &str, report: &LoadReport, samples: &DeploymentSamples) {
    eprintln!("{what}: {report}; {samples}");
    if report.failed != 0 {
        fail(ns, format!("{what}: failed requests: {report}"));
    }
    if samples.worst_shortfall > 0 || samples.available_not_true > 0 {
        fail(
            ns,
            format!("{what}: the Deployment did not stay whole: {samples}"),
        );
    }
    if samples.health_seen.contains(&Health::Suspended) {
        fail(
            ns,
            format!("{what}: Argo CD would have seen it Suspended: {samples}"),
        );
    }
    assert!(
        report.sent > 300,
        "too little load to prove anything: {report}"
    );
}

async fn check_at_rest(ns: &TestNamespace, written: &DeploymentSpec) {
    let d = deployment(ns).await;
    assert!(
        d.annotations().get(HELD).is_none(),
        "the hold is lifted at rest"
    );
    assert_eq!(
        &users_fields(&d),
        written,
        "the Deployment is as its user wrote it"
    );
    assert!(
        !owns_spec_fields(&d),
        "graceful-operator still owns spec fields: a server-side apply would conflict"
    );
    assert_eq!(graceful_e2e::argo::deployment_health(&d), Health::Healthy);
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn restart_set_image_and_undo_roll_out_gracefully_and_the_deployment_stays_whole() {
    let (ns, url) = setup("grro-verbs", json!({"minServingSeconds": 3})).await;
    let written = users_fields(&deployment(&ns).await);
    assert_ne!(written.paused, Some(true), "not paused at rest");
    let next_image = format!("demo={}", demo::image("graceful-demo-next"));
    let deploy = format!("deployment/{APP}");
    for verb in [
        vec!["rollout", "restart", deploy.as_str()],
        vec!["set", "image", deploy.as_str(), next_image.as_str()],
        vec!["rollout", "undo", deploy.as_str()],
    ] {
        let (report, samples, status, wall) = change_under_load(&ns, &url, &verb).await;
        let what = format!("kubectl {}", verb.join(" "));
        eprintln!(
            "{what}: rolled out in {:.1}s; rollout status said: {}",
            wall.as_secs_f64(),
            status.trim()
        );
        check_whole(&ns, &what, &report, &samples);
        assert!(
            samples.health_seen.contains(&Health::Progressing),
            "{what}: Argo CD never saw it Progressing: {samples}"
        );
        check_at_rest(&ns, &written).await;
    }
    let image = deployment(&ns)
        .await
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .image
        .clone();
    assert_eq!(
        image,
        Some(demo::image("graceful-demo")),
        "undo brought the first image back"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn scaling_in_the_middle_of_rollouts_is_honoured() {
    let (ns, url) = setup("grro-scale", json!({"minServingSeconds": 3})).await;
    for (from, to) in [(3, 5), (5, 2)] {
        let sampler = DeploymentSampler::start(&ns, APP);
        let (result, report) = Load::default()
            .during(&url, async {
                let since = graceful::trigger(&ns, APP).await?;
                graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
                kubectl(
                    &ns,
                    &[
                        "scale",
                        &format!("deployment/{APP}"),
                        &format!("--replicas={to}"),
                    ],
                )?;
                graceful::wait_rollout_finished(&ns, APP, since, ROLLOUT_TIMEOUT).await?;
                wait::rollout(&ns.api(), APP, ROLLOUT_TIMEOUT).await
            })
            .await
            .expect("load run");
        let samples = sampler.stop().await;
        let d = result.unwrap_or_else(|e| fail(&ns, format!("scale {from} -> {to}: {e}")));
        eprintln!("scale {from} -> {to} mid-rollout: {report}; {samples}");
        assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(to));
        if report.failed != 0 {
            fail(
                &ns,
                format!("scale {from} -> {to}: failed requests: {report}"),
            );
        }
        // Scaling up, the new replicas take a moment to be ready; never fewer than before.
        if samples.worst_shortfall > (to - from).max(0) {
            fail(
                &ns,
                format!("scale {from} -> {to}: too few ready: {samples}"),
            );
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn a_revision_that_never_becomes_ready_is_rolled_back_with_old_pods_untouched() {
    let (ns, url) = setup("grro-rollback", json!({})).await;
    // The Deployment's own deadline decides, as it does natively.
    ns.api::<Deployment>()
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"progressDeadlineSeconds": 20}})),
        )
        .await
        .expect("deadline");
    wait::rollout(&ns.api(), APP, Duration::from_secs(60))
        .await
        .expect("settled");
    let written = users_fields(&deployment(&ns).await);
    let pods = ns.api::<Pod>();
    let old = pod_uids(&ns).await;
    assert_eq!(old.len(), 3);
    let (result, report) = Load::default()
        .during(&url, async {
            // The new revision's readiness path answers 404: its pods never become ready.
            let patch = json!({"spec": {"template": {"spec": {"containers": [
                {"name": "demo", "readinessProbe": {"httpGet": {"path": "/never-ready", "port": 8080}}}
            ]}}}});
            ns.api::<Deployment>().patch(APP, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
            let status = RolloutStatus::start(&ns, APP, ROLLOUT_TIMEOUT)?;
            let (ok, out) = status.finish().await?;
            let gr = wait::until("rolled back (phase Degraded)", Duration::from_secs(120), || async {
                let gr = ns.api::<GracefulRollout>().get(APP).await?;
                Ok(gr.status.clone().filter(|s| s.phase == Phase::Degraded && s.last_rollout.is_some()).map(|_| gr))
            })
            .await?;
            Ok::<_, graceful_e2e::Error>((ok, out, gr))
        })
        .await
        .expect("load run");
    let (ok, out, gr) = result.unwrap_or_else(|e| fail(&ns, format!("no rollback: {e}")));
    eprintln!("rollout status said: {}", out.trim());
    assert!(
        !ok,
        "kubectl rollout status must fail on a rolled-back revision: {out}"
    );
    assert!(out.contains("exceeded its progress deadline"), "{out}");
    let status = gr.status.unwrap();
    assert!(status.failed_revision.is_some());
    assert_eq!(status.last_rollout.unwrap().outcome, "RolledBack");
    assert_untouched(&ns, &old, "rollback").await;
    wait::pods_gone(
        &pods,
        &format!(
            "app={APP},pod-template-hash={}",
            status.failed_revision.unwrap()
        ),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| fail(&ns, format!("the failed revision's pods stayed: {e}")));
    let d = deployment(&ns).await;
    assert!(d.annotations().get(HELD).is_none());
    assert_eq!(
        users_fields(&d),
        written,
        "strategy and minReadySeconds as written"
    );
    let probe = d.spec.unwrap().template.spec.unwrap().containers[0]
        .readiness_probe
        .clone();
    assert_eq!(
        probe.and_then(|p| p.http_get).map(|h| h.path),
        Some(Some("/healthz".into())),
        "the template is the stable one again"
    );
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
async fn pausing_either_the_rollout_or_the_deployment_holds_and_resuming_completes() {
    let (ns, url) = setup("grro-pause", json!({"minServingSeconds": 3})).await;
    for by_deployment in [false, true] {
        let what = if by_deployment {
            "kubectl rollout pause"
        } else {
            "spec.paused"
        };
        let (result, report) = Load::default()
            .during(&url, async {
                let since = graceful::trigger(&ns, APP).await?;
                graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
                if by_deployment {
                    kubectl(&ns, &["rollout", "pause", &format!("deployment/{APP}")])?;
                } else {
                    graceful::patch_spec(&ns, APP, json!({"paused": true})).await?;
                }
                graceful::wait_phase(&ns, APP, Phase::Paused, Duration::from_secs(30)).await?;
                let sizes = graceful::replica_set_sizes(&ns).await?;
                tokio::time::sleep(Duration::from_secs(8)).await;
                let later = graceful::replica_set_sizes(&ns).await?;
                if by_deployment {
                    kubectl(&ns, &["rollout", "resume", &format!("deployment/{APP}")])?;
                } else {
                    graceful::patch_spec(&ns, APP, json!({"paused": false})).await?;
                }
                graceful::wait_rollout_finished(&ns, APP, since, ROLLOUT_TIMEOUT).await?;
                Ok::<_, graceful_e2e::Error>((sizes, later))
            })
            .await
            .expect("load run");
        let (sizes, later) = result.unwrap_or_else(|e| fail(&ns, format!("{what}: {e}")));
        eprintln!("{what}: sizes {sizes:?} then {later:?}; {report}");
        assert_eq!(sizes, later, "{what}: ReplicaSets were scaled while paused");
        if report.failed != 0 {
            fail(
                &ns,
                format!("{what}: failed requests across pause/resume: {report}"),
            );
        }
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
async fn deleting_the_rollout_mid_way_leaves_the_deployment_as_written_and_native_finishes() {
    let (ns, url) = setup("grro-handback", json!({"minServingSeconds": 5})).await;
    let written = users_fields(&deployment(&ns).await);
    let (result, report) = Load::default()
        .during(&url, async {
            graceful::trigger(&ns, APP).await?;
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            ns.api::<GracefulRollout>()
                .delete(APP, &DeleteParams::default())
                .await?;
            wait::until("GracefulRollout gone", Duration::from_secs(60), || async {
                Ok(ns
                    .api::<GracefulRollout>()
                    .get_opt(APP)
                    .await?
                    .is_none()
                    .then_some(()))
            })
            .await?;
            wait::rollout(&ns.api(), APP, ROLLOUT_TIMEOUT).await
        })
        .await
        .expect("load run");
    let d = result.unwrap_or_else(|e| fail(&ns, format!("hand-back mid-rollout: {e}")));
    eprintln!("GracefulRollout deleted mid-rollout, native controller finished: {report}");
    assert_eq!(
        users_fields(&d),
        written,
        "the Deployment as its user wrote it"
    );
    assert!(d.annotations().get(HELD).is_none());
    assert!(d.labels().get("graceful.dev/rollout").is_none());
    assert!(
        !owns_spec_fields(&d),
        "graceful-operator still owns spec fields"
    );
    if report.failed != 0 {
        fail(&ns, format!("failed requests: {report}"));
    }
}

/// Scales the operator down to nothing; dropping it scales it back (also when a test panics)
/// and waits until it serves again.
struct OperatorDown {
    replicas: String,
}

fn scale_operator(replicas: &str) -> graceful_e2e::Result<String> {
    cluster::kubectl_output(&[
        "-n",
        graceful::OPERATOR_NAMESPACE,
        "scale",
        "deployment",
        "-l",
        graceful::OPERATOR_SELECTOR,
        &format!("--replicas={replicas}"),
    ])
}

impl OperatorDown {
    async fn start(ns: &TestNamespace) -> Self {
        let replicas = cluster::kubectl_output(&[
            "-n",
            graceful::OPERATOR_NAMESPACE,
            "get",
            "deployment",
            "-l",
            graceful::OPERATOR_SELECTOR,
            "-o",
            "jsonpath={.items[0].spec.replicas}",
        ])
        .expect("the chart is deployed");
        scale_operator("0").expect("scale the operator down");
        let pods: kube::Api<Pod> =
            kube::Api::namespaced(ns.client.clone(), graceful::OPERATOR_NAMESPACE);
        wait::pods_gone(&pods, graceful::OPERATOR_SELECTOR, Duration::from_secs(60))
            .await
            .expect("operator pods gone");
        Self { replicas }
    }
}

impl Drop for OperatorDown {
    fn drop(&mut self) {
        let _ = scale_operator(&self.replicas);
        let _ = cluster::kubectl_output(&[
            "-n",
            graceful::OPERATOR_NAMESPACE,
            "rollout",
            "status",
            "deployment",
            "-l",
            graceful::OPERATOR_SELECTOR,
            "--timeout=120s",
        ]);
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn with_the_operator_down_a_template_change_rolls_out_natively_and_the_sidecars_still_drain()
{
    let (ns, url) = setup("grro-down", json!({})).await;
    let written = users_fields(&deployment(&ns).await);
    let down = OperatorDown::start(&ns).await;
    let (result, report) = Load::default()
        .during(&url, async {
            kubectl(&ns, &["rollout", "restart", &format!("deployment/{APP}")])?;
            let (ok, out) = RolloutStatus::start(&ns, APP, ROLLOUT_TIMEOUT)?
                .finish()
                .await?;
            Ok::<_, graceful_e2e::Error>((ok, out))
        })
        .await
        .expect("load run");
    drop(down);
    let (ok, out) = result.unwrap_or_else(|e| fail(&ns, format!("native rollout: {e}")));
    eprintln!(
        "operator down, native rollout: {report}; rollout status: {}",
        out.trim()
    );
    assert!(ok, "{out}");
    let d = deployment(&ns).await;
    assert!(
        d.annotations().get(HELD).is_none(),
        "nothing was held: the webhook was not there"
    );
    assert_eq!(users_fields(&d), written);
    if report.failed != 0 {
        fail(
            &ns,
            format!("failed requests with the operator down: {report}"),
        );
    }
    graceful::wait_phase(&ns, APP, Phase::Healthy, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| {
            fail(
                &ns,
                format!("the operator did not settle after coming back: {e}"),
            )
        });
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn abort_rolls_back_at_once_and_rollout_status_says_it_failed() {
    // New pods must serve a minute before an old one goes: the abort lands mid-rollout.
    let (ns, url) = setup("grro-abort", json!({"minServingSeconds": 60})).await;
    let written = users_fields(&deployment(&ns).await);
    let template = deployment(&ns).await.spec.unwrap().template;
    let old = pod_uids(&ns).await;
    let (result, report) = Load::default()
        .during(&url, async {
            graceful::trigger(&ns, APP).await?;
            let status = RolloutStatus::start(&ns, APP, ROLLOUT_TIMEOUT)?;
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            graceful::patch_spec(&ns, APP, json!({"abort": true})).await?;
            let (ok, out) = status.finish().await?;
            let gr = wait::until(
                "rolled back (phase Degraded)",
                Duration::from_secs(120),
                || async {
                    let gr = ns.api::<GracefulRollout>().get(APP).await?;
                    Ok(gr
                        .status
                        .clone()
                        .filter(|s| s.phase == Phase::Degraded && s.last_rollout.is_some())
                        .map(|_| gr))
                },
            )
            .await?;
            Ok::<_, graceful_e2e::Error>((ok, out, gr))
        })
        .await
        .expect("load run");
    let (ok, out, gr) = result.unwrap_or_else(|e| fail(&ns, format!("abort: {e}")));
    eprintln!("abort: {report}; rollout status said: {}", out.trim());
    assert!(
        !ok,
        "kubectl rollout status must fail on an aborted rollout: {out}"
    );
    assert_eq!(
        gr.status.unwrap().last_rollout.unwrap().outcome,
        "RolledBack"
    );
    assert_untouched(&ns, &old, "abort").await;
    let d = deployment(&ns).await;
    assert_eq!(users_fields(&d), written);
    assert_eq!(
        d.spec.unwrap().template,
        template,
        "the stable template is back"
    );
    if report.failed != 0 {
        fail(&ns, format!("failed requests across the abort: {report}"));
    }
}
