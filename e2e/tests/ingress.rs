//! Traffic through a real ingress controller (issue 11): Traefik reads the EndpointSlices
//! itself, pools keep-alive connections to pod IPs and applies a removal on its own schedule.
//! Load comes from vegeta, GET and POST at once, through an Ingress and an HTTPRoute on the Gateway.

use std::time::{Duration, Instant};

use graceful_e2e::cluster;
use graceful_e2e::drains::DrainWatch;
use graceful_e2e::graceful::{
    self, graceful_rollout, injected_deployment, injected_with, named_port_service,
};
use graceful_e2e::ingress::{self, Stream};
use graceful_e2e::load::LoadReport;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{demo, rollout, wait};
use graceful_operator::crd::Phase;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

const RESTARTS: usize = 5;
/// Restarts of the comparisons (the plain Deployment, the fixed margin): enough to show their
/// count, kept short for CI's time.
const COMPARISON_RESTARTS: usize = 2;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);
/// Requests per second of each stream (GET and POST, through the Ingress and the Gateway).
const RATE: u32 = 75;

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

/// Deployment `name` behind a Service, an Ingress (host `<name>.local`, Traefik's class or
/// `class`) and, when `gateway`, an HTTPRoute (host `<name>-gw.local`), routed and serving.
/// Returns the hosts.
async fn expose(
    ns: &TestNamespace,
    name: &str,
    class: Option<&str>,
    addr: &str,
    gateway: bool,
) -> Vec<String> {
    let mut hosts = vec![format!("{name}.local")];
    ns.apply(&ingress::ingress(name, &hosts[0], name, class))
        .await
        .unwrap();
    if gateway {
        hosts.push(format!("{name}-gw.local"));
        ingress::http_route(ns, name, &hosts[1], name)
            .await
            .unwrap();
    }
    wait::rollout(&ns.api::<Deployment>(), name, ROLLOUT_TIMEOUT)
        .await
        .unwrap();
    graceful::wait_pods_settled(ns, name, 3, ROLLOUT_TIMEOUT)
        .await
        .unwrap();
    for host in &hosts {
        ingress::wait_routed(addr, host, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| fail(ns, e.to_string()));
    }
    hosts
}

/// What `count` restarts of one Deployment under load counted.
struct Restarts {
    /// Per restart, the streams' counts.
    reports: Vec<Vec<LoadReport>>,
    /// Per restart, what each stream saw (for a failure's message: CI keeps only the end of
    /// the output, after the diagnostics).
    described: Vec<String>,
}

/// `count` restarts of `name`, one after the other, each under every stream. The load of a
/// restart runs until its old pods are gone, not only deleted: a draining pod takes a pause of
/// its traffic for the data plane letting go, so a load that paused between restarts while a
/// slow data plane still listed the old pods would send the next restart's first requests to
/// pods that had stopped on the pause (a client's pause, not the data plane's lag).
async fn restarts_under(
    ns: &TestNamespace,
    name: &str,
    streams: &[Stream],
    count: usize,
) -> Restarts {
    let api = ns.api::<Deployment>();
    let mut all = Restarts {
        reports: Vec::new(),
        described: Vec::new(),
    };
    for i in 1..=count {
        let (walls, reports) = ingress::during_all(streams, async {
            let started = Instant::now();
            rollout::restart(ns, name).await?;
            wait::rollout(&api, name, ROLLOUT_TIMEOUT).await?;
            let rolled = started.elapsed();
            graceful::wait_pods_settled(ns, name, 3, ROLLOUT_TIMEOUT).await?;
            Ok::<_, graceful_e2e::Error>((rolled, started.elapsed()))
        })
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
        let (rolled, drained) = walls.unwrap_or_else(|e| fail(ns, e.to_string()));
        let described = format!(
            "{name} restart {i}/{count} (rolled out in {:.1}s, old pods gone at {:.1}s):\n{}",
            rolled.as_secs_f64(),
            drained.as_secs_f64(),
            ingress::describe(streams, &reports)
        );
        eprintln!("{described}");
        all.described.push(described);
        all.reports.push(reports);
    }
    all
}

