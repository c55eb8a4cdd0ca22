//! Argo CD's health rule for Deployments, restated from gitops-engine
//! (`pkg/health/health_deployment.go`, `getAppsv1DeploymentHealth`), so a test can rate a managed
//! Deployment the way a GitOps dashboard would, at rest and at every sample of a rollout.

use k8s_openapi::api::apps::v1::Deployment;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    Healthy,
    Progressing,
    Degraded,
    Suspended,
}

pub fn deployment_health(d: &Deployment) -> Health {
    let (Some(spec), status) = (&d.spec, d.status.clone().unwrap_or_default()) else {
        return Health::Progressing;
    };
    if spec.paused == Some(true) {
        return Health::Suspended;
    }
    if d.metadata.generation.unwrap_or(0) > status.observed_generation.unwrap_or(0) {
        return Health::Progressing;
    }
    let progressing = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing");
    if progressing.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded")) {
        return Health::Degraded;
    }
    let updated = status.updated_replicas.unwrap_or(0);
    if spec.replicas.is_some_and(|r| updated < r)
        || status.replicas.unwrap_or(0) > updated
        || status.available_replicas.unwrap_or(0) < updated
    {
        return Health::Progressing;
    }
    Health::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(paused: bool, generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": 3, "paused": paused, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rates_like_gitops_engine() {
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(
            deployment_health(&d(false, 2, done.clone())),
            Health::Healthy
        );
        assert_eq!(
            deployment_health(&d(true, 2, done.clone())),
            Health::Suspended
        );
        assert_eq!(deployment_health(&d(false, 3, done)), Health::Progressing);
        let mid = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3});
        assert_eq!(deployment_health(&d(false, 2, mid)), Health::Progressing);
        let held = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 0});
        assert_eq!(deployment_health(&d(false, 2, held)), Health::Progressing);
        let failed = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]});
        assert_eq!(deployment_health(&d(false, 2, failed)), Health::Degraded);
    }
}
