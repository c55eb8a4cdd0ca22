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

/// The caBundle of every webhook of the configuration.
async fn ca_bundles(client: &Client) -> Vec<Vec<u8>> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs.get(WEBHOOK_CONFIG).await.unwrap();
    config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.map(|b| b.0).unwrap_or_default())
        .collect()
}

/// Sets the caBundle of every webhook of the configuration.
async fn set_ca_bundle(client: &Client, bundle: &[u8]) {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = configs.get(WEBHOOK_CONFIG).await.unwrap();
    for w in config.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(k8s_openapi::ByteString(bundle.to_vec()));
    }
    configs
        .replace(WEBHOOK_CONFIG, &Default::default(), &config)
        .await
        .unwrap();
}

/// How many times each operator pod has logged serving a new webhook certificate.
fn reloads() -> std::collections::BTreeMap<String, usize> {
    use graceful_e2e::graceful::{OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
    let out = kubectl_output(&[
        "logs",
        "-n",
        OPERATOR_NAMESPACE,
        "-l",
        OPERATOR_SELECTOR,
        "--prefix",
        "--tail=-1",
    ])
    .unwrap_or_default();
    let mut seen = std::collections::BTreeMap::new();
    for line in out
        .lines()
        .filter(|l| l.contains("webhook certificate changed; serving the new one"))
    {
        if let Some(pod) = line.split(']').next() {
            *seen.entry(pod.to_owned()).or_insert(0) += 1;
        }
    }
    seen
}

/// The operator's generated webhook certificate is renewed in place: made due (its recorded end
/// a day away), it is replaced by a new CA and certificate, both replicas serve the new one, and
/// a pod admission every 200 ms meanwhile always gets its sidecar. The control, same run: while
/// the caBundle does not hold the CA of the certificate served (what serving a new certificate
/// before its CA is trusted amounts to), a pod is admitted without its sidecar.
#[tokio::test]
#[ignore = "needs the e2e cluster and the chart (make deploy)"]
async fn the_webhook_certificate_is_renewed_without_a_pod_admitted_bare() {
    use graceful_e2e::admission::AdmissionProbe;
    use graceful_e2e::graceful::OPERATOR_NAMESPACE;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    const SECRET: &str = "graceful-webhook-tls";
    let client = cluster::client().await.unwrap();
    require_webhook(&client).await;
    let ns = TestNamespace::create(&client, "cert-renewal")
        .await
        .unwrap();

    // The control: a caBundle without the served certificate's CA.
    let trusted = ca_bundles(&client).await[0].clone();
    let stranger = graceful_operator::certs::generate(&["stranger".to_owned()], Timestamp::now())
        .unwrap()
        .ca_pem;
    let mut bare = None;
    for _ in 0..3 {
        set_ca_bundle(&client, stranger.as_bytes()).await;
        let probe = AdmissionProbe::start(&ns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (answered, not_injected, _) = probe.stop().await;
        // The operator puts its CA back on its next refresh: count only a run it did not cross.
        if ca_bundles(&client).await[0] == stranger.as_bytes() {
            bare = Some((answered, not_injected));
            break;
        }
    }
    set_ca_bundle(&client, &trusted).await;
    let (answered, not_injected) = bare.expect("the operator restored the caBundle every time");
    eprintln!(
        "caBundle without the served CA: {not_injected} of {answered} pods admitted without the sidecar"
    );
    assert!(
        answered > 0 && not_injected == answered,
        "an untrusted certificate still injected: the renewal below shows nothing"
    );

    // The renewal, made due, once none is under way.
    let reloads_before = reloads();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let renewing = |s: &Secret| {
        s.data
            .as_ref()
            .is_some_and(|d| d.keys().any(|k| k.starts_with("next-")))
    };
    let before = wait::until("no renewal under way", Duration::from_secs(150), || async {
        let s = secrets.get(SECRET).await?;
        Ok((!renewing(&s)).then_some(s))
    })
    .await
    .unwrap();
    let served = |s: &Secret| s.data.as_ref().and_then(|d| d.get("tls.crt")).cloned();
    let soon = (Timestamp::now() + SignedDuration::from_hours(24)).to_string();
    secrets
        .patch(
            SECRET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                "graceful.dev/webhook-cert-not-after": soon,
            }}})),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let probe = AdmissionProbe::start(&ns);
    let renewed = wait::until(
        "the renewed certificate in the Secret",
        Duration::from_secs(240),
        || async {
            let s = secrets.get(SECRET).await?;
            let done = served(&s) != served(&before) && !renewing(&s);
            Ok(done.then_some(s))
        },
    )
    .await
    .unwrap();
    eprintln!(
        "[{:5.1}s] the Secret serves the renewed certificate",
        started.elapsed().as_secs_f64()
    );
    // Both replicas reload it within their refresh (a minute).
    wait::until(
        "both replicas serving the renewed certificate",
        Duration::from_secs(90),
        || async {
            let now = reloads();
            let reloaded = now
                .iter()
                .filter(|(pod, n)| **n > reloads_before.get(*pod).copied().unwrap_or(0))
                .count();
            Ok((reloaded >= 2).then_some(()))
        },
    )
    .await
    .unwrap();
    eprintln!(
        "[{:5.1}s] both replicas serve it",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (answered, not_injected, missed) = probe.stop().await;
    eprintln!(
        "during the renewal: {answered} pods admitted, {not_injected} without the sidecar {missed:?}"
    );
    let bundle = String::from_utf8(ca_bundles(&client).await[0].clone()).unwrap();
    let ca = |s: &Secret, key: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).trim_end().to_owned())
            .unwrap_or_default()
    };
    assert!(
        bundle.contains(&ca(&renewed, "ca.crt")),
        "the new CA is not trusted"
    );
    assert!(
        bundle.contains(&ca(&before, "ca.crt")),
        "the previous CA is no longer trusted"
    );
    assert!(
        answered >= 100,
        "too few admissions to show anything: {answered}"
    );
    assert_eq!(
        not_injected, 0,
        "pods admitted without the sidecar during the renewal: {missed:?}"
    );
}
