//! A fresh namespace per test. Dropping it deletes the namespace (without waiting); a test that
//! panics first gets the namespace's pods, events and pod logs printed, so a failure in CI can
//! be read without the cluster.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::cluster::{kubectl, kubectl_output};
use crate::{Error, Result};

/// Field manager of everything the harness applies.
pub const FIELD_MANAGER: &str = "graceful-e2e";

pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<suffix>`, labelled so leftovers are easy to find.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("e2e-{prefix}-{:x}", (nanos as u64) & 0xff_ffff);
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"graceful.dev/e2e": "true"}}
        }))
        .expect("namespace manifest");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        eprintln!("namespace {name} created");
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Server-side apply of one object into this namespace.
    pub async fn apply<K>(&self, obj: &K) -> Result<K>
    where
        K: Resource<Scope = NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        Ok(self
            .api::<K>()
            .patch(&name, &params, &Patch::Apply(obj))
            .await?)
    }

    /// Pods, events and the logs of every container in the namespace, on stderr.
    pub fn print_diagnostics(&self) {
        let ns = self.name.as_str();
        eprintln!("===== diagnostics of namespace {ns} =====");
        kubectl_print(&[
            "get",
            "deploy,rs,pods,svc,endpointslices",
            "-o",
            "wide",
            "-n",
            ns,
        ]);
        kubectl_print(&["get", "events", "--sort-by=.lastTimestamp", "-n", ns]);
        // Which endpoints the slices call ready, and which ones kube-proxy sends traffic to:
        // a Service that does not serve is one of the two lagging.
        kubectl_print(&[
            "get",
            "endpointslices",
            "-n",
            ns,
            "-o",
            "custom-columns=NAME:.metadata.name,ADDRESSES:.endpoints[*].addresses[0],\
             READY:.endpoints[*].conditions.ready,TERMINATING:.endpoints[*].conditions.terminating",
        ]);
        print_proxy_rules(ns);
        let pods = kubectl_output(&["get", "pods", "-o", "name", "-n", ns]).unwrap_or_default();
        for pod in pods.lines().filter(|l| !l.is_empty()) {
            kubectl_print(&[
                "logs",
                pod,
                "--all-containers",
                "--prefix",
                "--tail=200",
                "-n",
                ns,
            ]);
        }
    }
}

/// kube-proxy's NAT rules for the namespace's Services (it runs in iptables mode on this host).
fn print_proxy_rules(ns: &str) {
    eprintln!("--- iptables-save -t nat | grep '\"{ns}/'");
    match std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
    {
        Ok(out) => {
            let needle = format!("\"{ns}/");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(&needle))
                .for_each(|l| eprintln!("{l}"));
        }
        Err(e) => eprintln!("running iptables-save: {e}"),
    }
}

/// One kubectl command and its output (or why it could not run), on stderr.
fn kubectl_print(args: &[&str]) {
    eprintln!("--- kubectl {}", args.join(" "));
    match kubectl().and_then(|mut c| c.args(args).output().map_err(Error::io("running kubectl"))) {
        Ok(out) => eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("{e}"),
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        if std::env::var_os("GRACEFUL_E2E_KEEP").is_some() {
            eprintln!("namespace {} kept (GRACEFUL_E2E_KEEP)", self.name);
            return;
        }
        // Synchronous on purpose: Drop cannot await, and a panicking test must clean up too.
        let deleted = kubectl().and_then(|mut c| {
            c.args(["delete", "namespace", &self.name, "--wait=false"])
                .output()
                .map_err(Error::io("running kubectl"))
        });
        if let Err(e) = deleted {
            eprintln!("could not delete namespace {}: {e}", self.name);
        }
    }
}
