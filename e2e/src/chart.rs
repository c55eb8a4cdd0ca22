//! The chart through helm: rendered, linted, installed (helm is built by make cluster-up).

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;

use crate::cluster;

/// The Kubernetes version helm renders for (the e2e cluster's minor).
pub const KUBE_VERSION: &str = "--kube-version=1.33.0";

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/graceful")
}

/// Runs helm against the e2e cluster; returns (success, stdout + stderr).
pub fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(cluster::tool("helm").expect("helm (built by make cluster-up)"))
        .args(args)
        .env("KUBECONFIG", cluster::kubeconfig_path())
        .output()
        .expect("running helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn helm_ok(args: &[&str]) -> String {
    let (ok, text) = helm(args);
    assert!(ok, "helm {} failed:\n{text}", args.join(" "));
    text
}

/// The chart rendered as the e2e cluster installs it (release graceful in graceful-system),
/// with `extra` helm arguments, one value per document.
pub fn render(extra: &[&str]) -> Vec<serde_yaml::Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "graceful",
        chart.to_str().expect("a UTF-8 path"),
        KUBE_VERSION,
        "--namespace",
        "graceful-system",
    ];
    args.extend(extra);
    let rendered = helm_ok(&args);
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The chart's alert rules as a Prometheus rule file (the PrometheusRule's spec).
pub fn alert_rules() -> String {
    let docs = render(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    serde_yaml::to_string(&docs[0]["spec"]).expect("rules as YAML")
}
