//! Faults on the real cluster, under load: what graceful does when the ground moves.
//!
//! The leader cut off from the apiserver: an iptables rule on the node drops every packet from
//! the leading operator pod to the apiserver, mid-rollout, so its API calls hang (not fail).
//! The standby must take over and finish the rollout, and the old leader must have stopped
//! acting before the standby started: the two log lines' times say so (one host clock).

use std::process::Command;
use std::time::Duration;

use graceful_e2e::graceful::{self, OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{Error, Result, cluster, wait};
use graceful_operator::leader::{LEASE_DURATION, RENEW_DEADLINE};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, LogParams};
use kube::{Api, Client};
use serde_json::json;

const APP: &str = "web";
const LEASE: &str = "graceful-operator";
/// What the leader logs when it gives up, and what its successor logs.
const GAVE_UP: &str = "no renewal within the deadline";
const BECAME: &str = "became leader";

/// An iptables rule on this host, deleted when dropped (a failing test must not leave the
/// operator cut off for the rest of the suite).
struct Rule(Vec<String>);

impl Rule {
    fn insert(spec: &[&str]) -> Result<Self> {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        iptables("-I", &spec)?;
        Ok(Self(spec))
    }
}

impl Drop for Rule {
    fn drop(&mut self) {
        if let Err(e) = iptables("-D", &self.0) {
            eprintln!("could not delete the iptables rule {:?}: {e}", self.0);
        }
    }
}

fn iptables(op: &str, spec: &[String]) -> Result<()> {
    let out = Command::new("iptables")
        .arg(op)
        .args(spec)
        .output()
        .map_err(Error::io("running iptables"))?;
    cluster::stdout_of(out, || format!("iptables {op} {}", spec.join(" ")))?;
    Ok(())
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

/// The apiserver's port as pods reach it (the `default/kubernetes` Service's endpoint).
async fn apiserver_port(client: &Client) -> Result<i32> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?;
    slices
        .items
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find_map(|p| p.port)
        .ok_or_else(|| Error::Cluster("the kubernetes Service has no endpoint port".into()))
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

#[tokio::test]
#[ignore = "needs the e2e cluster, root for iptables, and the chart (make e2e)"]
async fn a_leader_cut_off_from_the_apiserver_stops_before_the_standby_takes_over() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "fault-leader")
        .await
        .unwrap();
    let url = graceful::deploy_managed_demo(&ns, APP, 3, json!({"minServingSeconds": 5}))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let port = apiserver_port(&client).await.unwrap().to_string();

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
            let rule = Rule::insert(&[
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
            graceful::wait_rollout_finished(&ns, APP, since, Duration::from_secs(240)).await?;
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
