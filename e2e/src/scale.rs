//! graceful at cluster scale, simulated: KWOK's fake nodes (`e2e/scripts/kwok.sh`) take
//! thousands of pods that are Running and Ready without containers, so the real apiserver, the
//! Deployment, ReplicaSet and EndpointSlice controllers, kube-proxy, the webhook and the operator
//! work as in a big cluster. The sidecars injected into those pods never run: what is measured
//! is the operator's part and the webhook's, and a pod's drain is a fake pod leaving at once.
//!
//! A [`Fleet`] is Deployments spread over namespaces, each with a Service and (managed) a
//! GracefulRollout, or (native) none; it grows in place from one size to the next. The
//! measurements: the operator's memory and CPU ([`OperatorProcess`], read from /proc on this
//! host), the time from a template change to the rollout's first step, many rollouts at once
//! against as many native ones, and the operator's API requests per rollout (the apiserver's
//! audit log, [`crate::audit`]). `make scale` (e2e/src/bin/scale.rs) prints them as tables;
//! e2e/tests/scale.rs runs a small fleet in `make test`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use graceful_operator::crd::{GracefulRollout, Phase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::audit::{self, Requests};
use crate::graceful::{self, OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
use crate::namespace::TestNamespace;
use crate::{Error, Result, wait};

/// The fake nodes' label and taint (key=value), as `e2e/scripts/kwok.sh` makes them.
pub const FAKE_NODE_KEY: &str = "kwok.x-k8s.io/node";
pub const FAKE_NODE_VALUE: &str = "fake";
const LEASE: &str = "graceful-operator";
/// How many Deployments are created (or patched) at once.
const CONCURRENCY: usize = 16;
/// How often the fleet's Deployments are listed while waiting, at least; and per pod of the
/// fleet: each look lists every Deployment and GracefulRollout of the fleet, and at 10,000
/// pods looks every 500 ms made this harness the apiserver's biggest client (1,100 Deployments
/// listed four times a second), slowing what it measures.
const POLL: Duration = Duration::from_millis(500);
const POLL_PER_POD: Duration = Duration::from_micros(250);

/// Runs `e2e/scripts/kwok.sh ARGS` (start, nodes N, down, ...), its output on stderr.
pub fn kwok(args: &[&str]) -> Result<()> {
    let status = crate::cluster::script("kwok.sh")
        .args(args)
        .status()
        .map_err(Error::io("running e2e/scripts/kwok.sh"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("kwok.sh {}", args.join(" ")),
            message: status.to_string(),
        })
    }
}

/// The demo, injected, with `replicas` pods placed only on fake nodes.
pub fn fake_deployment(name: &str, replicas: i32) -> Deployment {
    let mut d = graceful::injected_deployment(name, replicas, "v1");
    let mut pod_spec = serde_json::to_value(&d.spec.as_ref().expect("spec").template.spec)
        .expect("pod spec as JSON");
    pod_spec["nodeSelector"] = json!({FAKE_NODE_KEY: FAKE_NODE_VALUE});
    pod_spec["tolerations"] = json!([{"key": FAKE_NODE_KEY, "operator": "Equal", "value": FAKE_NODE_VALUE, "effect": "NoSchedule"}]);
    d.spec.as_mut().expect("spec").template.spec =
        Some(serde_json::from_value(pod_spec).expect("pod spec"));
    d
}

/// Deployments over namespaces: `managed[i]` and `native[i]` are (namespace index, name).
pub struct Fleet {
    pub namespaces: Vec<TestNamespace>,
    pub replicas: i32,
    pub managed: Vec<(usize, String)>,
    pub native: Vec<(usize, String)>,
}

impl Fleet {
    pub async fn new(client: &Client, namespaces: usize, replicas: i32) -> Result<Self> {
        let mut created = Vec::new();
        for _ in 0..namespaces {
            created.push(TestNamespace::create(client, "scale").await?);
        }
        Ok(Self {
            namespaces: created,
            replicas,
            managed: Vec::new(),
            native: Vec::new(),
        })
    }

