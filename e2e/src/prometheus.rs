//! A real Prometheus (Debian's package, installed by scripts/deps.sh) on this host, for one
//! test: it scrapes the injected sidecars and the operator (found in the API, as Kubernetes
//! service discovery would find them) and the API server's own metrics, and evaluates the
//! chart's alert rules. Stopped and its data removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::cluster;
use crate::wait::{self, http_get};
use crate::{Error, Result};

/// Where it listens: loopback only.
const ADDR: &str = "127.0.0.1:19090";
/// Scrape and rule evaluation interval: short, so a test sees a change within seconds.
pub const INTERVAL: Duration = Duration::from_secs(5);

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    discovery: tokio::task::JoinHandle<()>,
}

impl Prometheus {
    /// Starts it with `rules` (a Prometheus rule file) and waits until it is ready.
    pub async fn start(client: Client, rules: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("graceful-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io("prometheus dir"))?;
        std::fs::write(dir.join("rules.yaml"), rules).map_err(Error::io("rules.yaml"))?;
        std::fs::write(dir.join("prometheus.yml"), config()?).map_err(Error::io("config"))?;
        std::fs::write(dir.join("targets.json"), "[]").map_err(Error::io("targets"))?;
        let discovery = tokio::spawn(discover(client, dir.join("targets.json")));
        let log = std::fs::File::create(dir.join("prometheus.log")).map_err(Error::io("log"))?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={ADDR}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(Error::io(
                "starting prometheus (scripts/deps.sh installs Debian's package)",
            ))?;
        let prometheus = Prometheus {
            child,
            dir,
            discovery,
        };
        wait::until("prometheus ready", Duration::from_secs(30), || async {
            Ok(http_get(ADDR, "/-/ready")
                .await
                .ok()
                .filter(|(status, _)| status.contains(" 200 "))
                .map(|_| ()))
        })
        .await?;
        Ok(prometheus)
    }

    /// `GET /api/v1/<path>`'s `data`, or the error Prometheus gave.
    async fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http_get(ADDR, &format!("/api/v1/{path}")).await?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| Error::Report(format!("prometheus {path}: {status} {e}: {body}")))?;
        if v["status"] != "success" {
            return Err(Error::Report(format!("prometheus {path}: {body}")));
        }
        Ok(v["data"].clone())
    }

    /// The series `expr` returns with at least one sample in the last `window` (every
    /// `INTERVAL`), as a dashboard drawing that window would show them.
    /// Prometheus' own graph page with one graph panel per `(expr)`, over the last `range`.
    pub fn graph_url(&self, exprs: &[String], range: Duration) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (i, expr) in exprs.iter().enumerate() {
            query.append_pair(&format!("g{i}.expr"), expr);
            query.append_pair(&format!("g{i}.tab"), "0");
            query.append_pair(
                &format!("g{i}.range_input"),
                &format!("{}s", range.as_secs()),
            );
        }
        format!("http://{ADDR}/graph?{}", query.finish())
    }

    pub async fn series_over(&self, expr: &str, window: Duration) -> Result<usize> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .append_pair("start", &(end - window.as_secs()).to_string())
            .append_pair("end", &end.to_string())
            .append_pair("step", &INTERVAL.as_secs().to_string())
            .finish();
        let data = self.api(&format!("query_range?{query}")).await?;
        Ok(data["result"].as_array().map_or(0, |r| {
            r.iter()
                .filter(|s| s["values"].as_array().is_some_and(|v| !v.is_empty()))
                .count()
        }))
    }

    /// The alerts now firing: (name, labels).
    pub async fn firing(&self) -> Result<Vec<(String, Value)>> {
        let data = self.api("alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect())
    }

    /// The targets of `job` that are up.
    pub async fn targets_up(&self, job: &str) -> Result<usize> {
        let data = self.api("targets?state=active").await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["labels"]["job"] == job && t["health"] == "up")
            .count())
    }

    /// Its own log, for a failure's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.discovery.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Scrape configuration: the sidecars and the operator from `targets.json` (file discovery,
/// written from the API by `discover`), and the API server with the e2e admin credentials.
fn config() -> Result<String> {
    let pki = cluster::state_dir().join("pki");
    let pki = pki.display();
    Ok(format!(
        r#"global:
  scrape_interval: {interval}s
  evaluation_interval: {interval}s
rule_files: [rules.yaml]
scrape_configs:
  - job_name: graceful
    # The operator's series name the namespace of what they count; the target's is its own.
    honor_labels: true
    file_sd_configs: [{{files: [targets.json], refresh_interval: {interval}s}}]
    relabel_configs:
      - {{source_labels: [job_name], target_label: job}}
      - {{regex: job_name, action: labeldrop}}
  - job_name: apiserver
    scheme: https
    tls_config: {{ca_file: {pki}/ca.crt, cert_file: {pki}/admin.crt, key_file: {pki}/admin.key}}
    static_configs: [{{targets: ["{apiserver}"]}}]
"#,
        interval = INTERVAL.as_secs(),
        apiserver = cluster::apiserver_addr()?,
    ))
}

/// What Kubernetes service discovery would find, written where file discovery reads it until
/// the task is aborted: every injected pod's admin port (job graceful-sidecars) and every
/// operator pod's metrics port (job graceful-operator), labelled with namespace and pod.
/// Debian builds Prometheus without Kubernetes discovery (client-go is not packaged), so the
/// test does that part.
async fn discover(client: Client, file: PathBuf) {
    let sources = [
        (
            "graceful-sidecars",
            None,
            "graceful.dev/injected=true",
            9901,
        ),
        (
            "graceful-operator",
            Some("graceful-system"),
            "app.kubernetes.io/component=operator",
            8080,
        ),
    ];
    loop {
        let mut groups = Vec::new();
        for (job, namespace, selector, port) in sources {
            let api: Api<Pod> = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let Ok(pods) = api.list(&ListParams::default().labels(selector)).await else {
                continue;
            };
            for pod in pods.items {
                let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                    continue;
                };
                groups.push(json!({
                    "targets": [format!("{ip}:{port}")],
                    "labels": {
                        "job_name": job,
                        "namespace": pod.namespace().unwrap_or_default(),
                        "pod": pod.name_any(),
                    },
                }));
            }
        }
        let tmp = file.with_extension("tmp");
        if std::fs::write(&tmp, Value::Array(groups).to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
