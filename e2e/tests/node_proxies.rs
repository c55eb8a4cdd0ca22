//! Through several nodes' kube-proxies (issue 25): three more kube-proxy instances, the
//! cluster's own binary, each in a network namespace of its own with its own clients
//! (e2e/scripts/node-proxies.sh); the last hears from the apiserver 10 s late, so it keeps
//! sending new connections to a pod for 10 s after the others let it go, as a busy node's
//! kube-proxy does. The clients of the late node open a new connection per request (each a new
//! routing decision); the others keep theirs alive.
//!
//! Four Deployments side by side in one run, each under the same clients: injected (5
//! `kubectl rollout restart`s), injected and managed by a GracefulRollout (5 rollouts), and, as
//! controls with 2 restarts each, the plain demo and the demo injected with a fixed quiet window
//! of 300 ms (which does not widen to the late node's sparser share after deregistration).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use graceful_e2e::cluster;
use graceful_e2e::drains::DrainWatch;
use graceful_e2e::graceful::{
    self, graceful_rollout, injected_deployment, injected_with, named_port_service,
};
use graceful_e2e::kube_proxy::{self, RouteWatch};
use graceful_e2e::load::{Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::node_proxies::{NodeNs, NodeProxies};
use graceful_e2e::{demo, wait};
use graceful_operator::crd::Phase;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::SignedDuration;
use serde_json::json;

const NODES: usize = 3;
const RESTARTS: usize = 5;
/// Restarts of the control: enough to show its count, kept short for CI's time.
const COMPARISON_RESTARTS: usize = 2;
const REPLICAS: i32 = 3;
/// Each client's rate, per Deployment and node.
const RATE: u32 = 20;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);
/// What node-proxies.sh's last kube-proxy lags by; the test checks it did.
const LAG: Duration = Duration::from_secs(10);
/// The longest quiet window a drain derives from the traffic.
const WINDOW_CAP: Duration = Duration::from_secs(10);

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

/// A node's client: keep-alive on the prompt nodes, a new connection per request on the late one.
fn client(node: &NodeNs) -> Load {
    Load {
        rate: RATE,
        // Room for the requests a gone pod holds until they time out (5 s at 20 req/s: 100): a
        // client that waits for a free connection would send less than asked exactly where it
        // matters.
        connections: 200,
        keepalive: node.lag_seconds == 0,
        netns: Some(node.netns.clone()),
        request_timeout: Duration::from_secs(5),
        lead_in: Duration::ZERO,
        max_duration: Duration::from_secs(600),
        ..Load::default()
    }
}

/// `action` under one client per node, all started before it and stopped after it (each
/// client's tail after its end).
async fn under_clients<F: Future>(
    nodes: &[NodeNs],
    url: &str,
    action: F,
) -> (F::Output, Vec<(String, graceful_e2e::Result<LoadReport>)>) {
    let (done, until) = tokio::sync::watch::channel(false);
    let clients = futures::future::join_all(nodes.iter().map(|node| {
        let mut until = until.clone();
        async move {
            let ended = async move {
                let _ = until.wait_for(|d| *d).await;
            };
            let report = client(node).during(url, ended).await.map(|(_, r)| r);
            (node.netns.clone(), report)
        }
    }));
    let act = async {
        // Every client warm before the first restart.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let output = action.await;
        let _ = done.send(true);
        output
    };
    tokio::join!(act, clients)
}

