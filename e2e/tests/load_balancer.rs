//! Behind a slow L4 load balancer (issue 25): HAProxy in TCP mode in front of a `type:
//! LoadBalancer` Service, resending nothing, registering pods 3 s late and deregistering them
//! 30 s late, as an NLB with IP targets does (e2e/src/slow_lb.rs). Its clients come in bursts
//! with pauses longer than any quiet window, each request on a new connection, so a drain that
//! follows the traffic alone sees silence while the balancer still routes to the pod.
//!
//! Three Deployments side by side in one run, each behind its own balancer with the same
//! bursty clients: injected as the webhook sizes it (the balancer detected, its lag held unless
//! the siblings show the balancer routing elsewhere), injected with `data-plane-lag: 0s` (the
//! drain that follows the traffic alone), and the plain demo. A fourth, injected and managed by
//! a GracefulRollout, also carries steady keep-alive clients.

use std::time::Duration;

use graceful_e2e::cluster;
use graceful_e2e::drains::{DrainSummary, DrainWatch};
use graceful_e2e::graceful::{
    self, graceful_rollout, injected_deployment, injected_with, named_port_service,
};
use graceful_e2e::load::{Bursts, BurstsReport, Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::slow_lb::{self, LbEventKind, SlowLb, SlowLbConfig};
use graceful_e2e::{demo, wait};
use graceful_operator::crd::Phase;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;

const RESTARTS: usize = 5;
/// Restarts of the comparisons: enough to show their count, kept short for CI's time.
const COMPARISON_RESTARTS: usize = 2;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);
const REPLICAS: i32 = 3;
/// The bursty clients: 2 s at 15 requests per second, each on a new connection, then 12 s of
/// nothing (longer than the 10 s cap of a window derived from the traffic).
const BURST: Duration = Duration::from_secs(2);
const PAUSE: Duration = Duration::from_secs(12);
const BURST_RATE: u32 = 15;
/// The steady clients: keep-alive connections, as a service calling another does.
const STEADY_RATE: u32 = 20;

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

fn bursty() -> Bursts {
    Bursts {
        load: Load {
            rate: BURST_RATE,
            // Room for the requests a gone pod holds until they fail: a client that waits for a
            // free connection would send less than asked exactly where it matters.
            connections: 100,
            keepalive: false,
            request_timeout: Duration::from_secs(5),
            ..Load::default()
        },
        burst: BURST,
        pause: PAUSE,
        max_bursts: 200,
    }
}

fn steady() -> Load {
    Load {
        rate: STEADY_RATE,
        connections: 2,
        lead_in: Duration::ZERO,
        tail: Duration::ZERO,
        max_duration: Duration::from_secs(900),
        ..Load::default()
    }
}

