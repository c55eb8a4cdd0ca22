//! The `GracefulRollout` custom resource (`graceful.dev/v1alpha1`): what users apply, and the
//! status the controller reports. `crds/` is generated from these types by the `crdgen` binary.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Rolls out a Deployment's pods in an order that never leaves traffic without a serving pod and
/// never removes a pod before it has drained.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "graceful.dev",
    version = "v1alpha1",
    kind = "GracefulRollout",
    plural = "gracefulrollouts",
    shortname = "grro",
    namespaced,
    status = "GracefulRolloutStatus",
    doc = "Sequences a Deployment's rollouts so that no request is dropped",
    printcolumn = r#"{"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Updated", "type": "string", "jsonPath": ".status.progress"}"#,
    printcolumn = r#"{"name": "Step", "type": "string", "jsonPath": ".status.currentStep", "priority": 1}"#,
    printcolumn = r#"{"name": "Last-Rollout", "type": "string", "jsonPath": ".status.lastRollout.summary"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GracefulRolloutSpec {
    /// The Deployment (same namespace) whose rollouts this object sequences.
    pub target_ref: TargetRef,
    /// How pods are replaced.
    #[serde(default)]
    pub strategy: Strategy,
    /// Stop at the next step (as `kubectl rollout pause` on the Deployment does); the rollout
    /// resumes where it stopped when set back to false.
    #[serde(default)]
    pub paused: bool,
    /// Roll the rollout in progress back to the last stable pods. While it stays true, every
    /// new rollout is rolled back too; set it back to false to roll out again.
    #[serde(default)]
    pub abort: bool,
}

/// The Deployment a GracefulRollout manages: only `name` is needed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.apiVersion == 'apps/v1' && self.kind == 'Deployment'")
    .message("targetRef must name a Deployment (apiVersion apps/v1, kind Deployment)"))]
pub struct TargetRef {
    /// apps/v1, the one supported.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Deployment, the one kind supported.
    #[serde(default = "default_kind")]
    pub kind: String,
    #[x_kube(validation = Rule::new("self != ''").message("targetRef.name must not be empty"))]
    pub name: String,
}

fn default_api_version() -> String {
    "apps/v1".into()
}
fn default_kind() -> String {
    "Deployment".into()
}

/// How pods are replaced. Surge and the progress deadline are the Deployment's own
/// (`strategy.rollingUpdate.maxSurge`, at least 1; `progressDeadlineSeconds`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Strategy {
    /// How long a new pod must have been serving (ready and listed ready in the EndpointSlices)
    /// before an old pod is taken out of traffic.
    #[serde(default = "default_min_serving_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("minServingSeconds must not be negative"))]
    pub min_serving_seconds: i32,
    /// Roll back to the last stable pods when the Deployment reports ProgressDeadlineExceeded.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
}

fn default_min_serving_seconds() -> i32 {
    5
}
fn default_true() -> bool {
    true
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            min_serving_seconds: default_min_serving_seconds(),
            auto_rollback: true,
        }
    }
}

/// Where a GracefulRollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Phase {
    /// Not yet reconciled.
    #[default]
    Initializing,
    /// Every pod runs the Deployment's template; nothing to do.
    Healthy,
    /// Replacing pods, step by step.
    Progressing,
    /// `spec.paused` holds the rollout at a step boundary.
    Paused,
    /// Returning to the last stable pods after a failed or aborted rollout.
    RollingBack,
    /// The last rollout failed and was rolled back; the Deployment's template is not running.
    Degraded,
    /// The target Deployment does not exist.
    Missing,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GracefulRolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: Phase,
    /// Template hash of the pods that serve when no rollout runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// Template hash of the Deployment's current pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_revision: Option<String>,
    /// The last revision that failed or was aborted, and was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    #[serde(default)]
    pub replicas: i32,
    /// Pods of the updated revision.
    #[serde(default)]
    pub updated: i32,
    /// Ready pods (old and new) not terminating.
    #[serde(default)]
    pub serving: i32,
    /// Pods terminating (draining).
    #[serde(default)]
    pub draining: i32,
    /// "updated/replicas", for `kubectl get grro`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// What the controller is doing or waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<Time>,
    /// Last time the number of serving updated pods grew (the progress deadline counts from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollout: Option<RolloutRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Figures of the last finished rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    pub revision: String,
    pub started_at: Time,
    pub finished_at: Time,
    /// Succeeded or RolledBack.
    pub outcome: String,
    pub pods_replaced: i32,
    pub longest_drain_seconds: i64,
    /// Connections the old pods' sidecars had to force-close (from their termination messages).
    pub connections_force_closed: i64,
    /// One line for `kubectl get grro`.
    pub summary: String,
}

/// `conditions` as a list-map keyed by type, so server-side apply merges entries by type.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_carries_validation_rules_printer_columns_and_list_map_conditions() {
        let crd = serde_json::to_string(&GracefulRollout::crd()).unwrap();
        for needle in [
            "x-kubernetes-validations",
            "minServingSeconds must not be negative",
            "targetRef must name a Deployment",
            r#""x-kubernetes-list-type":"map""#,
            r#""shortNames":["grro"]"#,
            r#""name":"Phase""#,
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: GracefulRolloutSpec = serde_json::from_value(serde_json::json!({
            "targetRef": {"name": "web"}
        }))
        .unwrap();
        assert_eq!(spec.target_ref.api_version, "apps/v1");
        assert_eq!(spec.target_ref.kind, "Deployment");
        assert_eq!(spec.strategy, Strategy::default());
        assert!(!spec.paused);
    }
}