/// Every node's kube-proxy sends `name`'s connections where the host's does, to its
/// `REPLICAS` pods: the same addresses, not only as many (the late one lists an old pod for 10 s
/// after the others swapped it for a new one).
async fn routes_settled(nodes: &[NodeNs], ns: &TestNamespace, name: &str) -> Result<(), String> {
    let service = format!("{}/{name}", ns.name);
    wait::until(
        &format!("every kube-proxy to send {service} to the same {REPLICAS} pods"),
        // The late node applies the last change LAG after the others.
        LAG * 3,
        || async {
            let host = kube_proxy::endpoints(&kube_proxy::nat_rules(None)?, &service);
            if host.len() != REPLICAS as usize {
                return Ok(None);
            }
            for node in nodes {
                let rules = kube_proxy::nat_rules(Some(&node.netns))?;
                if kube_proxy::endpoints(&rules, &service) != host {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .map_err(|e| format!("{name}: {e}"))
}

/// `count` restarts of `name`, one after the other (`managed`: each a GracefulRollout's
/// rollout), each waiting until the old pods are gone and every kube-proxy routes to the new
/// ones only, so each pod's removal is seen by every kube-proxy.
async fn restarts(
    ns: &TestNamespace,
    nodes: &[NodeNs],
    name: &str,
    count: usize,
    managed: bool,
) -> Result<(), String> {
    for i in 1..=count {
        let what = |e: graceful_e2e::Error| format!("{name} restart {i}: {e}");
        graceful::restart(ns, name, managed, ROLLOUT_TIMEOUT)
            .await
            .map_err(what)?;
        graceful::wait_pods_settled(ns, name, REPLICAS as usize, ROLLOUT_TIMEOUT)
            .await
            .map_err(what)?;
        routes_settled(nodes, ns, name).await?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart, and root for network namespaces (make e2e)"]
async fn through_several_kube_proxies_one_10s_late_nothing_is_lost_and_both_controls_lose() {
    let relay = PathBuf::from(env!("CARGO_BIN_EXE_lag_relay"));
    let proxies = tokio::task::spawn_blocking(move || NodeProxies::up(NODES, Some(&relay)))
        .await
        .unwrap()
        .unwrap();
    let nodes = proxies.nodes.clone();
    assert_eq!(
        nodes
            .iter()
            .filter(|n| n.lag_seconds == LAG.as_secs())
            .count(),
        1,
        "one late node of {nodes:?}"
    );
    let client_ = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client_, "node-proxies")
        .await
        .unwrap();
    let drains = DrainWatch::start(&ns);

    for (d, s) in [
        (
            injected_deployment("web", REPLICAS, "v1"),
            named_port_service("web"),
        ),
        (
            injected_deployment("mixed", REPLICAS, "v1"),
            named_port_service("mixed"),
        ),
        (
            demo::deployment("plain", REPLICAS, "v1"),
            demo::service("plain"),
        ),
        (
            injected_with("fixed", REPLICAS, &[("graceful.dev/quiet-window", "300ms")]),
            named_port_service("fixed"),
        ),
    ] {
        ns.apply(&s).await.unwrap();
        ns.apply(&d).await.unwrap();
    }
    let api = ns.api::<Deployment>();
    for name in ["web", "mixed", "plain", "fixed"] {
        wait::rollout(&api, name, ROLLOUT_TIMEOUT)
            .await
            .unwrap_or_else(|e| fail(&ns, e.to_string()));
    }
    ns.apply(&graceful_rollout("mixed", json!({"minServingSeconds": 2})))
        .await
        .unwrap();
    graceful::wait_phase(&ns, "mixed", Phase::Healthy, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let mut urls = Vec::new();
    for name in ["web", "mixed", "plain", "fixed"] {
        routes_settled(&nodes, &ns, name)
            .await
            .unwrap_or_else(|e| fail(&ns, e));
        let ip = wait::cluster_ip(&ns.api(), name).await.unwrap();
        urls.push(format!("http://{ip}:80/"));
    }

    // When each kube-proxy let each injected pod go.
    let services = [format!("{}/web", ns.name), format!("{}/mixed", ns.name)];
    let services: Vec<&str> = services.iter().map(String::as_str).collect();
    let mut watches = vec![("host".to_owned(), RouteWatch::start_in(None, &services))];
    for node in &nodes {
        watches.push((
            node.netns.clone(),
            RouteWatch::start_in(Some(&node.netns), &services),
        ));
    }

    let ((web_done, web), (mixed_done, mixed), (plain_done, plain), (fixed_done, fixed)) = tokio::join!(
        under_clients(
            &nodes,
            &urls[0],
            restarts(&ns, &nodes, "web", RESTARTS, false)
        ),
        under_clients(
            &nodes,
            &urls[1],
            restarts(&ns, &nodes, "mixed", RESTARTS, true)
        ),
        under_clients(
            &nodes,
            &urls[2],
            restarts(&ns, &nodes, "plain", COMPARISON_RESTARTS, false)
        ),
        under_clients(
            &nodes,
            &urls[3],
            restarts(&ns, &nodes, "fixed", COMPARISON_RESTARTS, false)
        ),
    );
    for done in [web_done, mixed_done, plain_done, fixed_done] {
        done.unwrap_or_else(|e| fail(&ns, e));
    }

    // Per client: what it sent against rate x time, and what failed; every kube-proxy's routes
    // over the run; every drain. All printed before anything is asserted.
    let changes: Vec<_> = watches
        .iter()
        .map(|(n, w)| (n.clone(), w.changes()))
        .collect();
    let mut routes = String::new();
    for (netns, c) in &changes {
        routes += &format!("\nthe kube-proxy of {netns} sent the injected pods' connections to:");
        for (at, set) in c {
            routes += &format!("\n  {at} {set:?}");
        }
    }
    let mut report = String::new();
    let mut problems = Vec::new();
    let mut lost = |who: &str, clients: Vec<(String, graceful_e2e::Result<LoadReport>)>| {
        let mut lost = 0;
        for (netns, r) in clients {
            let r = r.unwrap_or_else(|e| fail(&ns, format!("{who} from {netns}: {e}")));
            let expected = f64::from(RATE) * r.duration.as_secs_f64();
            report += &format!("\n{who} from {netns}: {r}");
            if (r.sent as f64) < expected * 0.9 {
                problems.push(format!(
                    "{who} from {netns} sent {} of {expected:.0}",
                    r.sent
                ));
            }
            lost += r.failed;
        }
        lost
    };
    let web_lost = lost("web, 5 restarts", web);
    let mixed_lost = lost("mixed, 5 GracefulRollout rollouts", mixed);
    let plain_lost = lost("plain, 2 restarts", plain);
    let fixed_lost = lost("fixed (quiet-window: 300ms), 2 restarts", fixed);

    // Each injected pod's drain against when each kube-proxy let it go.
    let mut drains_text = String::new();
    let mut late_by = Vec::new();
    let mut after_slowest = Vec::new();
    let mut drained = 0;
    for (pod, d) in drains.summaries() {
        drains_text += &format!("\ndrain {pod}: {d}");
        if !(pod.starts_with("web-") || pod.starts_with("mixed-")) {
            continue;
        }
        drained += 1;
        let (Some(ip), Some(exited)) = (d.pod_ip.clone(), d.exited_at) else {
            problems.push(format!("{pod}: no IP or end in its summary"));
            continue;
        };
        let since = exited - SignedDuration::from_secs(120);
        let removed: Vec<_> = changes
            .iter()
            .filter_map(|(netns, c)| Some((netns.clone(), kube_proxy::removed_at(c, &ip, since)?)))
            .collect();
        if removed.len() != changes.len() {
            problems.push(format!(
                "{pod} ({ip}): let go by {} kube-proxies of {}",
                removed.len(),
                changes.len()
            ));
            continue;
        }
        let first = removed.iter().map(|(_, at)| *at).min().unwrap();
        let (slowest_ns, slowest) = removed.iter().max_by_key(|(_, at)| *at).unwrap().clone();
        let late = slowest.duration_since(first).as_secs_f64();
        late_by.push(late);
        let after = exited.duration_since(slowest).as_secs_f64();
        after_slowest.push(after);
        drains_text += &format!(
            " [ended {after:.1}s after the slowest kube-proxy ({slowest_ns}) let it go, \
             {late:.1}s after the first]"
        );
        // finishedAt has whole seconds; the rules are sampled every 200 ms.
        let slack = 1.0 + RouteWatch::resolution().as_secs_f64();
        if d.forced || after < -slack || after > (WINDOW_CAP + Duration::from_secs(3)).as_secs_f64()
        {
            problems.push(format!(
                "{pod} ended {after:.1}s after the slowest kube-proxy let it go"
            ));
        }
    }
    let late = median(late_by.clone());
    eprintln!(
        "through {} kube-proxies:{routes}\nper client:{report}{drains_text}\n{drained} drains; \
         the slowest kube-proxy let go a median {late:.1}s after the first (each: \
         {late_by:.1?}); drains ended a median {:.1}s after it (each: {after_slowest:.1?})",
        NODES + 1,
        median(after_slowest.clone())
    );

    if !problems.is_empty() {
        fail(&ns, problems.join("\n"));
    }
    assert_eq!(
        web_lost + mixed_lost,
        0,
        "requests failed through the kube-proxies{report}"
    );
    assert!(
        drained >= 2 * RESTARTS * REPLICAS as usize,
        "injected pods drained: {drained}"
    );
    // The controls: the late kube-proxy really was late; the plain Deployment lost what it kept
    // sending, and so did a window that does not widen after deregistration.
    assert!(
        late >= (LAG - Duration::from_secs(2)).as_secs_f64(),
        "the late kube-proxy let pods go a median {late:.1}s after the first: {late_by:?}"
    );
    assert!(
        plain_lost > 0,
        "control: the plain Deployment lost nothing{report}"
    );
    assert!(
        fixed_lost > 0,
        "control: the fixed 300 ms window lost nothing{report}"
    );
    drop(watches);
    drop(proxies);
}
