//! Faults on the real cluster, under load: what graceful does when the ground moves.
//!
//! The control plane restarted mid-rollout: the apiserver at the first step, etcd at the
//! second. The rollout must resume and finish with 0 requests failed, publish each of its
//! Events once, and record the rollout it did.
//!
//! A sidecar SIGKILLed mid-drain, and the node's CPUs taken by busy loops during a rollout:
//! what happens is measured. A killed sidecar costs the requests that reach its pod until
//! kube-proxy drops the pod; nothing outside that window fails. Under CPU pressure every
//! drain is slower and nothing fails.
//!
//! The leader cut off from the apiserver: an iptables rule on the node drops every packet from
//! the leading operator pod to the apiserver, mid-rollout, so its API calls hang (not fail).
//! The standby must take over and finish the rollout, and the old leader must have stopped
//! acting before the standby started: the two log lines' times say so (one host clock).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use graceful_e2e::drains::{DrainSummary, DrainWatch};
use graceful_e2e::graceful::{self, OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
use graceful_e2e::kube_proxy::{RouteChange, RouteWatch};
use graceful_e2e::load::{Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::node::IptablesRule;
use graceful_e2e::{Error, Result, cluster, node, wait};
use graceful_operator::crd::{GracefulRollout, Phase};
use graceful_operator::leader::{LEASE_DURATION, RENEW_DEADLINE};
use graceful_operator::outage::RECONNECT_BOUND;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, LogParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const APP: &str = "web";
const SIDECAR: &str = "graceful-sidecar";
/// The sidecar's admin port (its /metrics), on the pod's IP.
const ADMIN_PORT: u16 = graceful_sidecar::defaults::ADMIN_PORT;
const REPLICAS: i32 = 3;
/// How long kube-proxy on this node may route to a pod after the EndpointSlice change: it
/// applies one in 2-3 s when busy (docs/drain.md), and the EndpointSlice controller writes the
/// change within a second of the deletion.
const KUBE_PROXY_LAG: Duration = Duration::from_secs(5);
const LEASE: &str = "graceful-operator";
/// What the leader logs when it gives up, and what its successor logs.
const GAVE_UP: &str = "no renewal within the deadline";
const BECAME: &str = "became leader";

/// A namespace with the injected demo (3 replicas) under a GracefulRollout (new pods serve 5 s
/// before an old one goes), settled; and the Service's URL.
async fn managed_demo(client: &Client, prefix: &str) -> (TestNamespace, String) {
    let ns = TestNamespace::create(client, prefix).await.unwrap();
    let url = graceful::deploy_managed_demo(&ns, APP, REPLICAS, json!({"minServingSeconds": 5}))
        .await
        .unwrap();
    (ns, url)
}

async fn holder(client: &Client) -> Result<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get(LEASE)
        .await?;
    Ok(lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

/// The earliest time after `after` at which `pod` (its current or previous container) logged a
/// line containing `what`.
async fn logged_at(
    pods: &Api<Pod>,
    pod: &str,
    what: &str,
    after: Timestamp,
) -> Result<Option<Timestamp>> {
    let mut earliest = None;
    for previous in [false, true] {
        let params = LogParams {
            previous,
            ..Default::default()
        };
        // No previous container is a 400: nothing to read there.
        let Ok(log) = pods.logs(pod, &params).await else {
            continue;
        };
        for line in log.lines().filter(|l| l.contains(what)) {
            let stamp = line.split_whitespace().next().unwrap_or_default();
            let at = stamp
                .parse::<Timestamp>()
                .map_err(|e| Error::Report(format!("log line without a time ({e}): {line}")))?;
            if at > after && earliest.is_none_or(|e| at < e) {
                earliest = Some(at);
            }
        }
    }
    Ok(earliest)
}

/// Seconds from `a` to `b`.
fn secs(a: Timestamp, b: Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64()
}

/// What happened when, in seconds from `since`: the test's own marks, each drain (from its
/// sidecar's summary: exit less its length; exits are known to the second), each change of the
/// endpoints kube-proxy routes the Service to, and each failed request vegeta kept. A failure lies beside what the cluster was doing as it was sent.
fn timeline(
    since: Timestamp,
    marks: &[(Timestamp, &str)],
    drains: &BTreeMap<String, DrainSummary>,
    routes: &[RouteChange],
    report: &LoadReport,
) -> String {
    let pod_of = |endpoint: &str| {
        let ip = endpoint.split(':').next().unwrap_or(endpoint);
        drains
            .iter()
            .find(|(_, d)| d.pod_ip.as_deref() == Some(ip))
            .map_or(endpoint.to_owned(), |(pod, _)| {
                format!("{endpoint} ({pod})")
            })
    };
    let mut lines: Vec<(f64, String)> = marks
        .iter()
        .map(|(at, what)| (secs(since, *at), what.to_string()))
        .collect();
    for (pod, d) in drains {
        if let Some(exit) = d.exited_at {
            let exit = secs(since, exit);
            lines.push((exit - d.total_seconds, format!("{pod} drain began: {d}")));
            lines.push((exit, format!("{pod} sidecar exited")));
        }
    }
    for (at, endpoints) in routes {
        let to: Vec<String> = endpoints.iter().map(|e| pod_of(e)).collect();
        lines.push((
            secs(since, *at),
            format!("kube-proxy routes to {}", to.join(", ")),
        ));
    }
    for f in &report.failures {
        let sent = secs(since, f.sent_at);
        let took = f.latency.as_secs_f64();
        lines.push((sent, format!("request failed after {took:.2}s: {}", f.what)));
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = String::from("timeline (s from the template change):");
    for (at, what) in lines {
        out.push_str(&format!("\n  {at:+8.2}  {what}"));
    }
    out
}

/// A daemon's warnings and errors (klog's `W` and `E` lines) since `since`, from its log in
/// the cluster's state directory: how its watches fared while the control plane was away.
fn print_daemon_warnings(daemon: &str, since: Timestamp) {
    let path = cluster::state_dir()
        .join("logs")
        .join(format!("{daemon}.log"));
    let Ok(log) = std::fs::read_to_string(&path) else {
        eprintln!("no log at {}", path.display());
        return;
    };
    // klog: `W1202 18:41:57.123456 ...`; the day and time, compared as text.
    let day = since.strftime("%m%d %H:%M:%S").to_string();
    eprintln!("--- {daemon}: warnings and errors since {since}");
    for line in log.lines().filter(|l| {
        (l.starts_with('W') || l.starts_with('E')) && l.get(1..15).is_some_and(|t| t >= &day[..])
    }) {
        eprintln!("{line:.400}");
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster, root for iptables, and the chart (make e2e)"]
async fn a_leader_cut_off_from_the_apiserver_stops_before_the_standby_takes_over() {
    let client = cluster::client().await.unwrap();
    let (ns, url) = managed_demo(&client, "fault-leader").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let port = cluster::apiserver_port(&client).await.unwrap().to_string();

    let (result, report) = Load::default()
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            let leader = holder(&client).await?;
            let ip = pods
                .get(&leader)
                .await?
                .status
                .and_then(|s| s.pod_ip)
                .ok_or_else(|| Error::Cluster(format!("leader {leader} has no IP")))?;
            // Every packet from the leader to the apiserver dropped: its calls hang. Timed
            // after the insert: the cut is in place by `cut_at`.
            let rule = IptablesRule::insert(&[
                "INPUT", "-s", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP",
            ])?;
            let cut_at = Timestamp::now();
            let successor = wait::until(
                "another operator replica holding the Lease",
                LEASE_DURATION * 3,
                || async {
                    let now = holder(&client).await?;
                    Ok((!now.is_empty() && now != leader).then_some(now))
                },
            )
            .await?;
            drop(rule);
            graceful::wait_rollout_finished(
                &ns,
                APP,
                since,
                RECONNECT_BOUND + Duration::from_secs(120),
            )
            .await?;
            Ok::<_, Error>((leader, successor, cut_at))
        })
        .await
        .expect("load run");
    let (leader, successor, cut_at) = result.unwrap_or_else(|e| {
        ns.print_diagnostics();
        panic!("the rollout did not survive its leader's cut: {e}")
    });

    // Lines from before the cut (an earlier term of either replica) are not this handover.
    let before = cut_at
        .checked_sub(SignedDuration::try_from(RENEW_DEADLINE).unwrap())
        .unwrap();
    let gave_up = logged_at(&pods, &leader, GAVE_UP, before).await.unwrap();
    let took_over = logged_at(&pods, &successor, BECAME, before).await.unwrap();
    let (Some(gave_up), Some(took_over)) = (gave_up, took_over) else {
        panic!(
            "missing log lines: {leader} '{GAVE_UP}' {gave_up:?}, {successor} '{BECAME}' {took_over:?}"
        );
    };
    eprintln!(
        "leader {leader} cut off: it stopped acting {:.1}s after the cut, {successor} took over \
         {:.1}s after the cut ({:.1}s apart); rollout under load: {report}",
        secs(cut_at, gave_up),
        secs(cut_at, took_over),
        secs(gave_up, took_over),
    );
    assert!(
        gave_up < took_over,
        "two leaders: {leader} stopped at {gave_up}, {successor} led from {took_over}"
    );
    // The leader's last renewal was sent before the cut: it stops within the renew deadline
    // of it (plus its timer's lateness on a loaded node: 0.5 s).
    assert!(
        secs(cut_at, gave_up) <= RENEW_DEADLINE.as_secs_f64() + 0.5,
        "the cut-off leader acted {:.1}s after the cut",
        secs(cut_at, gave_up)
    );
    assert_eq!(report.failed, 0, "requests failed across the cut: {report}");

    // Leave the operator as found: both replicas ready (the cut one restarted to stand again).
    wait::until(
        "both operator replicas ready",
        Duration::from_secs(120),
        || async {
            let list = pods
                .list(&ListParams::default().labels(OPERATOR_SELECTOR))
                .await?
                .items;
            Ok((list.len() == 2 && list.iter().all(wait::is_ready)).then_some(()))
        },
    )
    .await
    .unwrap();
}

/// Waits until the apiserver answers this test again: the first request after a restart may
/// meet a pooled connection the restart closed.
async fn answering(api: &Api<GracefulRollout>) -> Result<()> {
    let mut last = String::new();
    for _ in 0..120 {
        match api.get(APP).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::Cluster(format!(
        "the apiserver did not answer for 30 s after the restart: {last}"
    )))
}

/// The Events the operator published about the GracefulRollout since `since`, as
/// (reason, note, how many times each was seen: its Events and their series counts).
async fn events_since(ns: &TestNamespace, since: Timestamp) -> Result<Vec<(String, String, i32)>> {
    let mut seen: Vec<(String, String, i32)> = Vec::new();
    for e in ns.api::<Event>().list(&ListParams::default()).await?.items {
        let about_us = e.regarding.as_ref().is_some_and(|r| {
            r.kind.as_deref() == Some("GracefulRollout") && r.name.as_deref() == Some(APP)
        });
        let at = e.event_time.as_ref().map(|t| t.0);
        if !about_us || at.is_none_or(|at| at < since) {
            continue;
        }
        let times = e.series.as_ref().map_or(1, |s| s.count);
        let (reason, note) = (e.reason.unwrap_or_default(), e.note.unwrap_or_default());
        match seen.iter_mut().find(|(r, n, _)| *r == reason && *n == note) {
            Some(entry) => entry.2 += times,
            None => seen.push((reason, note, times)),
        }
    }
    Ok(seen)
}

#[tokio::test]
#[ignore = "needs the e2e cluster, root to restart its daemons, and the chart (make e2e)"]
async fn a_rollout_resumes_and_finishes_across_apiserver_and_etcd_restarts() {
    let client = cluster::client().await.unwrap();
    let (ns, url) = managed_demo(&client, "fault-control-plane").await;
    let rollouts = ns.api::<GracefulRollout>();
    let drains = DrainWatch::start(&ns);
    let routes = RouteWatch::start(&format!("{}/{APP}", ns.name));
    let marks = std::cell::RefCell::new(Vec::new());
    let mark = |what: &'static str| marks.borrow_mut().push((Timestamp::now(), what));

    // Each outage the operator meets holds the next step for RECONNECT_BOUND (outage.rs).
    let load = Load {
        max_duration: Duration::from_secs(180) + RECONNECT_BOUND * 2,
        ..Load::default()
    };
    let (result, report) = load
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(60)).await?;
            mark("apiserver stopping");
            let apiserver = cluster::restart_daemon("kube-apiserver").await?;
            mark("apiserver ready");
            answering(&rollouts).await?;
            // A later step, not yet the end: etcd goes with the rollout still going. The step
            // comes RECONNECT_BOUND after the apiserver is back, when the data planes are.
            let second = RECONNECT_BOUND + Duration::from_secs(60);
            let at = graceful::wait_new_pods(&ns, APP, 2, second).await?;
            mark("etcd stopping");
            let etcd = cluster::restart_daemon("etcd").await?;
            mark("etcd and apiserver ready");
            answering(&rollouts).await?;
            let rest = RECONNECT_BOUND + Duration::from_secs(120);
            let gr = graceful::wait_rollout_finished(&ns, APP, since, rest).await?;
            let step = at.status.and_then(|s| s.progress).unwrap_or_default();
            Ok::<_, Error>((since, gr, apiserver, etcd, step))
        })
        .await
        .expect("load run");
    let (since, gr, apiserver, etcd, step) = result.unwrap_or_else(|e| {
        ns.print_diagnostics();
        panic!("the rollout did not survive the control plane's restarts: {e}")
    });
    eprintln!(
        "{}",
        timeline(
            since,
            &marks.borrow(),
            &drains.summaries(),
            &routes.changes(),
            &report
        )
    );
    let status = gr.status.clone().unwrap_or_default();
    let record = status
        .last_rollout
        .clone()
        .expect("a finished rollout is recorded");
    let events = events_since(&ns, since).await.unwrap();
    eprintln!(
        "apiserver restarted at the first step (gone {:.1}s), etcd at {step} (gone {:.1}s); \
         rollout {:?} in {:.1}s: {}; under load: {report}",
        apiserver.as_secs_f64(),
        etcd.as_secs_f64(),
        record.outcome,
        record
            .finished_at
            .0
            .duration_since(record.started_at.0)
            .as_secs_f64(),
        record.summary,
    );
    for (reason, note, times) in &events {
        eprintln!("  event {reason} x{times}: {note}");
    }

    if report.failed > 0 {
        print_daemon_warnings("kube-proxy", since);
        print_daemon_warnings("kube-controller-manager", since);
    }
    assert_eq!(
        report.failed, 0,
        "requests failed across the restarts: {report}"
    );
    // The status record is this rollout's, whole.
    assert_eq!(status.phase, Phase::Healthy);
    assert_eq!(record.outcome, "Succeeded");
    assert_eq!(record.pods_replaced, REPLICAS, "{record:?}");
    assert_eq!(
        status.updated_revision.as_deref(),
        Some(record.revision.as_str())
    );
    assert_eq!(
        status.stable_revision.as_deref(),
        Some(record.revision.as_str())
    );
    assert!(record.finished_at.0 > record.started_at.0, "{record:?}");
    let serving: Vec<String> = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            p.labels()
                .get("pod-template-hash")
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        serving,
        vec![record.revision.clone(); REPLICAS as usize],
        "the pods left are not all of the recorded revision"
    );
    // Each Event once: none published again by a retried reconcile or by a new leader.
    for (reason, note, times) in &events {
        assert_eq!(*times, 1, "Event {reason} published {times} times: {note}");
    }
    for reason in ["RolloutStarted", "RolloutFinished"] {
        let n = events.iter().filter(|(r, _, _)| r == reason).count();
        assert_eq!(n, 1, "{n} {reason} Events: {events:?}");
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster, root to kill a container, and the chart (make e2e)"]
async fn a_sidecar_killed_mid_drain_costs_only_what_reaches_its_pod() {
    let client = cluster::client().await.unwrap();
    let (ns, url) = managed_demo(&client, "fault-sidecar-kill").await;
    let pods = ns.api::<Pod>();

    let (result, report) = Load::default()
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            // The first old pod to drain: its sidecar is killed once its own metrics say its
            // drain began (deregistering or quiescing), within a poll (250 ms) of that.
            let draining = wait::until("an old pod terminating", Duration::from_secs(60), || {
                let pods = pods.clone();
                async move {
                    let list = pods
                        .list(&ListParams::default().labels(&format!("app={APP}")))
                        .await?;
                    Ok(list
                        .items
                        .into_iter()
                        .find(|p| p.metadata.deletion_timestamp.is_some()))
                }
            })
            .await?;
            let admin = format!(
                "{}:{ADMIN_PORT}",
                draining
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .unwrap_or_default()
            );
            let phase = wait::until("its sidecar draining", Duration::from_secs(30), || async {
                let (_, metrics) = wait::http_get(&admin, "/metrics").await?;
                Ok(drain_phase(&metrics).filter(|p| *p != "serving"))
            })
            .await?;
            let killed = node::kill_container(&draining, SIDECAR)?;
            let killed_at = Timestamp::now();
            let name = draining.name_any();
            // Until the pod is gone: whether the kubelet started the sidecar again meanwhile.
            let gone = async {
                let restarts = std::cell::Cell::new(0);
                wait::until(
                    &format!("{name} gone"),
                    Duration::from_secs(120),
                    || async {
                        let pod = pods.get_opt(&name).await?;
                        if let Some(pod) = &pod {
                            restarts.set(restarts.get().max(node::restart_count(pod, SIDECAR)));
                        }
                        Ok(pod.is_none().then_some(()))
                    },
                )
                .await?;
                Ok::<_, Error>((Timestamp::now(), restarts.get()))
            };
            let finished =
                graceful::wait_rollout_finished(&ns, APP, since, Duration::from_secs(240));
            let (gone, gr) = tokio::try_join!(gone, finished)?;
            Ok::<_, Error>((name, phase, killed, killed_at, gone, gr))
        })
        .await
        .expect("load run");
    let (name, phase, killed, killed_at, (gone, restarts), gr) = result.unwrap_or_else(|e| {
        ns.print_diagnostics();
        panic!("the rollout did not survive a sidecar killed mid-drain: {e}")
    });
    let record = gr
        .status
        .and_then(|s| s.last_rollout)
        .expect("a finished rollout");
    let span = report
        .failed_span
        .map(|(first, last)| (secs(killed_at, first), secs(killed_at, last)));
    eprintln!(
        "sidecar of {name} SIGKILLed while {phase} (pids {killed:?}); the pod was gone {:.1}s later, \
         the sidecar restarted {restarts} time(s) meanwhile; failures from {} after the kill; \
         rollout {}: {}; under load: {report}",
        secs(killed_at, gone),
        span.map_or("none".into(), |(a, b)| format!("{a:+.2}s to {b:+.2}s")),
        record.outcome,
        record.summary,
    );
    assert_eq!(record.outcome, "Succeeded", "{record:?}");
    assert_eq!(record.pods_replaced, REPLICAS, "{record:?}");
    // What failed was on its way to the killed pod: sent between the kill (a request in
    // flight then, at most a second old) and kube-proxy letting the pod go. The other drains
    // of the rollout cost nothing.
    if let Some((first, last)) = span {
        assert!(
            first >= -1.0 && last <= KUBE_PROXY_LAG.as_secs_f64(),
            "failures outside the killed pod's window: {first:+.2}s to {last:+.2}s after the \
             kill ({report})"
        );
    }
}

