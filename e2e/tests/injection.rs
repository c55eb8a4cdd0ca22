//! Sidecar injection on the real cluster (issue 5): with the chart installed (make deploy),
//! `kubectl annotate deployment demo graceful.dev/inject=true` is all it takes: new pods carry a
//! ready sidecar, and plain `kubectl rollout restart`s under steady vegeta load drop nothing, next
//! to the baseline (the same demo without the annotation) measured in the same run.

use std::time::{Duration, Instant};

use graceful_e2e::cluster::{self, kubectl_output};
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{demo, rollout, wait};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use serde_json::json;

const ROLLOUTS: usize = 5;
const SIDECAR: &str = "graceful-sidecar";
/// The configuration `make deploy` installs (release graceful).
const WEBHOOK_CONFIG: &str = "graceful-sidecar-injector";

/// Fails with the fix when the chart is not installed: this test never skips.
async fn require_webhook(client: &Client) {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs
        .get_opt(WEBHOOK_CONFIG)
        .await
        .unwrap()
        .unwrap_or_else(|| {
            panic!("MutatingWebhookConfiguration {WEBHOOK_CONFIG} missing: run `make deploy` first")
        });
    let has_bundle = config
        .webhooks
        .unwrap_or_default()
        .iter()
        .all(|w| w.client_config.ca_bundle.is_some());
    assert!(
        has_bundle,
        "{WEBHOOK_CONFIG} has no caBundle yet: is the operator running? (make deploy)"
    );
}

fn sidecar_ready(pod: &Pod) -> bool {
    let injected = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == SIDECAR && c.restart_policy.as_deref() == Some("Always"))
        });
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .is_some_and(|s| s.iter().any(|c| c.name == SIDECAR && c.ready));
    injected && ready
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn annotated_demo_rolls_out_without_dropping_requests() {
    let client = cluster::client().await.unwrap();
    require_webhook(&client).await;
    let load = Load::default();

    // Baseline, same run: the plain demo, default RollingUpdate.
    let base_ns = TestNamespace::create(&client, "inject-base").await.unwrap();
    let baseline = rollout::baseline(&base_ns, &load, ROLLOUTS).await.unwrap();
    drop(base_ns);

    let ns = TestNamespace::create(&client, "inject").await.unwrap();
    ns.apply(&demo::deployment("demo", 3, "v1")).await.unwrap();
    ns.apply(&graceful_e2e::graceful::named_port_service("demo"))
        .await
        .unwrap();
    wait::rollout(&ns.api(), "demo", Duration::from_secs(120))
        .await
        .unwrap();

    // What a user types.
    kubectl_output(&[
        "annotate",
        "deployment/demo",
        "graceful.dev/inject=true",
        "-n",
        &ns.name,
    ])
    .unwrap();
    kubectl_output(&["rollout", "restart", "deployment/demo", "-n", &ns.name]).unwrap();
    let pods: Api<Pod> = ns.api();
    let injected = wait::until(
        "3 demo pods with a ready sidecar",
        Duration::from_secs(180),
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=demo"))
                .await?
                .items;
            let live: Vec<Pod> = list
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            Ok((live.len() == 3 && live.iter().all(sidecar_ready)).then_some(live))
        },
    )
    .await
    .unwrap();
    let spec = injected[0].spec.as_ref().unwrap();
    eprintln!(
        "injected: init containers {:?}, terminationGracePeriodSeconds {:?}",
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        spec.termination_grace_period_seconds
    );
    wait::rollout(&ns.api(), "demo", Duration::from_secs(180))
        .await
        .unwrap();

    // The plain pods this restart replaced died at once: measure only after they are gone and
    // the Service serves the injected pods from this host (kube-proxy lags the EndpointSlices).
    graceful_e2e::graceful::wait_pods_settled(&ns, "demo", 3, Duration::from_secs(120))
        .await
        .unwrap();
    let ip = wait::cluster_ip(&ns.api(), "demo").await.unwrap();
    wait::service_serving(&ns.api(), "demo", &ip, 80, 3, Duration::from_secs(60))
        .await
        .unwrap();
    let url = format!("http://{ip}/");
    let graceful =
        rollout::rollouts_under_load(&ns, "demo", &url, &load, ROLLOUTS, Duration::from_secs(240))
            .await
            .unwrap();

    eprintln!("baseline (no sidecar):\n{baseline}");
    eprintln!("injected (graceful-sidecar):\n{graceful}");
    assert!(baseline.total().sent > 0 && graceful.total().sent > 0);
    // Every rollout replaced its pods with injected ones (no pod escaped the webhook).
    let after = pods
        .list(&ListParams::default().labels("app=demo"))
        .await
        .unwrap()
        .items;
    assert!(
        after
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .all(sidecar_ready)
    );
    let total = graceful.total();
    eprintln!(
        "failed: baseline {} of {}, injected {} of {}",
        baseline.total().failed,
        baseline.total().sent,
        total.failed,
        total.sent
    );
    assert_eq!(
        total.failed, 0,
        "injected rollouts dropped requests:\n{graceful}"
    );
}