/// Deployment `d` behind its `type: LoadBalancer` Service (created first, so the webhook sees
/// it) and a slow balancer that has registered every pod.
async fn behind_slow_lb(ns: &TestNamespace, d: Deployment, service: Service) -> SlowLb {
    let name = d.metadata.name.clone().unwrap();
    ns.apply(&slow_lb::load_balancer_service(service))
        .await
        .unwrap();
    ns.apply(&d).await.unwrap();
    let lb = SlowLb::start(ns, &name, SlowLbConfig::default())
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    wait::rollout(&ns.api::<Deployment>(), &name, ROLLOUT_TIMEOUT)
        .await
        .unwrap();
    lb.wait_settled(REPLICAS as usize, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    lb
}

/// `count` restarts of `name`, one after the other (`managed`: each a GracefulRollout's
/// rollout); each waits until the balancer sends only to the new pods and the old ones are
/// gone, so that every pod lives through some bursts (a pod that never got a connection has no
/// source to show let go: it waits the whole lag).
async fn restarts(
    ns: &TestNamespace,
    name: &str,
    lb: &SlowLb,
    count: usize,
    managed: bool,
) -> Result<(), String> {
    for i in 1..=count {
        let what = |e: graceful_e2e::Error| format!("{name} restart {i}: {e}");
        graceful::restart(ns, name, managed, ROLLOUT_TIMEOUT)
            .await
            .map_err(what)?;
        settle(ns, name, lb).await?;
    }
    Ok(())
}

async fn settle(ns: &TestNamespace, name: &str, lb: &SlowLb) -> Result<(), String> {
    graceful::wait_pods_settled(ns, name, REPLICAS as usize, ROLLOUT_TIMEOUT)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    lb.wait_settled(REPLICAS as usize, Duration::from_secs(90))
        .await
        .map_err(|e| format!("{name}: {e}"))
}

/// The bursts sent what their rate and length ask for (within 10 %): a zero counts only if the
/// clients really sent.
fn assert_sent_as_asked(ns: &TestNamespace, who: &str, r: &BurstsReport) {
    let expected = bursty().expected(r.bursts);
    let sent = r.report.sent as f64;
    if r.bursts < 3 || (sent - expected).abs() > expected * 0.1 {
        fail(
            ns,
            format!(
                "{who}: {} bursts sent {sent} requests, {expected} asked",
                r.bursts
            ),
        );
    }
}

/// The balancer's deregistration of `ip` closest before `exited` (the drain's end), if any.
fn deregistered_before(
    events: &[slow_lb::LbEvent],
    exited: k8s_openapi::jiff::Timestamp,
) -> Option<k8s_openapi::jiff::Timestamp> {
    events
        .iter()
        .filter(|e| e.kind == LbEventKind::Deregistered)
        .map(|e| e.at)
        .filter(|at| *at <= exited + k8s_openapi::jiff::SignedDuration::from_secs(60))
        .max()
}

fn line(who: &str, r: &LoadReport) -> String {
    format!("{who}: {r}")
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images, the chart and haproxy (make e2e)"]
async fn behind_a_slow_load_balancer_bursty_clients_lose_nothing_and_both_controls_do() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "slow-l4").await.unwrap();
    let drains = DrainWatch::start(&ns);

    // The Deployments come up side by side.
    let (web, today, plain, mixed) = tokio::join!(
        behind_slow_lb(
            &ns,
            injected_deployment("web", REPLICAS, "v1"),
            named_port_service("web"),
        ),
        behind_slow_lb(
            &ns,
            injected_with("today", REPLICAS, &[("graceful.dev/data-plane-lag", "0s")]),
            named_port_service("today"),
        ),
        behind_slow_lb(
            &ns,
            demo::deployment("plain", REPLICAS, "v1"),
            demo::service("plain"),
        ),
        behind_slow_lb(
            &ns,
            injected_deployment("mixed", REPLICAS, "v1"),
            named_port_service("mixed"),
        ),
    );

    // mixed is managed by a GracefulRollout: its restarts are the controller's rollouts.
    ns.apply(&graceful_rollout("mixed", json!({"minServingSeconds": 2})))
        .await
        .unwrap();
    graceful::wait_phase(&ns, "mixed", Phase::Healthy, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));

    // All four at once, each under its own clients: web 5 restarts, the controls 2, mixed 5
    // GracefulRollout rollouts under bursty and steady clients together.
    let clients = bursty();
    let steady = steady();
    let (web_url, today_url, plain_url, mixed_url) =
        (web.url(), today.url(), plain.url(), mixed.url());
    let (web_run, today_run, plain_run, mixed_run) = tokio::join!(
        clients.during(&web_url, restarts(&ns, "web", &web, RESTARTS, false)),
        clients.during(
            &today_url,
            restarts(&ns, "today", &today, COMPARISON_RESTARTS, false)
        ),
        clients.during(
            &plain_url,
            restarts(&ns, "plain", &plain, COMPARISON_RESTARTS, false)
        ),
        steady.during(
            &mixed_url,
            clients.during(&mixed_url, restarts(&ns, "mixed", &mixed, RESTARTS, true))
        ),
    );
    let (web_done, web_bursty) = web_run.unwrap_or_else(|e| fail(&ns, e.to_string()));
    let (today_done, today_bursty) = today_run.unwrap_or_else(|e| fail(&ns, e.to_string()));
    let (plain_done, plain_bursty) = plain_run.unwrap_or_else(|e| fail(&ns, e.to_string()));
    let (mixed_inner, mixed_steady) = mixed_run.unwrap_or_else(|e| fail(&ns, e.to_string()));
    let (mixed_done, mixed_bursty) = mixed_inner.unwrap_or_else(|e| fail(&ns, e.to_string()));
    for done in [web_done, today_done, plain_done, mixed_done] {
        done.unwrap_or_else(|e| fail(&ns, e));
    }

    let report = [
        line("web, 5 restarts, bursty", &web_bursty.report),
        line(
            "mixed, 5 GracefulRollout rollouts, bursty",
            &mixed_bursty.report,
        ),
        line("mixed, 5 GracefulRollout rollouts, steady", &mixed_steady),
        line(
            "today (data-plane-lag 0s), 2 restarts, bursty",
            &today_bursty.report,
        ),
        line("plain, 2 restarts, bursty", &plain_bursty.report),
    ]
    .join("\n");
    eprintln!("behind the slow balancer, per client:\n{report}");

    // Every drain of the detected pods against the moment its own balancer let the pod go (by
    // the pod's Deployment: pod IPs are reused, so another balancer may have seen the same IP).
    let (web_events, mixed_events) = (web.events().await, mixed.events().await);
    let mut held: Vec<(String, DrainSummary, f64)> = Vec::new();
    let mut unmatched = Vec::new();
    let mut drains_text = String::new();
    for (pod, d) in drains.summaries() {
        drains_text += &format!("\ndrain {pod}: {d}");
        let events = if pod.starts_with("web-") {
            &web_events
        } else if pod.starts_with("mixed-") {
            &mixed_events
        } else {
            continue;
        };
        let at = d.pod_ip.as_ref().and_then(|ip| {
            let dereg = deregistered_before(events.get(ip)?, d.exited_at?)?;
            Some(d.exited_at?.duration_since(dereg).as_secs_f64())
        });
        match at {
            Some(after) => held.push((pod, d, after)),
            None => unmatched.push(format!(
                "{pod} (ip {:?}, exited {:?}, balancer events {:?})",
                d.pod_ip,
                d.exited_at,
                d.pod_ip.as_ref().and_then(|ip| events.get(ip))
            )),
        }
    }
    eprintln!("{drains_text}");

    for (who, r) in [
        ("web", &web_bursty),
        ("mixed", &mixed_bursty),
        ("today", &today_bursty),
        ("plain", &plain_bursty),
    ] {
        assert_sent_as_asked(&ns, who, r);
    }
    let steady_expected = f64::from(STEADY_RATE) * mixed_steady.duration.as_secs_f64();
    assert!(
        mixed_steady.sent as f64 >= steady_expected * 0.9,
        "steady clients sent {} of {steady_expected:.0}",
        mixed_steady.sent
    );
    let lost = web_bursty.report.failed + mixed_bursty.report.failed + mixed_steady.failed;
    if lost != 0 {
        fail(
            &ns,
            format!("requests failed behind the slow balancer:\n{report}{drains_text}"),
        );
    }
    // The controls, same run, same clients: without the hold the pause ends the drain while
    // the balancer still sends, and without the sidecar the app is gone at once.
    assert!(
        today_bursty.report.failed > 0,
        "control: the drain that follows the traffic alone lost nothing, so the balancer did \
         not lag past the pauses\n{report}"
    );
    assert!(
        plain_bursty.report.failed > 0,
        "control: the plain Deployment lost nothing\n{report}"
    );

    // Each held drain ended after the balancer let its pod go (never on silence before), and
    // soon after, not at the 120 s assumed lag: the siblings must show k new connections from
    // the balancer with none here (25 for 3 siblings, 31 for 4), which takes one or two bursts
    // of 30, the first starting up to a pause after the balancer let go.
    assert!(
        held.len() >= RESTARTS * 2 * REPLICAS as usize,
        "drains laid beside the balancer: {}; without a deregistration before their end: \
         {unmatched:?}{drains_text}",
        held.len()
    );
    let mut longest: f64 = 0.0;
    for (pod, d, after) in &held {
        assert!(!d.forced, "{pod}: {d}");
        assert_eq!(d.data_plane_lag_seconds, 120.0, "{pod}: {d}");
        assert_eq!(d.released_by, "siblings", "{pod}: {d}");
        assert!(
            // finishedAt has whole seconds.
            *after >= -1.0 && *after <= ((PAUSE + BURST) * 2).as_secs_f64() + 2.0,
            "{pod} ended {after:.1}s after the balancer let it go: {d}"
        );
        longest = longest.max(*after);
    }
    eprintln!(
        "{} drains ended 0 to {longest:.1}s after the balancer let their pod go (assumed lag 120s)",
        held.len()
    );
}
