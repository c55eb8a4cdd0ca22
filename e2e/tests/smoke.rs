//! Smoke test of the e2e cluster itself (issue 3): what every later scenario takes for granted.
//! Needs the cluster and the images: `make e2e` (or e2e/run.sh after make cluster-up images).

use std::time::{Duration, Instant};

use graceful_e2e::cluster::{self, kubectl_output};
use graceful_e2e::demo;
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::wait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const ROLLOUT: Duration = Duration::from_secs(120);
/// The image of KWOK's fake pods (e2e/scripts/kwok.sh), never pulled.
const KWOK_FAKE_IMAGE: &str = "localhost/kwok-fake:none";

async fn demo_behind_service(ns: &TestNamespace, version: &str) -> String {
    ns.apply(&demo::deployment("demo", 3, version))
        .await
        .unwrap();
    ns.apply(&demo::service("demo")).await.unwrap();
    wait::rollout(&ns.api(), "demo", ROLLOUT).await.unwrap();
    let ip = wait::cluster_ip(&ns.api(), "demo").await.unwrap();
    wait::service_serving(&ns.api(), "demo", &ip, 80, 3, Duration::from_secs(60))
        .await
        .unwrap();
    ip
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn cluster_ip_answers_from_the_host_and_from_a_pod() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "smoke-svc").await.unwrap();
    let ip = demo_behind_service(&ns, "smoke-v1").await;

    // From the host: the body is the demo's version text, and 300 requests over keep-alive
    // from vegeta all succeed.
    let (status, body) = wait::http_get(&format!("{ip}:80"), "/").await.unwrap();
    assert!(status.contains(" 200"), "{status}");
    assert_eq!(body, "smoke-v1\n");
    let load = Load {
        rate: 100,
        lead_in: Duration::ZERO,
        tail: Duration::ZERO,
        ..Load::default()
    };
    let ((), report) = load
        .during(
            &format!("http://{ip}/"),
            tokio::time::sleep(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    eprintln!("host -> ClusterIP: {report}");
    assert!(report.sent >= 200, "vegeta sent too few requests: {report}");
    assert_eq!(report.failed, 0, "{report}");

    // From a pod: hey (packed by make images) against the same ClusterIP; its report through
    // `kubectl logs`.
    let url = format!("http://{ip}/");
    ns.apply(&demo::pod(
        "hey",
        &demo::image("hey"),
        &["-n", "100", "-c", "2", &url],
    ))
    .await
    .unwrap();
    let phase = wait::pod_finished(&ns.api(), "hey", Duration::from_secs(60))
        .await
        .unwrap();
    let logs = kubectl_output(&["logs", "hey", "-n", &ns.name]).unwrap();
    eprintln!("hey in a pod:\n{logs}");
    assert_eq!(phase, "Succeeded");
    assert!(
        logs.contains("[200]\t100 responses"),
        "not 100 answers of 200: {logs}"
    );
    assert!(
        !logs.contains("Error distribution"),
        "hey saw errors: {logs}"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn kubectl_rollout_restart_logs_and_exec_work() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "smoke-kubectl")
        .await
        .unwrap();
    demo_behind_service(&ns, "smoke-v1").await;
    let pods: kube::Api<Pod> = ns.api();
    let before: Vec<String> = pods
        .list(&ListParams::default().labels("app=demo"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();

    kubectl_output(&["rollout", "restart", "deployment/demo", "-n", &ns.name]).unwrap();
    let status = kubectl_output(&[
        "rollout",
        "status",
        "deployment/demo",
        "-n",
        &ns.name,
        "--timeout=120s",
    ])
    .unwrap();
    assert!(status.contains("successfully rolled out"), "{status}");
    let d = ns.api::<Deployment>().get("demo").await.unwrap();
    assert!(wait::rollout_complete(&d));
    let after = wait::until("old pods gone", Duration::from_secs(60), || async {
        let names: Vec<String> = pods
            .list(&ListParams::default().labels("app=demo"))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        Ok((names.len() == 3 && names.iter().all(|n| !before.contains(n))).then_some(names))
    })
    .await
    .unwrap();

    // logs: the demo's startup line; exec: a second process in the running container.
    let logs = kubectl_output(&["logs", &after[0], "-n", &ns.name]).unwrap();
    assert!(logs.contains("listening on"), "{logs}");
    let help = kubectl_output(&[
        "exec",
        &after[0],
        "-n",
        &ns.name,
        "--",
        "/graceful-demo",
        "--help",
    ])
    .unwrap();
    assert!(help.contains("graceful-demo"), "{help}");
}

/// A host-side server the kubelet calls as the preStop hook: it reports each call and answers
/// `/fast/...` at once but never answers `/hold/...`.
async fn hook_server(ip: &str) -> (u16, mpsc::UnboundedReceiver<(String, Instant)>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send((path.clone(), Instant::now()));
                if path.starts_with("/fast/") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                } else {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
            });
        }
    });
    (port, rx)
}

