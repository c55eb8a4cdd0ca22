//! The demo app's manifests (design.md: graceful-demo on 8080, `GET /` answers DEMO_VERSION),
//! plain: no sidecar, the default RollingUpdate, a readiness probe. Scenarios change the parts
//! they test (a preStop hook, the grace period, the injection annotation) on the built objects.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::json;

/// The port graceful-demo listens on by default.
pub const DEMO_PORT: u16 = 8080;

/// A local image name as `make images` imports it (GRACEFUL_IMAGE_TAG overrides the tag).
pub fn image(name: &str) -> String {
    let tag = std::env::var("GRACEFUL_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("localhost/{name}:{tag}")
}

/// The demo container: probe on /healthz, version text from DEMO_VERSION.
pub fn container(version: &str) -> serde_json::Value {
    json!({
        "name": "demo",
        "image": image("graceful-demo"),
        "imagePullPolicy": "Never",
        "env": [{"name": "DEMO_VERSION", "value": version}],
        "ports": [{"name": "http", "containerPort": DEMO_PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": DEMO_PORT},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    })
}

/// Deployment `name` with `replicas` pods labelled `app: name`, default strategy.
pub fn deployment(name: &str, replicas: i32, version: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container(version)]},
            },
        },
    }))
    .expect("demo deployment manifest")
}

/// ClusterIP Service `name` on port 80 in front of the pods labelled `app: name`.
pub fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": DEMO_PORT}],
        },
    }))
    .expect("demo service manifest")
}

/// A bare pod running one image (full name) with the given arguments (`app: name` for log
/// collection).
pub fn pod(name: &str, image: &str, args: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "args": args,
            }],
        },
    }))
    .expect("pod manifest")
}
