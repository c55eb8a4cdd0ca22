//! The chart through helm: rendered, linted, installed (helm is built by make cluster-up).

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;

use crate::cluster;
use crate::demo::REGISTRY;
use crate::graceful::OPERATOR_NAMESPACE;

/// The Kubernetes version helm renders for (the e2e cluster's minor).
pub const KUBE_VERSION: &str = "--kube-version=1.33.0";

/// The release e2e/scripts/deploy.sh installs (in graceful::OPERATOR_NAMESPACE).
pub const RELEASE: &str = "graceful";

/// Where deploy.sh pushes the chart, as users pull a release: `helm install <this> --version V`.
pub fn oci_chart() -> String {
    format!("oci://{REGISTRY}/charts/graceful")
}

/// The `--set` that points the chart at the cluster's registry (image.registry is required).
pub fn registry_value() -> String {
    format!("image.registry={REGISTRY}")
}

/// The `--set-file` that makes the webhook require the API server's client certificate, whose
/// CA cluster-up made (e2e/scripts/pki.sh); deploy.sh installs with it, and an upgrade keeps it.
pub fn client_ca_value() -> String {
    let ca = crate::cluster::state_dir().join("pki/webhook-client-ca.crt");
    format!("webhook.clientCA={}", ca.display())
}

/// The chart version (= appVersion = image tag) of the release deploy.sh installed: the
/// workspace's version, marked as a build of these very binaries (images.sh's dev_version).
pub fn deployed_version() -> String {
    let text = helm_ok(&[
        "get",
        "metadata",
        RELEASE,
        "-n",
        OPERATOR_NAMESPACE,
        "-o",
        "json",
    ]);
    let meta: serde_json::Value = serde_json::from_str(&text).expect("helm get metadata JSON");
    meta["version"]
        .as_str()
        .expect("a chart version in helm get metadata")
        .to_owned()
}

/// The same binaries under a later version, pushed beside it by images.sh and deploy.sh
/// (common.sh's upgrade_version): what the upgrade test moves the release to.
pub fn upgrade_version(version: &str) -> String {
    format!("{version}.upgrade")
}

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
    render_release(RELEASE, OPERATOR_NAMESPACE, extra)
}

/// The chart rendered as release `release` in `namespace` (the cluster's registry set), with
/// `extra` helm arguments, one value per document.
pub fn render_release(release: &str, namespace: &str, extra: &[&str]) -> Vec<serde_yaml::Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().expect("a UTF-8 path"),
        KUBE_VERSION,
        "--namespace",
        namespace,
        "--set",
    ];
    let registry = registry_value();
    args.push(&registry);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One version: the workspace's is the chart's `version` and `appVersion` (make release
    /// tags images and chart with it, and the chart's default image tag is its appVersion).
    #[test]
    fn chart_version_and_app_version_are_the_workspace_version() {
        let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
        let chart: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let workspace = env!("CARGO_PKG_VERSION");
        assert_eq!(
            chart["version"].as_str(),
            Some(workspace),
            "Chart.yaml version"
        );
        assert_eq!(
            chart["appVersion"].as_str(),
            Some(workspace),
            "Chart.yaml appVersion"
        );
    }

    /// The registry the tests name is the one the scripts start and push to.
    #[test]
    fn registry_is_the_scripts_registry() {
        let common = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/common.sh");
        let text = std::fs::read_to_string(common).unwrap();
        assert!(
            text.lines()
                .any(|l| l == format!("E2E_REGISTRY={REGISTRY}")),
            "e2e/scripts/common.sh does not say E2E_REGISTRY={REGISTRY}"
        );
    }

    /// images.sh and deploy.sh push the upgrade's version as common.sh's upgrade_version does.
    #[test]
    fn upgrade_version_is_the_scripts_upgrade_version() {
        let common = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/common.sh");
        let text = std::fs::read_to_string(common).unwrap();
        assert_eq!(upgrade_version("V"), "V.upgrade");
        assert!(
            text.contains(r#"upgrade_version() { echo "$1.upgrade"; }"#),
            "common.sh's upgrade_version changed: change chart::upgrade_version with it"
        );
    }
}