    /// How long to wait between two looks at the whole fleet.
    fn poll(&self) -> Duration {
        POLL.max(POLL_PER_POD * self.pods() as u32)
    }

    pub fn pods(&self) -> usize {
        (self.managed.len() + self.native.len()) * self.replicas as usize
    }

    /// Adds Deployments until there are `managed` with a GracefulRollout and `native` without,
    /// spread evenly over the namespaces; waits until every one is rolled out (and Healthy).
    pub async fn grow(&mut self, managed: usize, native: usize, timeout: Duration) -> Result<()> {
        let n = self.namespaces.len();
        let new_managed: Vec<(usize, String)> = (self.managed.len()..managed)
            .map(|i| (i % n, format!("m{i:04}")))
            .collect();
        let new_native: Vec<(usize, String)> = (self.native.len()..native)
            .map(|i| (i % n, format!("n{i:04}")))
            .collect();
        let replicas = self.replicas;
        let namespaces = &self.namespaces;
        let create = |(ns, name, managed): (usize, String, bool)| async move {
            let ns = &namespaces[ns];
            ns.apply(&fake_deployment(&name, replicas)).await?;
            ns.apply(&graceful::named_port_service(&name)).await?;
            if managed {
                let gr = graceful::graceful_rollout(&name, json!({"minServingSeconds": 0}));
                ns.apply(&gr).await?;
            }
            Ok::<_, Error>(())
        };
        let all = new_managed
            .iter()
            .map(|(ns, name)| (*ns, name.clone(), true))
            .chain(
                new_native
                    .iter()
                    .map(|(ns, name)| (*ns, name.clone(), false)),
            );
        futures::stream::iter(all)
            .map(create)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        self.managed.extend(new_managed);
        self.native.extend(new_native);
        self.settled(timeout).await
    }

