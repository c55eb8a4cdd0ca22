//! The app restarting inside injected pods (issue 12), on the real cluster under vegeta's load
//! through the Service: the kubelet restarts the app container, the pod stays, and the sidecar
//! keeps its port, so requests that arrive meanwhile wait for the new process instead of
//! failing. Two ways an app goes: killed on the node (a crash, the OOM killer), and a failed
//! liveness probe (the kubelet runs the preStop hook, which must not drain the pod). And the
//! preStop's reading when the API server is out of reach, for a restart and for a deletion.

use std::time::Duration;

use graceful_e2e::cluster;
use graceful_e2e::graceful::{injected_deployment, named_port_service, wait_pods_settled};
use graceful_e2e::load::{self, Load, LoadReport, Request};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{Error, node, rollout, wait};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP: &str = "web";
const CONTAINER: &str = "demo";
const SIDECAR: &str = "graceful-sidecar";

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}");
}

/// The injected demo, 3 replicas, behind its Service; `liveness` adds a probe on the app's
/// /healthz that restarts it at the first failure; `restart_wait` sets the annotation.
/// Returns the Service URL.
async fn deploy(ns: &TestNamespace, liveness: bool, restart_wait: Option<&str>) -> String {
    let mut d = injected_deployment(APP, 3, "v1");
    if let Some(wait) = restart_wait {
        let template = &mut d.spec.as_mut().unwrap().template;
        template
            .metadata
            .get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert("graceful.dev/upstream-restart-wait".into(), wait.into());
    }
    if liveness {
        let spec = d.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
        spec.containers[0].liveness_probe = Some(
            serde_json::from_value(json!({
                "httpGet": {"path": "/healthz", "port": 8080},
                "periodSeconds": 1,
                "failureThreshold": 1,
            }))
            .unwrap(),
        );
    }
    ns.apply(&d).await.unwrap();
    ns.apply(&named_port_service(APP)).await.unwrap();
    wait::rollout(&ns.api(), APP, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    wait_pods_settled(ns, APP, 3, Duration::from_secs(60))
        .await
        .unwrap();
    let ip = wait::cluster_ip(&ns.api(), APP).await.unwrap();
    wait::service_serving(&ns.api(), APP, &ip, 80, 3, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    format!("http://{ip}/")
}

/// The pod's sidecar metrics (admin port 9901 on the pod IP).
async fn sidecar_metrics(pod: &Pod) -> String {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    wait::http_get(&format!("{ip}:9901"), "/metrics")
        .await
        .unwrap()
        .1
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in the sidecar's metrics:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// The pod taking the most of the load's requests, over a second. Not the one with the most
/// connections open: Go's client reuses its most recently used idle connection first, so a
/// pod can hold a connection that carries nothing, and a restart there meets no request.
async fn busiest_pod(pods: &Api<Pod>) -> Pod {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .unwrap()
        .items;
    let requests = |metrics: String| metric(&metrics, "graceful_requests_total");
    let mut before = Vec::new();
    for pod in &list {
        before.push(requests(sidecar_metrics(pod).await));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut best = None;
    for (pod, before) in list.into_iter().zip(before) {
        let taken = requests(sidecar_metrics(&pod).await) - before;
        if best.as_ref().is_none_or(|(n, _)| taken > *n) {
            best = Some((taken, pod));
        }
    }
    let (taken, pod) = best.expect("pods");
    assert!(
        taken >= 30.0,
        "no pod takes a steady share of the load: at most {taken} requests in a second"
    );
    pod
}

/// `POST path` on the app's own port, bypassing the sidecar (the host reaches pod IPs).
async fn post_to_app(pod: &Pod, path: &str) {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let mut s = tokio::net::TcpStream::connect(format!("{ip}:8080"))
        .await
        .unwrap();
    let req = format!("POST {path} HTTP/1.0\r\nHost: {ip}\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
}

/// Fails the test naming every problem found, beside the load's report.
fn fail_on(ns: &TestNamespace, how: &str, problems: &[(bool, &str)], report: &LoadReport) {
    let found: Vec<_> = problems
        .iter()
        .filter(|(bad, _)| *bad)
        .map(|(_, w)| *w)
        .collect();
    if !found.is_empty() {
        fail(ns, format!("{how}: {}: {report}", found.join(", ")));
    }
}

/// What the restart did, seen from the load and from the pod's sidecar.
struct Seen {
    report: LoadReport,
    pod: Pod,
    restarts_before: i32,
    metrics: String,
}

impl Seen {
    fn check(&self, ns: &TestNamespace, how: &str) {
        let m = |name: &str| metric(&self.metrics, name);
        let failed = |reason: &str| {
            m(&format!(
                "graceful_restart_failed_requests_total{{reason=\"{reason}\"}}"
            ))
        };
        let pod = self.pod.metadata.name.as_deref().unwrap();
        eprintln!(
            "{how}, pod {pod}: {}\n  restarts {} -> {}; sidecar: app restarts {}, held {}, \
             longest hold {:.2}s, retried {}, failed (cut, expired, too many) {} {} {}",
            self.report,
            self.restarts_before,
            node::restart_count(&self.pod, CONTAINER),
            m("graceful_app_restarts_total"),
            m("graceful_requests_held_total"),
            m("graceful_longest_hold_seconds"),
            m("graceful_requests_retried_total"),
            failed("cut_in_flight"),
            failed("wait_expired"),
            failed("too_many_held"),
        );
        let problems = [
            (self.report.failed != 0, "requests failed"),
            // 300 req/s for the 7 s around the restart and while it lasts.
            (self.report.sent < 2000, "too little load to show anything"),
            (
                node::restart_count(&self.pod, CONTAINER) != self.restarts_before + 1,
                "the app container did not restart once",
            ),
            (
                node::restart_count(&self.pod, SIDECAR) != 0,
                "the sidecar restarted",
            ),
            (
                m("graceful_app_restarts_total") != 1.0,
                "the sidecar did not see one restart",
            ),
            (
                m("graceful_requests_held_total") < 1.0,
                "no request waited for the app",
            ),
            (
                m("graceful_drain_phase{phase=\"serving\"}") != 1.0,
                "the sidecar drained the pod",
            ),
        ];
        fail_on(ns, how, &problems, &self.report);
    }
}

/// 300 req/s of `request` from 2 s before the action until 5 s after it: at least 2100
/// requests however fast the action, over the 2000 the checks want.
fn load_around(request: Request) -> Load {
    Load {
        request,
        lead_in: Duration::from_secs(2),
        tail: Duration::from_secs(5),
        ..Load::default()
    }
}

/// Under load through the Service: `restart` on the busiest pod, then until the kubelet has
/// restarted its app and the pod is Ready again (what `restart` returns is kept until then).
async fn restart_under_load<F, Fut, T>(ns: &TestNamespace, url: &str, restart: F) -> Seen
where
    F: FnOnce(Pod) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let pods: Api<Pod> = ns.api();
    // GETs: what the sidecar may send again when the app dies under them (a POST in flight
    // then is cut and counted, as sidecar/tests/restarts.rs shows). The sidecar keeps the
    // client's connection open throughout, so the client has nothing to retry itself.
    let load = load_around(Request::Get);
    // Each request takes 20 ms at the app, so about 6 are in flight at once and the load
    // spreads over most of its connections, each pinned to a pod: every pod holding one takes
    // requests all along, instead of the one connection a fast app would keep reusing.
    let url = format!("{url}slow?ms=20");
    let (outcome, report) = load
        .during(&url, async {
            let victim = busiest_pod(&pods).await;
            let name = victim.metadata.name.clone().unwrap();
            let before = node::restart_count(&victim, CONTAINER);
            // Whatever the restart returns (a fault it keeps up) lasts until the pod is back.
            let _kept = restart(victim).await;
            let pod =
                node::restarted_and_ready(&pods, &name, CONTAINER, before, Duration::from_secs(60))
                    .await?;
            Ok::<_, Error>((pod, before))
        })
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    let (pod, restarts_before) = outcome.unwrap_or_else(|e| fail(ns, e.to_string()));
    let metrics = sidecar_metrics(&pod).await;
    Seen {
        report,
        pod,
        restarts_before,
        metrics,
    }
}

async fn kill_app(victim: Pod) {
    let pids = node::kill_container(&victim, CONTAINER).unwrap();
    eprintln!("killed {pids:?} (SIGKILL) on the node");
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn an_app_killed_on_the_node_comes_back_without_a_failed_request() {
    let client = cluster::client().await.unwrap();
    // The same kill with waiting turned off, same run: what the pod's clients met before.
    let ns = TestNamespace::create(&client, "app-kill-nowait")
        .await
        .unwrap();
    let url = deploy(&ns, false, Some("0s")).await;
    let without = restart_under_load(&ns, &url, kill_app).await;
    eprintln!(
        "without waiting (upstream-restart-wait 0s): {}",
        without.report
    );
    if without.report.failed == 0 {
        fail(
            &ns,
            format!(
                "without waiting the kill failed nothing, so this test shows nothing: {}",
                without.report
            ),
        );
    }
    drop(ns);

    let ns = TestNamespace::create(&client, "app-kill").await.unwrap();
    let url = deploy(&ns, false, None).await;
    let seen = restart_under_load(&ns, &url, kill_app).await;
    seen.check(&ns, "app killed on the node");
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn a_liveness_probe_restart_fails_nothing_and_does_not_drain_the_pod() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "app-liveness")
        .await
        .unwrap();
    let url = deploy(&ns, true, None).await;
    let seen = restart_under_load(&ns, &url, |victim| async move {
        // From now on the app's /healthz fails: the kubelet runs its preStop, then restarts it.
        post_to_app(&victim, "/healthz/fail").await;
    })
    .await;
    seen.check(&ns, "liveness probe restart");
}

/// preStop with the API server out of the sidecar's reach (an iptables rule on the node drops
/// the pod's packets to it): no EndpointSlice list comes, so the sidecar cannot tell this
/// liveness restart from a deletion and drains, which loses no request. Once the app is back
/// the drained sidecar exits, the kubelet starts it again, and the pod is Ready: not left
/// NotReady, as a sidecar that waited for a SIGTERM that never comes would leave it.
#[tokio::test]
#[ignore = "needs the e2e cluster, root for iptables, and the chart (make e2e)"]
async fn a_liveness_restart_with_the_api_server_unreachable_drains_and_the_pod_serves_again() {
    let client = cluster::client().await.unwrap();
    let port = cluster::apiserver_port(&client).await.unwrap().to_string();
    let ns = TestNamespace::create(&client, "app-liveness-cut")
        .await
        .unwrap();
    let url = deploy(&ns, true, None).await;
    let seen = restart_under_load(&ns, &url, |victim| async move {
        let ip = victim
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap();
        let cut = node::IptablesRule::insert(&[
            "INPUT", "-s", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP",
        ])
        .unwrap();
        post_to_app(&victim, "/healthz/fail").await;
        cut
    })
    .await;
    let sidecar_restarts = node::restart_count(&seen.pod, SIDECAR);
    let pod = seen.pod.metadata.name.as_deref().unwrap();
    eprintln!(
        "liveness restart, API server unreachable, pod {pod}: {}; app restarts {} -> {}, sidecar restarts {sidecar_restarts}",
        seen.report,
        seen.restarts_before,
        node::restart_count(&seen.pod, CONTAINER),
    );
    let problems = [
        (seen.report.failed != 0, "requests failed"),
        (seen.report.sent < 2000, "too little load to show anything"),
        (
            node::restart_count(&seen.pod, CONTAINER) != seen.restarts_before + 1,
            "the app container did not restart once",
        ),
        // The drain ran (the API could not tell) and ended in the sidecar's own restart.
        (
            sidecar_restarts != 1,
            "the sidecar did not restart once after its drain",
        ),
        (
            metric(&seen.metrics, "graceful_drain_phase{phase=\"serving\"}") != 1.0,
            "the restarted sidecar is not serving",
        ),
    ];
    fail_on(
        &ns,
        "liveness restart, API server unreachable",
        &problems,
        &seen.report,
    );
}

/// Under load through the Service: deletes one of the app's pods (the busiest with a sidecar,
/// else the first), with its packets to the API server dropped while `cut`, until it is gone.
async fn delete_under_load(ns: &TestNamespace, url: &str, injected: bool, cut: bool) -> LoadReport {
    let client = cluster::client().await.unwrap();
    let port = cluster::apiserver_port(&client).await.unwrap().to_string();
    let pods: Api<Pod> = ns.api();
    // POSTs, which no client sends again: a deletion must be drained, not retried. Each takes
    // 20 ms at the app, so some are always in flight at the pod.
    let load = load_around(Request::EmptyPost);
    let url = format!("{url}slow?ms=20");
    let (outcome, report) = load
        .during(&url, async {
            let victim = match injected {
                true => busiest_pod(&pods).await,
                false => pods
                    .list(&ListParams::default().labels(&format!("app={APP}")))
                    .await?
                    .items
                    .remove(0),
            };
            let name = victim.metadata.name.clone().unwrap();
            let ip = victim
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap();
            let _cut = cut
                .then(|| {
                    node::IptablesRule::insert(&[
                        "INPUT", "-s", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP",
                    ])
                })
                .transpose()?;
            pods.delete(&name, &Default::default()).await?;
            wait::pod_deleted(&pods, &name, Duration::from_secs(90)).await?;
            eprintln!("pod {name} ({ip}) deleted and gone");
            Ok::<_, Error>(())
        })
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    outcome.unwrap_or_else(|e| fail(ns, e.to_string()));
    load::check_sent("load through the deletion", &load, &report);
    report
}

/// A deletion with the API server out of the sidecar's reach (an iptables rule on the node drops
/// the pod's packets to it): no EndpointSlice list comes within 2 s, so the sidecar drains, as a
/// deletion must, and waits out `--deregister-delay` instead of reading the slices; the pod goes
/// and no request fails. The control, same run: the same deletion in the app without graceful
/// fails requests.
#[tokio::test]
#[ignore = "needs the e2e cluster, root for iptables, and the chart (make e2e)"]
async fn a_deletion_with_the_api_server_unreachable_drains_without_a_failed_request() {
    let client = cluster::client().await.unwrap();
    let bare = TestNamespace::create(&client, "deletion-bare")
        .await
        .unwrap();
    let ip = rollout::deploy_plain(&bare, APP)
        .await
        .unwrap_or_else(|e| fail(&bare, e.to_string()));
    let without = delete_under_load(&bare, &format!("http://{ip}/"), false, false).await;
    eprintln!("deletion without graceful: {without}");
    if without.failed == 0 {
        fail(
            &bare,
            format!(
                "without graceful the deletion failed nothing, so this test shows nothing: {without}"
            ),
        );
    }
    drop(bare);

    let ns = TestNamespace::create(&client, "deletion-cut")
        .await
        .unwrap();
    let url = deploy(&ns, false, None).await;
    let report = delete_under_load(&ns, &url, true, true).await;
    eprintln!("deletion, API server unreachable: {report}");
    fail_on(
        &ns,
        "deletion, API server unreachable",
        &[(report.failed != 0, "requests failed")],
        &report,
    );
}
