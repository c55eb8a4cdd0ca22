//! The demo app's manifests (design.md: graceful-demo on 8080, `GET /` answers DEMO_VERSION),
//! plain: no sidecar, the default RollingUpdate, a readiness probe. Scenarios change the parts
//! they test (a preStop hook, the grace period, the injection annotation) on the built objects.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::json;

/// The port graceful-demo listens on by default.
pub const DEMO_PORT: u16 = 8080;

/// The cluster's registry (`E2E_REGISTRY` in e2e/scripts/common.sh; a unit test keeps the two
/// equal): `make images` pushes there, the node pulls from there.
pub const REGISTRY: &str = "127.0.0.1:5000";

/// An image as `make images` pushes it: `<registry>/<name>:dev`. Every pod pulls it from the
/// registry if the node does not have it yet (`make images` has the node pull each :dev anew).
pub fn image(name: &str) -> String {
    format!("{REGISTRY}/{name}:dev")
}

/// The demo container: probe on /healthz, version text from DEMO_VERSION.
pub fn container(version: &str) -> serde_json::Value {
    json!({
        "name": "demo",
        "image": image("graceful-demo"),
        "imagePullPolicy": "IfNotPresent",
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
                "imagePullPolicy": "IfNotPresent",
                "args": args,
            }],
        },
    }))
    .expect("pod manifest")
}