    /// The fleet's Deployments that are rolled out and, where a GracefulRollout manages one,
    /// whose GracefulRollout is Healthy: (namespace index, name).
    async fn done(&self) -> Result<BTreeSet<(usize, String)>> {
        let mut done = BTreeSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let lp = ListParams::default();
            let deploys = ns.api::<Deployment>().list(&lp).await?;
            let grs = ns.api::<GracefulRollout>().list(&lp).await?;
            let phases: BTreeMap<String, Option<Phase>> =
                grs.items.iter().map(|g| (g.name_any(), phase(g))).collect();
            for d in deploys.items.iter().filter(|d| wait::rollout_complete(d)) {
                let name = d.name_any();
                if phases.get(&name).is_none_or(|p| *p == Some(Phase::Healthy)) {
                    done.insert((i, name));
                }
            }
        }
        Ok(done)
    }

    /// Every Deployment rolled out and every GracefulRollout Healthy.
    pub async fn settled(&self, timeout: Duration) -> Result<()> {
        let want = self.managed.len() + self.native.len();
        let mut last = Instant::now();
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.done().await?.len();
            if done == want {
                return Ok(());
            }
            let what = format!("the fleet: {done}/{want} Deployments rolled out and Healthy");
            if Instant::now() > deadline {
                return Err(Error::Timeout(timeout, what));
            }
            if last.elapsed() > Duration::from_secs(15) {
                eprintln!("scale: {what}");
                last = Instant::now();
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Changes the templates of these Deployments at once (as `kubectl rollout restart`), and
    /// waits until each is rolled out (and, managed, its GracefulRollout Healthy again). Returns
    /// each one's time from the change to done.
    pub async fn roll_at_once(
        &self,
        which: &[(usize, String)],
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let started = Instant::now();
        futures::stream::iter(which)
            .map(|(ns, name)| graceful::trigger(&self.namespaces[*ns], name))
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        let mut took: BTreeMap<(usize, String), Duration> = BTreeMap::new();
        let mut last = Instant::now();
        let deadline = started + timeout;
        while took.len() < which.len() {
            for key in self.done().await? {
                if which.contains(&key) {
                    took.entry(key).or_insert_with(|| started.elapsed());
                }
            }
            if Instant::now() > deadline {
                let what = format!("{} rollouts at once: {} done", which.len(), took.len());
                return Err(Error::Timeout(timeout, what));
            }
            if last.elapsed() > Duration::from_secs(15) {
                eprintln!("scale: {}/{} rollouts done", took.len(), which.len());
                last = Instant::now();
            }
            tokio::time::sleep(self.poll()).await;
        }
        Ok(took.into_values().collect())
    }

    /// Time from a template change to the rollout's first step (its GracefulRollout turning
    /// Progressing), one rollout at a time, each finished before the next.
    pub async fn first_step_latency(
        &self,
        samples: usize,
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let mut took = Vec::new();
        for (ns, name) in self.managed.iter().take(samples) {
            let ns = &self.namespaces[*ns];
            let api = ns.api::<GracefulRollout>();
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut events = watcher::watcher(api, config).boxed();
            // The watch is up (its initial list seen) before the change is made.
            while let Some(e) = events
                .try_next()
                .await
                .map_err(|e| Error::Cluster(e.to_string()))?
            {
                if matches!(e, watcher::Event::InitDone) {
                    break;
                }
            }
            let changed = Instant::now();
            graceful::trigger(ns, name).await?;
            let progressing = async {
                while let Some(e) = events
                    .try_next()
                    .await
                    .map_err(|e| Error::Cluster(e.to_string()))?
                {
                    if let watcher::Event::Apply(gr) = e
                        && phase(&gr) == Some(Phase::Progressing)
                    {
                        return Ok(changed.elapsed());
                    }
                }
                Err(Error::Cluster(format!(
                    "the watch of GracefulRollout {name} ended"
                )))
            };
            let seen = tokio::time::timeout(timeout, progressing)
                .await
                .map_err(|_| {
                    Error::Timeout(timeout, format!("GracefulRollout {name} Progressing"))
                })??;
            took.push(seen);
            wait::until(&format!("{name} rolled out"), timeout, || async {
                let d = ns.api::<Deployment>().get(name).await?;
                let gr = ns.api::<GracefulRollout>().get(name).await?;
                Ok(
                    (wait::rollout_complete(&d) && phase(&gr) == Some(Phase::Healthy))
                        .then_some(()),
                )
            })
            .await?;
        }
        Ok(took)
    }
}

/// What real sidecars asked of the apiserver while draining beside the fleet.
pub struct SidecarDrains {
    pub drains: usize,
    pub requests: Requests,
    /// EndpointSlices in their namespace: what a sidecar listing its namespace would read.
    pub slices_in_namespace: usize,
}

impl SidecarDrains {
    pub fn per_drain(&self) -> f64 {
        self.requests.total() as f64 / self.drains.max(1) as f64
    }
}

impl Fleet {
    /// Real sidecars draining in a namespace full of the fleet's Services: an injected
    /// Deployment of `replicas` pods on the real node (the fake nodes are tainted) with a
    /// GracefulRollout, in the fleet's first namespace, rolled once. Returns the requests its
    /// sidecars made (the audit log's, by the namespace's default ServiceAccount, which only
    /// they use), from the template change until every old pod is gone; then removes it.
    pub async fn sidecar_drains(&self, replicas: i32, timeout: Duration) -> Result<SidecarDrains> {
        const NAME: &str = "real";
        let ns = &self.namespaces[0];
        graceful::deploy_managed_demo(ns, NAME, replicas, json!({"minServingSeconds": 0})).await?;
        let since = graceful::trigger(ns, NAME).await?;
        graceful::wait_rollout_finished(ns, NAME, since, timeout).await?;
        graceful::wait_pods_settled(ns, NAME, replicas as usize, timeout).await?;
        let account = format!("system:serviceaccount:{}:default", ns.name);
        let requests = audit::requests_of(&account, since, Timestamp::now())?;
        let slices_in_namespace = ns
            .api::<EndpointSlice>()
            .list(&ListParams::default())
            .await?
            .items
            .len();
        // Gone before the fleet is counted again (it counts every Deployment of its namespaces).
        let dp = DeleteParams::default();
        ns.api::<GracefulRollout>().delete(NAME, &dp).await?;
        ns.api::<Service>().delete(NAME, &dp).await?;
        ns.api::<Deployment>().delete(NAME, &dp).await?;
        wait::until(
            &format!("GracefulRollout and Deployment {NAME} gone"),
            timeout,
            || async {
                let gr = ns.api::<GracefulRollout>().get_opt(NAME).await?;
                let d = ns.api::<Deployment>().get_opt(NAME).await?;
                Ok((gr.is_none() && d.is_none()).then_some(()))
            },
        )
        .await?;
        Ok(SidecarDrains {
            drains: replicas as usize,
            requests,
            slices_in_namespace,
        })
    }
}

fn phase(gr: &GracefulRollout) -> Option<Phase> {
    gr.status.as_ref().map(|s| s.phase)
}

/// The leading operator replica's process on this host, found by its pod name (the Lease's
/// holder) in the process's environment.
pub struct OperatorProcess {
    pub pid: u32,
    pub pod: String,
    /// The operator's service account, as the audit log names it.
    pub username: String,
}

impl OperatorProcess {
    pub async fn leader(client: &Client) -> Result<Self> {
        let lease = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE)
            .get(LEASE)
            .await?;
        let pod = lease
            .spec
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| Error::Cluster("no operator holds the Lease".into()))?;
        let pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
            .list(&ListParams::default().labels(OPERATOR_SELECTOR))
            .await?;
        let sa = pods
            .items
            .iter()
            .find(|p| p.name_any() == pod)
            .and_then(|p| p.spec.as_ref()?.service_account_name.clone())
            .ok_or_else(|| Error::Cluster(format!("leader pod {pod} not found")))?;
        let pid = pid_with_env("graceful-operat", &format!("POD_NAME={pod}"))
            .ok_or_else(|| Error::Cluster(format!("no process of pod {pod} on this host")))?;
        Ok(Self {
            pid,
            pod,
            username: format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{sa}"),
        })
    }

    /// Resident memory now, in MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        crate::node::rss_mib(self.pid).map_err(|_| {
            Error::Cluster(format!(
                "the leading operator's process ({}, pod {}) is gone: did it lose the Lease? (its log: kubectl logs -p)",
                self.pid, self.pod
            ))
        })
    }

    /// CPU time used so far (user + system), from /proc/PID/stat.
    pub fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map_err(Error::io("reading the operator's /proc stat"))?;
        // Fields after the command (which may hold spaces) in parentheses.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command.
        let hz = 100; // USER_HZ on Linux
        Ok(Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz))
    }

    /// Samples memory every 500 ms while `work` runs: (its output, peak RSS MiB, CPU cores used).
    pub async fn during<T>(&self, work: impl Future<Output = Result<T>>) -> Result<(T, f64, f64)> {
        let (cpu0, wall0) = (self.cpu()?, Instant::now());
        let mut peak = self.rss_mib()?;
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                out = &mut work => break out?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => peak = peak.max(self.rss_mib()?),
            }
        };
        peak = peak.max(self.rss_mib()?);
        let cores = (self.cpu()? - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
        Ok((out, peak, cores))
    }

    /// The operator's API requests received in `[from, to)`.
    pub fn requests(&self, from: Timestamp, to: Timestamp) -> Result<Requests> {
        audit::requests_of(&self.username, from, to)
    }
}

/// The pid of a process named `comm` (the kernel keeps 15 bytes of it) whose environment holds
/// `entry`.
fn pid_with_env(comm: &str, entry: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if name.trim_end() != comm {
            return None;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        env.split(|b| *b == 0)
            .any(|kv| kv == entry.as_bytes())
            .then_some(pid)
    })
}

/// The p-quantile (0..=1) of some durations, nearest rank.
pub fn quantile(durations: &[Duration], q: f64) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// How many fake nodes are Ready.
pub async fn fake_nodes_ready(client: &Client) -> Result<usize> {
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{FAKE_NODE_KEY}={FAKE_NODE_VALUE}")))
        .await?;
    Ok(nodes
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}