fn failed(reports: &[Vec<LoadReport>]) -> (u64, u64) {
    reports.iter().flatten().fold((0, 0), |(sent, failed), r| {
        (sent + r.sent, failed + r.failed)
    })
}

#[tokio::test]
#[ignore = "needs the e2e cluster with Traefik, the images and the chart (make e2e)"]
async fn injected_restarts_and_a_graceful_rollout_through_traefik_fail_nothing() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "ingress").await.unwrap();
    let drains = DrainWatch::start(&ns);

    // The plain demo, same run, same routes: what an ingress does to a rollout without graceful.
    ns.apply(&demo::deployment("plain", 3, "v1")).await.unwrap();
    ns.apply(&demo::service("plain")).await.unwrap();
    ns.apply(&injected_deployment("web", 3, "v1"))
        .await
        .unwrap();
    ns.apply(&named_port_service("web")).await.unwrap();
    let plain_hosts = expose(&ns, "plain", None, ingress::ADDR, true).await;
    let web_hosts = expose(&ns, "web", None, ingress::ADDR, true).await;

    let plain_streams = ingress::get_and_post(ingress::ADDR, &plain_hosts, RATE);
    let plain = restarts_under(&ns, "plain", &plain_streams, COMPARISON_RESTARTS).await;
    let web_streams = ingress::get_and_post(ingress::ADDR, &web_hosts, RATE);
    let web = restarts_under(&ns, "web", &web_streams, RESTARTS).await;

    // The same Deployment managed by a GracefulRollout: one rollout through both routes.
    ns.apply(&graceful_rollout("web", json!({"minServingSeconds": 2})))
        .await
        .unwrap();
    graceful::wait_phase(&ns, "web", Phase::Healthy, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let (rolled, managed) = ingress::during_all(&web_streams, async {
        let since = graceful::trigger(&ns, "web").await?;
        graceful::wait_rollout_finished(&ns, "web", since, ROLLOUT_TIMEOUT).await
    })
    .await
    .unwrap_or_else(|e| fail(&ns, e.to_string()));
    rolled.unwrap_or_else(|e| fail(&ns, format!("GracefulRollout: {e}")));
    eprintln!(
        "web GracefulRollout:\n{}",
        ingress::describe(&web_streams, &managed)
    );

    for (pod, summary) in drains.summaries() {
        eprintln!("drain {pod}: {summary}");
    }
    let (plain_sent, plain_failed) = failed(&plain.reports);
    let (web_sent, web_failed) = failed(&web.reports);
    let managed_described = ingress::describe(&web_streams, &managed);
    let (managed_sent, managed_failed) = failed(&[managed]);
    eprintln!(
        "through Traefik: plain {plain_failed} failed of {plain_sent} over {COMPARISON_RESTARTS} \
         restarts; injected {web_failed} of {web_sent} over {RESTARTS}; GracefulRollout \
         {managed_failed} of {managed_sent}"
    );
    assert!(plain_sent > 0 && web_sent > 0 && managed_sent > 0);
    if web_failed != 0 || managed_failed != 0 {
        fail(
            &ns,
            format!(
                "requests failed through Traefik: injected {web_failed}, managed \
                 {managed_failed}\n{}\nweb GracefulRollout:\n{managed_described}",
                web.described.join("\n")
            ),
        );
    }
}

/// A second Traefik that applies a change at most every 10 s (`providersThrottleDuration`), on
/// its own port and IngressClass: a data plane as slow as a cloud load balancer. Removed on drop.
struct SlowTraefik;

const SLOW: (&str, &str, &str) = ("traefik-slow", "10.244.0.1:8001", "traefik-slow");

impl SlowTraefik {
    fn up() -> Self {
        let (name, addr, class) = SLOW;
        let port = addr.rsplit(':').next().expect("port");
        run_script(&["up", name, port, "10s", class]);
        SlowTraefik
    }
}

impl Drop for SlowTraefik {
    fn drop(&mut self) {
        run_script(&["down", SLOW.0]);
    }
}