/// The drain phase a sidecar's /metrics says it is in.
fn drain_phase(metrics: &str) -> Option<String> {
    metrics.lines().find_map(|l| {
        let phase = l.strip_prefix("graceful_drain_phase{phase=\"")?;
        let (phase, value) = phase.split_once("\"} ")?;
        (value.trim() == "1").then(|| phase.to_owned())
    })
}

/// Busy loops, one pinned to each CPU of this node, at the pods' own priority: the node under
/// CPU pressure. Stopped when dropped.
struct CpuHog(Vec<std::process::Child>);

impl CpuHog {
    /// Each loop ends by itself after `bound`, should this process be killed before it can
    /// stop them. The loop is the process spawned (taskset execs bash), so killing the child
    /// kills the loop: behind coreutils' `timeout` it outlived the kill, as a first version's
    /// did, and starved the tests after it.
    fn start(bound: Duration) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let script = format!("while (( SECONDS < {} )); do :; done", bound.as_secs());
        let mut hogs = Vec::new();
        for cpu in 0..cpus {
            let cpu = cpu.to_string();
            let child = Command::new("taskset")
                .args(["-c", &cpu, "bash", "-c", &script])
                .spawn()
                .map_err(Error::io("starting a busy loop with taskset"))?;
            hogs.push(child);
        }
        Ok(Self(hogs))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart (make e2e)"]
async fn a_rollout_on_a_node_under_cpu_pressure_drops_nothing() {
    let client = cluster::client().await.unwrap();
    let (ns, url) = managed_demo(&client, "fault-cpu").await;
    let load = Load::default();
    let timeout = Duration::from_secs(240);
    let mut figures = Vec::new();
    for pressure in [false, true] {
        let drains = DrainWatch::start(&ns);
        let hog = pressure
            .then(|| CpuHog::start(timeout + Duration::from_secs(60)))
            .transpose()
            .unwrap();
        let (_, report, wall) = graceful::rollout_under_load(&ns, APP, &url, &load, timeout)
            .await
            .unwrap_or_else(|e| {
                ns.print_diagnostics();
                panic!("rollout (CPU pressure: {pressure}): {e}")
            });
        drop(hog);
        graceful::wait_pods_settled(&ns, APP, REPLICAS as usize, Duration::from_secs(60))
            .await
            .unwrap();
        let summaries = drains.summaries();
        let longest = summaries
            .values()
            .map(|d| d.total_seconds)
            .fold(0.0, f64::max);
        let lag = summaries
            .values()
            .map(|d| d.traffic_after_deregistration_seconds)
            .fold(0.0, f64::max);
        eprintln!(
            "CPU pressure {pressure}: rollout {:.1}s, {} drains, longest {longest:.1}s, traffic \
             up to {lag:.1}s after deregistration; {report}",
            wall.as_secs_f64(),
            summaries.len(),
        );
        for (pod, d) in &summaries {
            eprintln!("  {pod}: {d}");
        }
        figures.push((pressure, report));
    }
    for (pressure, report) in figures {
        assert_eq!(report.failed, 0, "CPU pressure {pressure}: {report}");
    }
}
