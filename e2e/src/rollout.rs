//! Rollouts measured under steady load: the baseline every later scenario is compared with
//! (the plain demo, default RollingUpdate) and the same measurement for any other setup.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::demo;
use crate::load::{Load, LoadReport};
use crate::namespace::TestNamespace;
use crate::{Result, wait};

/// What a series of rollouts under load showed.
#[derive(Clone, Debug, Default)]
pub struct RolloutFigures {
    /// One report per rollout, in order.
    pub rollouts: Vec<LoadReport>,
    /// Wall time of each rollout, trigger to fully rolled out.
    pub wall: Vec<Duration>,
}

impl RolloutFigures {
    pub fn total(&self) -> LoadReport {
        let mut total = LoadReport::default();
        for r in &self.rollouts {
            total.merge(r);
        }
        total
    }
}

impl std::fmt::Display for RolloutFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (r, wall)) in self.rollouts.iter().zip(&self.wall).enumerate() {
            writeln!(
                f,
                "rollout {}: {r}, rolled out in {:.1}s",
                i + 1,
                wall.as_secs_f64()
            )?;
        }
        write!(
            f,
            "total over {} rollouts: {}",
            self.rollouts.len(),
            self.total()
        )
    }
}

/// Triggers a rollout the way `kubectl rollout restart` does: a new template annotation.
pub async fn restart(ns: &TestNamespace, name: &str) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": now.to_string()
    }}}}});
    ns.api::<Deployment>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Rolls Deployment `name` out `count` times, one after the other, each under `load` against
/// `url`, and returns vegeta's counts per rollout.
pub async fn rollouts_under_load(
    ns: &TestNamespace,
    name: &str,
    url: &str,
    load: &Load,
    count: usize,
    rollout_timeout: Duration,
) -> Result<RolloutFigures> {
    let api = ns.api::<Deployment>();
    let mut figures = RolloutFigures::default();
    for i in 1..=count {
        let (wall, report) = load
            .during(url, async {
                let started = Instant::now();
                restart(ns, name).await?;
                wait::rollout(&api, name, rollout_timeout).await?;
                Ok::<_, crate::Error>(started.elapsed())
            })
            .await?;
        let wall = wall?;
        eprintln!(
            "rollout {i}/{count}: {report}, rolled out in {:.1}s",
            wall.as_secs_f64()
        );
        figures.rollouts.push(report);
        figures.wall.push(wall);
    }
    Ok(figures)
}

/// The plain demo `name` (3 replicas, no sidecar) behind its ClusterIP Service, rolled out and
/// served by all three: the Service's ClusterIP.
pub async fn deploy_plain(ns: &TestNamespace, name: &str) -> Result<String> {
    ns.apply(&demo::deployment(name, 3, "v1")).await?;
    ns.apply(&demo::service(name)).await?;
    wait::rollout(&ns.api(), name, Duration::from_secs(120)).await?;
    let ip = wait::cluster_ip(&ns.api(), name).await?;
    wait::service_serving(&ns.api(), name, &ip, 80, 3, Duration::from_secs(60)).await?;
    Ok(ip)
}

/// The baseline: the plain demo (3 replicas, no sidecar, default RollingUpdate) behind a
/// ClusterIP Service, rolled out `count` times under `load` sent from this host to the
/// ClusterIP.
pub async fn baseline(ns: &TestNamespace, load: &Load, count: usize) -> Result<RolloutFigures> {
    let name = "demo";
    let ip = deploy_plain(ns, name).await?;
    let url = format!("http://{ip}/");
    eprintln!(
        "baseline: {count} rollouts of deployment {name}, {} req/s over {} keep-alive connections to {url}",
        load.rate, load.connections
    );
    rollouts_under_load(ns, name, &url, load, count, Duration::from_secs(180)).await
}
