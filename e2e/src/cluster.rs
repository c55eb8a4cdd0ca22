//! Where the e2e cluster is and how to reach it: the kubeconfig cluster-up wrote, kubectl and
//! the tools scripts/deps.sh installed. Nothing needs exporting: the defaults match
//! e2e/scripts/common.sh, and KUBECONFIG, GRACEFUL_STATE and GRACEFUL_CACHE override them.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{Error, Result};

/// Where cluster-up keeps the cluster's state (its PKI among it).
pub fn state_dir() -> PathBuf {
    std::env::var_os("GRACEFUL_STATE")
        .unwrap_or_else(|| "/var/lib/graceful-e2e".into())
        .into()
}

/// The admin kubeconfig of the e2e cluster.
pub fn kubeconfig_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    state_dir().join("admin.kubeconfig")
}

/// The API server's host:port, from the kubeconfig.
pub fn apiserver_addr() -> Result<String> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| Error::Kubeconfig {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    kubeconfig
        .clusters
        .iter()
        .find_map(|c| c.cluster.as_ref()?.server.clone())
        .map(|s| {
            s.trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned()
        })
        .ok_or_else(|| Error::Cluster(format!("no server in {}", path.display())))
}

/// One of `e2e/scripts/` as a command, to be given its arguments.
pub fn script(name: &str) -> Command {
    Command::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name),
    )
}

/// Runs `command`; its output goes to the test's stderr, a failure names it.
pub async fn run(command: Command) -> Result<()> {
    let shown = format!("{:?}", command.get_program());
    let status = tokio::process::Command::from(command)
        .status()
        .await
        .map_err(Error::io(format!("running {shown}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: shown,
            message: status.to_string(),
        })
    }
}

/// Restarts one of the cluster's daemons (`kube-apiserver`, `etcd`, ...) as a crash or an
/// upgrade would, and waits until it serves again (`e2e/scripts/restart-daemon.sh`); returns
/// how long that took. Async: a load running beside it must go on being read.
pub async fn restart_daemon(name: &str) -> Result<std::time::Duration> {
    let started = std::time::Instant::now();
    let mut restart = script("restart-daemon.sh");
    restart.arg(name);
    run(restart).await?;
    Ok(started.elapsed())
}

pub async fn client() -> Result<Client> {
    let path = kubeconfig_path();
    let kubeconfig_error = |message: String| Error::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| kubeconfig_error(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| kubeconfig_error(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// A tool installed by scripts/deps.sh or build-kube.sh into $GRACEFUL_CACHE/bin. Missing is an
/// error, never a reason to skip.
pub fn tool(name: &str) -> Result<PathBuf> {
    // make compat runs another Kubernetes minor: its own kubectl, within kubectl's skew.
    if let Some(dir) = std::env::var_os("GRACEFUL_KUBE_BIN") {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    let cache = std::env::var_os("GRACEFUL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/graceful")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/graceful"));
    let path = cache.join("bin").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingTool {
            tool: name.into(),
            path: path.display().to_string(),
        })
    }
}

/// kubectl (the cluster's own build) pointed at the e2e cluster.
pub fn kubectl() -> Result<Command> {
    let mut cmd = Command::new(tool("kubectl")?);
    cmd.arg("--kubeconfig").arg(kubeconfig_path());
    Ok(cmd)
}

/// Runs kubectl and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn kubectl_output(args: &[&str]) -> Result<String> {
    let out = kubectl()?
        .args(args)
        .output()
        .map_err(Error::io("running kubectl"))?;
    stdout_of(out, || format!("kubectl {}", args.join(" ")))
}

/// The stdout of a command that has run; a non-zero exit is an error naming the command
/// (`command()`) and carrying its stderr.
pub fn stdout_of(out: Output, command: impl FnOnce() -> String) -> Result<String> {
    if !out.status.success() {
        return Err(Error::Command {
            command: command(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs kubectl with `input` on its stdin (a manifest for `apply -f -`); returns its output
/// whatever the exit status, for the caller to judge.
pub fn kubectl_with_input(args: &[&str], input: &str) -> Result<Output> {
    let mut child = kubectl()?
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("running kubectl"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(Error::io("writing to kubectl"))?;
    child
        .wait_with_output()
        .map_err(Error::io("waiting for kubectl"))
}

/// The node's InternalIP: the host's address on the pod bridge, where pods and the kubelet
/// can reach a server the test runs on the host.
pub async fn node_ip(client: &Client) -> Result<String> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    nodes
        .items
        .iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
        .ok_or_else(|| Error::Cluster("no node with an InternalIP".into()))
}

/// The apiserver's port as pods reach it (the `default/kubernetes` Service's endpoint).
pub async fn apiserver_port(client: &kube::Client) -> Result<i32> {
    let slices = kube::Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
        client.clone(),
        "default",
    )
    .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
    .await?;
    slices
        .items
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find_map(|p| p.port)
        .ok_or_else(|| Error::Cluster("the kubernetes Service has no endpoint port".into()))
}