fn run_script(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/traefik.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .env("KUBECONFIG", cluster::kubeconfig_path())
        .output()
        .expect("running e2e/scripts/traefik.sh");
    assert!(
        out.status.success(),
        "traefik.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster with Traefik, the images and the chart (make e2e)"]
async fn a_data_plane_slower_than_any_margin_drops_nothing_when_the_drain_follows_the_traffic() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "slow-lb").await.unwrap();
    let _slow = SlowTraefik::up();
    let (_, addr, class) = SLOW;
    let drains = DrainWatch::start(&ns);

    // Side by side: a fixed 2 s margin after the EndpointSlice change (what a preStop sleep
    // gives: no hold for the ingress either), and the default drain that follows the traffic
    // and holds for the ingress's assumed lag.
    let fixed = injected_with(
        "fixed",
        3,
        &[
            ("graceful.dev/quiet-window", "0s"),
            ("graceful.dev/propagation-margin", "2s"),
            ("graceful.dev/data-plane-lag", "0s"),
        ],
    );
    // Services and Ingresses before the pods: the webhook works out what fronts a pod when it
    // injects it.
    for name in ["fixed", "follow"] {
        ns.apply(&named_port_service(name)).await.unwrap();
        let host = format!("{name}.local");
        ns.apply(&ingress::ingress(name, &host, name, Some(class)))
            .await
            .unwrap();
    }
    ns.apply(&fixed).await.unwrap();
    ns.apply(&injected_deployment("follow", 3, "v1"))
        .await
        .unwrap();
    let fixed_hosts = expose(&ns, "fixed", Some(class), addr, false).await;
    let follow_hosts = expose(&ns, "follow", Some(class), addr, false).await;

    let follow_streams = ingress::get_and_post(addr, &follow_hosts, 150);
    let follow = restarts_under(&ns, "follow", &follow_streams, RESTARTS).await;
    let fixed_streams = ingress::get_and_post(addr, &fixed_hosts, 150);
    let fixed = restarts_under(&ns, "fixed", &fixed_streams, COMPARISON_RESTARTS).await;

    let mut lags = Vec::new();
    let mut follow_drains = String::new();
    for (pod, summary) in drains.summaries() {
        eprintln!("drain {pod}: {summary}");
        if pod.starts_with("follow-") {
            follow_drains += &format!("\ndrain {pod}: {summary}");
            lags.push((pod, summary));
        }
    }
    let (fixed_sent, fixed_failed) = failed(&fixed.reports);
    let (follow_sent, follow_failed) = failed(&follow.reports);
    eprintln!(
        "through Traefik applying changes every 10 s: fixed 2 s margin {fixed_failed} failed of \
         {fixed_sent} over {COMPARISON_RESTARTS} restarts; following the traffic {follow_failed} \
         of {follow_sent} over {RESTARTS}"
    );
    if follow_failed != 0 {
        fail(
            &ns,
            format!(
                "the drain that follows the traffic dropped {follow_failed}\n{}{follow_drains}",
                follow.described.join("\n")
            ),
        );
    }
    // Without drops on the fixed side, this run's data plane was not slow: it shows nothing.
    assert!(
        fixed_failed > 0,
        "the fixed margin dropped nothing: the data plane did not lag"
    );
    // Each drain lasted about as long as the data plane lagged: it ended within a window (and a
    // moment to close what was open) of the last request, or at the 5 s floor, or at the hold
    // for the Ingress class's assumed lag (docs/data-planes.md).
    assert!(lags.len() >= RESTARTS * 3, "drains seen: {}", lags.len());
    for (pod, d) in &lags {
        assert!(!d.forced, "{pod}: {d}");
        assert!(
            d.data_plane_lag_seconds > 0.0,
            "{pod}: the Ingress was not detected: {d}"
        );
        let after_traffic = d.quiescing_seconds - d.traffic_after_deregistration_seconds;
        let floor = (5.0_f64).max(d.data_plane_lag_seconds);
        assert!(
            after_traffic <= d.quiet_window.seconds + 1.5 || d.quiescing_seconds <= floor + 1.5,
            "{pod} lingered {after_traffic:.1}s after its traffic stopped: {d}"
        );
    }
    let longest = lags
        .iter()
        .map(|(_, d)| d.traffic_after_deregistration_seconds)
        .fold(0.0, f64::max);
    eprintln!("longest data-plane lag a drain followed: {longest:.1}s");
    assert!(longest > 2.0, "no drain met a lag beyond the fixed margin");
}
