//! The Deployment webhook: `POST /pace`, asked on every UPDATE of a managed Deployment (the chart
//! selects them by the `graceful.dev/rollout` label). It never refuses anything; it only starts or
//! keeps the hold that paces a graceful rollout (`crate::pacing::admit`). Its failure policy is
//! Ignore: with the operator down, a template change rolls out natively and the injected
//! sidecars still drain every pod (docs/rollout.md).

use k8s_openapi::api::apps::v1::Deployment;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tracing::{info, warn};

use crate::pacing;

pub const PACE_PATH: &str = "/pace";

/// `operator_user` is the operator's own ServiceAccount user name: its writes pass untouched.
pub fn review(req: &AdmissionRequest<Deployment>, operator_user: &str) -> AdmissionResponse {
    let allow = AdmissionResponse::from(req);
    let (Operation::Update, Some(old), Some(new)) =
        (&req.operation, req.old_object.as_ref(), req.object.as_ref())
    else {
        return allow;
    };
    let by_operator = req.user_info.username.as_deref() == Some(operator_user);
    let Some(paced) = pacing::admit(old, new, by_operator) else {
        return allow;
    };
    let who = format!(
        "{}/{}",
        req.namespace.as_deref().unwrap_or(""),
        new.metadata.name.as_deref().unwrap_or("?")
    );
    let patch = match (serde_json::to_value(new), serde_json::to_value(&paced)) {
        (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
        (Err(e), _) | (_, Err(e)) => {
            // Never block a Deployment update on our account.
            warn!(deployment = %who, error = %e, "cannot serialize; letting the update through unpaced");
            return allow;
        }
    };
    let started = pacing::held(old).is_none() && pacing::held(&paced).is_some();
    info!(
        deployment = %who,
        user = req.user_info.username.as_deref().unwrap_or("?"),
        ops = patch.0.len(),
        "{}",
        if started { "template change: rollout paced by graceful" } else { "held fields kept" }
    );
    match allow.with_patch(patch) {
        Ok(response) => response,
        Err(e) => {
            warn!(deployment = %who, error = %e, "patch not encodable; letting the update through unpaced");
            AdmissionResponse::from(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::admission::AdmissionReview;
    use serde_json::json;

    const OPERATOR: &str = "system:serviceaccount:graceful-system:graceful-operator";

    fn review_of(user: &str, old_image: &str, new_image: &str) -> AdmissionRequest<Deployment> {
        let d = |image: &str| {
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "shop", "labels": {"graceful.dev/rollout": "web"}},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": image}]}},
                }
            })
        };
        let review: AdmissionReview<Deployment> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
                "operation": "UPDATE", "namespace": "shop", "name": "web",
                "userInfo": {"username": user},
                "object": d(new_image), "oldObject": d(old_image),
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    #[test]
    fn a_users_template_change_is_paced_with_a_patch() {
        let resp = review(&review_of("alice", "v1", "v2"), OPERATOR);
        assert!(resp.allowed);
        let patch: Vec<serde_json::Value> =
            serde_json::from_slice(resp.patch.as_ref().expect("a patch")).unwrap();
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains("/spec/minReadySeconds"), "{text}");
        assert!(text.contains("graceful.dev/held"), "{text}");
    }

    #[test]
    fn the_operators_own_update_and_other_users_non_template_updates_pass() {
        assert!(
            review(&review_of(OPERATOR, "v1", "v2"), OPERATOR)
                .patch
                .is_none()
        );
        let same = review(&review_of("alice", "v1", "v1"), OPERATOR);
        assert!(same.allowed && same.patch.is_none());
    }
}