fn pod_with_hook(name: &str, host: &str, port: u16, path: &str, grace: i64) -> Pod {
    let mut container = demo::container("hook");
    container["lifecycle"] =
        json!({"preStop": {"httpGet": {"host": host, "port": port, "path": path}}});
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": grace, "containers": [container]},
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn prestop_hook_runs_and_grace_period_is_honoured() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "smoke-prestop")
        .await
        .unwrap();
    let node_ip = cluster::node_ip(&client).await.unwrap();
    let (port, mut calls) = hook_server(&node_ip).await;
    // Long enough that a loaded machine cannot make the fast pod look like a grace-period wait.
    const GRACE: i64 = 10;
    let pods: kube::Api<Pod> = ns.api();
    ns.apply(&pod_with_hook("hold", &node_ip, port, "/hold/hold", GRACE))
        .await
        .unwrap();
    ns.apply(&pod_with_hook("fast", &node_ip, port, "/fast/fast", GRACE))
        .await
        .unwrap();
    for name in ["hold", "fast"] {
        wait::pod_ready(&pods, name, Duration::from_secs(60))
            .await
            .unwrap();
    }

    let deleted = Instant::now();
    for name in ["hold", "fast"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let (fast_gone, hold_gone) = tokio::join!(
        async {
            wait::pod_deleted(&pods, "fast", Duration::from_secs(60))
                .await
                .unwrap();
            deleted.elapsed()
        },
        async {
            wait::pod_deleted(&pods, "hold", Duration::from_secs(60))
                .await
                .unwrap();
            deleted.elapsed()
        }
    );
    let mut seen = Vec::new();
    while let Ok((path, at)) = calls.try_recv() {
        seen.push((path, at.duration_since(deleted)));
    }
    eprintln!(
        "hook calls {seen:?}; fast pod gone after {fast_gone:?}, hold pod after {hold_gone:?}"
    );

    // Each hook ran once, soon after the delete (the kubelet takes ~2 s to act on it here).
    for path in ["/fast/fast", "/hold/hold"] {
        let calls: Vec<_> = seen.iter().filter(|(p, _)| p == path).collect();
        assert_eq!(calls.len(), 1, "{path}: {seen:?}");
        assert!(
            calls[0].1 < Duration::from_secs(8),
            "{path} called late: {seen:?}"
        );
    }
    // A hook that answers lets the pod go at once; one that never answers holds it for the
    // whole grace period, and not much longer (the kubelet adds 2s after a hook overran).
    let grace = Duration::from_secs(GRACE as u64);
    let hold_hook = seen.iter().find(|(p, _)| p == "/hold/hold").unwrap().1;
    assert!(fast_gone < grace, "fast pod took {fast_gone:?}");
    assert!(
        hold_gone >= hold_hook + grace,
        "hold pod gone {hold_gone:?} after the delete, its hook ran at {hold_hook:?}: before its grace period ended"
    );
    assert!(
        hold_gone < hold_hook + grace + Duration::from_secs(6),
        "hold pod took {hold_gone:?}"
    );
}

/// Every pod of the cluster runs an image from the cluster's registry, pulled by the node as a
/// user's cluster pulls it (no pod says imagePullPolicy Never); the pods that run graceful's
/// own images (operator and sidecars) are among them, and the node holds their registry names.
#[tokio::test]
#[ignore = "needs the e2e cluster with graceful deployed (make e2e)"]
async fn every_pod_runs_an_image_pulled_from_the_registry() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "smoke-images")
        .await
        .unwrap();
    // An injected pod, so the sidecar's image is among those checked.
    let mut injected = graceful_e2e::graceful::injected_deployment("injected", 1, "images");
    injected
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .termination_grace_period_seconds = Some(40);
    ns.apply(&injected).await.unwrap();
    wait::rollout(&ns.api(), "injected", ROLLOUT).await.unwrap();
    let pods: kube::Api<Pod> = kube::Api::all(client.clone());
    let mut seen = std::collections::BTreeSet::new();
    for pod in pods.list(&ListParams::default()).await.unwrap().items {
        let spec = pod.spec.unwrap_or_default();
        // KWOK's fake pods (make scale) run nothing: their image is a name no node pulls.
        if spec
            .containers
            .iter()
            .any(|c| c.image.as_deref() == Some(KWOK_FAKE_IMAGE))
        {
            continue;
        }
        for c in spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .chain(spec.containers)
        {
            let image = c.image.unwrap_or_default();
            assert!(
                image.starts_with(&format!("{}/", demo::REGISTRY)),
                "pod {:?} runs {image}, not from {}",
                pod.metadata.name,
                demo::REGISTRY
            );
            assert_ne!(
                c.image_pull_policy.as_deref(),
                Some("Never"),
                "pod {:?}: {image} with imagePullPolicy Never",
                pod.metadata.name
            );
            seen.insert(image);
        }
    }
    eprintln!("images the cluster's pods run: {seen:?}");
    for name in ["graceful-operator", "graceful-sidecar", "graceful-demo"] {
        assert!(
            seen.iter()
                .any(|i| i.contains(&format!("/{name}:")) || i.contains(&format!("/{name}@"))),
            "no pod runs {name}: {seen:?}"
        );
    }
    let node_images = cluster::script("cluster-status.sh").output().unwrap();
    let text = String::from_utf8_lossy(&node_images.stdout);
    eprintln!("{text}");
    for name in ["graceful-operator", "graceful-sidecar", "graceful-pause"] {
        assert!(
            text.contains(&format!("{}/{name}:", demo::REGISTRY)),
            "the node does not hold {name} under the registry's name"
        );
    }
}
