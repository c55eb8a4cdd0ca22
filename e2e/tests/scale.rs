//! The scale measurement's small version (issue 13; `make scale` is the big one): KWOK fake nodes
//! in the e2e cluster, a fleet of injected Deployments on them, GracefulRollouts and native
//! rollouts at once. What must hold at any size: every rollout finishes; the operator never lists
//! or watches a whole namespace (or the cluster) of what it does not own (but for the webhook's
//! lookup of the namespace's Services), so its requests follow the rollout's own pods; its memory stays within the 128 MiB target; a template change reaches
//! the first step within a second at rest. Real sidecars draining in one of the fleet's
//! namespaces make at most a LIST and a WATCH of their own Services' EndpointSlices each,
//! however many the namespace holds.

use std::time::Duration;

use graceful_e2e::cluster;
use graceful_e2e::scale::{self, Fleet, OperatorProcess, quantile};
use k8s_openapi::jiff::Timestamp;

const NODES: usize = 4;
const REPLICAS: i32 = 5;
const MANAGED: usize = 12;
const AT_ONCE: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(300);
/// What a rollout may cost the operator's process (controller and webhook): per pod replaced
/// (a reconcile of 4 reads on each of the Deployment's status changes, the status writes, the
/// webhook's lookups), and per second it lasts (a reconcile every 2 s while it progresses).
/// Measured: 166-169 for 5 pods in 9.4-11 s; a request per pod or per second more breaks it.
const REQUESTS_PER_POD: f64 = 30.0;
const REQUESTS_PER_SECOND: f64 = 5.0;
/// Real injected pods drained beside the fleet.
const REAL_PODS: i32 = 3;

/// Fake nodes and their pods go even when the test fails: the rest of the suite runs on the
/// real node only.
struct Kwok;

impl Drop for Kwok {
    fn drop(&mut self) {
        if let Err(e) = scale::kwok(&["down"]) {
            eprintln!("kwok down: {e}");
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the chart (make e2e)"]
async fn many_rollouts_at_once_cost_the_operator_what_their_pods_do() {
    let client = cluster::client().await.unwrap();
    scale::kwok(&["start"]).unwrap();
    let _kwok = Kwok;
    scale::kwok(&["nodes", &NODES.to_string()]).unwrap();
    let mut fleet = Fleet::new(&client, 2, REPLICAS).await.unwrap();
    fleet.grow(MANAGED, AT_ONCE, TIMEOUT).await.unwrap();
    let op = OperatorProcess::leader(&client).await.unwrap();

    let first = fleet.first_step_latency(5, TIMEOUT).await.unwrap();
    eprintln!("template change to first step: {first:?}");

    let from = Timestamp::now();
    let (took, rss, cores) = op
        .during(fleet.roll_at_once(&fleet.managed[..AT_ONCE], TIMEOUT))
        .await
        .unwrap();
    let requests = op.requests(from, Timestamp::now()).unwrap();
    let native = fleet
        .roll_at_once(&fleet.native[..AT_ONCE], TIMEOUT)
        .await
        .unwrap();
    let per_rollout = requests.total() as f64 / AT_ONCE as f64;
    eprintln!(
        "{AT_ONCE} GracefulRollouts at once: p50 {:?}, all {:?}; native p50 {:?}, all {:?}; operator {rss:.1} MiB peak, {cores:.3} cores; {per_rollout:.1} API requests per rollout",
        quantile(&took, 0.5),
        quantile(&took, 1.0),
        quantile(&native, 0.5),
        quantile(&native, 1.0)
    );
    for ((verb, resource), n) in requests.by_verb_and_resource() {
        eprintln!(
            "  {verb} {resource}: {:.2} per rollout",
            n as f64 / AT_ONCE as f64
        );
    }

    // It owns every GracefulRollout, and the webhook lists the namespace's Services for each pod
    // it injects (which select it) and, when some do, what may name them (the data planes in
    // front: docs/data-planes.md); the rest must name what it reads.
    const READ_WHOLE: [&str; 5] = [
        "gracefulrollouts",
        "services",
        "ingresses",
        "httproutes",
        "targetgroupbindings",
    ];
    let unselected: Vec<_> = requests
        .unselected()
        .into_iter()
        .filter(|((_, resource), _)| !READ_WHOLE.contains(&resource.as_str()))
        .collect();
    assert!(
        unselected.is_empty(),
        "the operator read whole namespaces of what it does not own: {unselected:?}"
    );
    let longest = quantile(&took, 1.0).as_secs_f64();
    let bound = REQUESTS_PER_POD * f64::from(REPLICAS) + REQUESTS_PER_SECOND * longest;
    assert!(
        per_rollout <= bound,
        "{per_rollout:.1} requests per rollout of {REPLICAS} pods in at most {longest:.1} s (bound {bound:.0})"
    );
    assert!(rss < 128.0, "operator RSS {rss:.1} MiB");

    let sidecars = fleet.sidecar_drains(REAL_PODS, TIMEOUT).await.unwrap();
    let by = sidecars.requests.by_verb_and_resource();
    eprintln!(
        "{REAL_PODS} real sidecars drained beside {} EndpointSlices: {:.2} API requests per drain: {by:?}",
        sidecars.slices_in_namespace,
        sidecars.per_drain()
    );
    // At most one LIST and one WATCH per drain, of its own Services' EndpointSlices, by name.
    assert!(
        sidecars.slices_in_namespace > (MANAGED + AT_ONCE) / 2,
        "the namespace holds its share of the fleet's EndpointSlices, and the real one's: {}",
        sidecars.slices_in_namespace
    );
    assert!(
        sidecars.requests.unselected().is_empty(),
        "a sidecar read its whole namespace: {by:?}"
    );
    for ((verb, resource), n) in &by {
        assert!(
            resource == "endpointslices" && ["list", "watch"].contains(&verb.as_str()),
            "a sidecar asked for {verb} {resource}"
        );
        assert!(
            *n <= REAL_PODS as u64,
            "{n} {verb} {resource} for {REAL_PODS} drains"
        );
    }
    assert!(
        quantile(&first, 1.0) < Duration::from_secs(1),
        "template change to first step: {first:?}"
    );
}
