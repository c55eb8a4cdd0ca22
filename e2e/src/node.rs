//! What a test does on the node itself, as an operator with a shell there would: find the
//! processes of a pod's container and kill them, the way a crash or the OOM killer does. The
//! e2e node is this machine, and the tests run as root.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;

use crate::{Error, Result, wait};

/// The container's status: among the pod's containers, or its init containers (an injected
/// sidecar is a native sidecar: an init container that keeps running).
fn status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    [&status.container_statuses, &status.init_container_statuses]
        .into_iter()
        .flatten()
        .flatten()
        .find(|s| s.name == container)
}

/// The container's ID as the runtime knows it (`containerd://<id>` in the pod's status).
pub fn container_id(pod: &Pod, container: &str) -> Option<String> {
    status(pod, container)?
        .container_id
        .as_deref()?
        .split_once("://")
        .map(|(_, id)| id.to_owned())
}

/// The container's restart count.
pub fn restart_count(pod: &Pod, container: &str) -> i32 {
    status(pod, container).map_or(0, |s| s.restart_count)
}

/// The PIDs in the container's cgroup: the kubelet names each container's cgroup after its ID
/// (`/kubepods/<qos>/pod<uid>/<id>` with the cgroupfs driver, `cri-containerd-<id>.scope` with
/// systemd's), and an ID is 64 hex digits, unique on the node.
pub fn container_pids(id: &str) -> Result<Vec<u32>> {
    let proc = std::fs::read_dir("/proc").map_err(Error::io("reading /proc"))?;
    let mut pids = Vec::new();
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if cgroup.lines().any(|l| l.contains(id)) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// A process's resident memory now, in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(Error::io(format!("reading /proc/{pid}/status")))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| Error::Cluster(format!("no VmRSS for process {pid}")))?;
    Ok(kib / 1024.0)
}

/// The resident memory of the pod's `container` (all its processes), in MiB.
pub fn container_rss_mib(pod: &Pod, container: &str) -> Result<f64> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let id = container_id(pod, container)
        .ok_or_else(|| Error::Cluster(format!("pod {name} has no running {container}")))?;
    container_pids(&id)?.into_iter().map(rss_mib).sum()
}

/// SIGKILLs every process of the pod's `container`, from the node; returns their PIDs.
pub fn kill_container(pod: &Pod, container: &str) -> Result<Vec<u32>> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let id = container_id(pod, container)
        .ok_or_else(|| Error::Cluster(format!("pod {name} has no running {container}")))?;
    let pids = container_pids(&id)?;
    if pids.is_empty() {
        return Err(Error::Cluster(format!(
            "no process of {name}/{container} ({id}) on this node"
        )));
    }
    for pid in &pids {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .map_err(Error::io("kill"))?;
        if !status.success() {
            return Err(Error::Cluster(format!("kill -KILL {pid} failed")));
        }
    }
    Ok(pids)
}

/// Waits until the pod's `container` has restarted more than `before` times and the pod is
/// Ready again; returns the pod.
pub async fn restarted_and_ready(
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    before: i32,
    timeout: Duration,
) -> Result<Pod> {
    wait::until(
        &format!("{name}/{container} restarted and the pod ready"),
        timeout,
        || async {
            let pod = pods.get(name).await?;
            let restarted = restart_count(&pod, container) > before;
            Ok((restarted && wait::is_ready(&pod)).then_some(pod))
        },
    )
    .await
}

/// An iptables rule on this host (the node), deleted when dropped: a failing test must not
/// leave a pod cut off for the rest of the suite.
pub struct IptablesRule(Vec<String>);

impl IptablesRule {
    pub fn insert(spec: &[&str]) -> Result<Self> {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        iptables("-I", &spec)?;
        Ok(Self(spec))
    }
}

impl Drop for IptablesRule {
    fn drop(&mut self) {
        if let Err(e) = iptables("-D", &self.0) {
            eprintln!("could not delete the iptables rule {:?}: {e}", self.0);
        }
    }
}

fn iptables(op: &str, spec: &[String]) -> Result<()> {
    let out = std::process::Command::new("iptables")
        .arg(op)
        .args(spec)
        .output()
        .map_err(Error::io("running iptables"))?;
    crate::cluster::stdout_of(out, || format!("iptables {op} {}", spec.join(" ")))?;
    Ok(())
}