/// Pod `name` from the demo container, optionally annotated for injection, behind a Service.
fn idle_pod(name: &str, inject: bool, prestop_sleep: Option<i64>) -> Pod {
    let mut container = demo::container("idle");
    if let Some(seconds) = prestop_sleep {
        container["lifecycle"] = json!({"preStop": {"sleep": {"seconds": seconds}}});
    }
    let annotations = if inject {
        json!({"graceful.dev/inject": "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": {"terminationGracePeriodSeconds": 60, "containers": [container]},
    }))
    .unwrap()
}

/// From `delete` to the pod's end, and from the EndpointSlice change (no slice lists it ready
/// any more) to the pod's end.
async fn time_to_terminate(ns: &TestNamespace, pod: Pod) -> (Duration, Duration) {
    let name = pod.metadata.name.clone().unwrap();
    ns.apply(&pod).await.unwrap();
    ns.apply(&graceful_e2e::graceful::named_port_service(&name))
        .await
        .unwrap();
    let pods: Api<Pod> = ns.api();
    wait::pod_ready(&pods, &name, Duration::from_secs(90))
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = ns.api();
    let selector = format!("kubernetes.io/service-name={name}");
    let listed_ready = || async {
        let list = slices
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap();
        list.items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .any(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
    };
    // Let the EndpointSlice list it ready, as in a live Service, and let it live a few seconds
    // as an idle pod does: the kubelet acts on the deletion of a pod it started a moment ago
    // about 2 s late (measured: preStop called 2.1 s after the delete of a pod Ready 0.5 s
    // before, 0.2 s after the delete of one Ready 6 s before), with or without graceful.
    wait::until("the pod listed ready", Duration::from_secs(30), || async {
        Ok(listed_ready().await.then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = Instant::now();
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    // Polled back to back (a list takes a few ms): the change is seen at most one list late,
    // which shortens the time measured from it by that much.
    let mut polls = 0;
    while listed_ready().await {
        polls += 1;
        assert!(
            polls < 3000,
            "the EndpointSlice still lists the deleted pod"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deregistered = Instant::now();
    wait::pod_deleted(&pods, &name, Duration::from_secs(90))
        .await
        .unwrap();
    (started.elapsed(), deregistered.elapsed())
}

/// Closing note of the issue: an idle injected pod stops in the time its deregistration takes,
/// not in a fixed sleep.
#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn idle_injected_pod_terminates_faster_than_a_prestop_sleep_15() {
    let client = cluster::client().await.unwrap();
    require_webhook(&client).await;
    let ns = TestNamespace::create(&client, "inject-idle").await.unwrap();
    let drains = graceful_e2e::drains::DrainWatch::start(&ns);
    let (injected, injected_after_slices) =
        time_to_terminate(&ns, idle_pod("injected", true, None)).await;
    let (sleeping, _) = time_to_terminate(&ns, idle_pod("sleep15", false, Some(15))).await;
    eprintln!(
        "idle pod termination: injected {:.1}s after delete ({:.1}s after the EndpointSlice \
         change), preStop sleep 15 {:.1}s",
        injected.as_secs_f64(),
        injected_after_slices.as_secs_f64(),
        sleeping.as_secs_f64()
    );
    for (pod, summary) in drains.summaries() {
        eprintln!("drain {pod}: {summary}");
    }
    assert!(
        sleeping >= Duration::from_secs(15),
        "the sleep hook did not run: {sleeping:?}"
    );
    // The drain of an idle pod: its quiet window (1s) after the change, then the kubelet
    // stops the app and the sidecar and the API deletes the pod.
    assert!(
        injected_after_slices <= Duration::from_secs(3),
        "injected idle pod took {injected_after_slices:?} after the EndpointSlice change"
    );
}
