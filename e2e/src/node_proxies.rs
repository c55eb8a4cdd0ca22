//! Several nodes' data planes on this one node (issue 25): network namespaces, each with its own
//! kube-proxy, made by `e2e/scripts/node-proxies.sh` ([`NodeProxies`]). A client sent from a
//! namespace ([`crate::load::Load::netns`]) reaches ClusterIPs through that namespace's
//! kube-proxy only; [`crate::kube_proxy::RouteWatch::start_in`] says when each let a pod go.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::script;
use crate::{Error, Result};

/// One node's data plane: its network namespace, its address there, how late its kube-proxy
/// hears of changes.
#[derive(Clone, Debug)]
pub struct NodeNs {
    pub netns: String,
    pub addr: String,
    pub lag_seconds: u64,
}

/// `node-proxies.sh up N` until dropped, then `down`.
pub struct NodeProxies {
    pub nodes: Vec<NodeNs>,
}

impl NodeProxies {
    /// Brings up `n` namespaces with their kube-proxies (blocking: call it before tasks that must
    /// keep running). `relay` is the lag relay's binary (`CARGO_BIN_EXE_lag_relay` in a test);
    /// without it the script builds one.
    pub fn up(n: usize, relay: Option<&Path>) -> Result<Self> {
        let mut up = script("node-proxies.sh");
        up.args(["up", &n.to_string()]);
        if let Some(relay) = relay {
            up.env("GRACEFUL_LAG_RELAY", relay);
        }
        let out = up
            .stderr(Stdio::inherit())
            .output()
            .map_err(Error::io("running e2e/scripts/node-proxies.sh up"))?;
        // From here on `down` runs on drop, whatever `up` did.
        let mut proxies = NodeProxies { nodes: Vec::new() };
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("node-proxies.sh up {n}"),
                message: out.status.to_string(),
            });
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [netns, addr, lag] = f[..] else {
                return Err(Error::Cluster(format!("node-proxies.sh up said {line:?}")));
            };
            proxies.nodes.push(NodeNs {
                netns: netns.into(),
                addr: addr.into(),
                lag_seconds: lag
                    .parse()
                    .map_err(|_| Error::Cluster(format!("node-proxies.sh up: lag in {line:?}")))?,
            });
        }
        if proxies.nodes.len() != n {
            return Err(Error::Cluster(format!(
                "node-proxies.sh up {n} named {} namespaces",
                proxies.nodes.len()
            )));
        }
        Ok(proxies)
    }
}

impl Drop for NodeProxies {
    fn drop(&mut self) {
        let out = script("node-proxies.sh").arg("down").output();
        match out {
            Ok(out) if out.status.success() => {}
            other => eprintln!("node-proxies.sh down failed: {other:?}"),
        }
    }
}

/// `program` run in network namespace `netns` (`ip netns exec` execs it, so the pid is the
/// program's), or as is when `None`.
pub fn command_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}
