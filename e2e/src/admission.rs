//! Admission as pods meet it: dry-run pod creations that show whether the webhook injected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::demo;
use crate::namespace::TestNamespace;

/// Asks the API server every 200 ms to create an annotated pod (a dry run: admission runs, and
/// the injection webhook is called, but nothing is stored) and counts the answers that came
/// back without the sidecar: with failurePolicy Ignore, that is a pod started without graceful.
pub struct AdmissionProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64, Vec<String>)>,
}

impl AdmissionProbe {
    pub fn start(ns: &TestNamespace) -> Self {
        let pods: Api<Pod> = ns.api();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "probe", "labels": {"app": "probe"},
                         "annotations": {"graceful.dev/inject": "true"}},
            "spec": {"terminationGracePeriodSeconds": 40, "containers": [demo::container("probe")]},
        }))
        .expect("probe pod");
        let task = tokio::spawn(async move {
            let dry_run = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let (mut answered, mut not_injected) = (0, 0);
            let mut missed = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                match pods.create(&dry_run, &pod).await {
                    Ok(p) => {
                        answered += 1;
                        let inits = p.spec.and_then(|s| s.init_containers).unwrap_or_default();
                        if !inits.iter().any(|c| c.name == "graceful-sidecar") {
                            not_injected += 1;
                            missed.push(format!("{:?}", k8s_openapi::jiff::Timestamp::now()));
                        }
                    }
                    Err(e) => missed.push(format!("error: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()))
                    .await;
            }
            (answered, not_injected, missed)
        });
        Self { stop, task }
    }

    /// (pod creations answered, of which without the sidecar, what went wrong and when)
    pub async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("admission probe")
    }
}
