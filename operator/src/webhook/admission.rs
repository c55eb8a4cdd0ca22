//! AdmissionReview in, AdmissionReview out: turns the injector's outcome into a JSON patch,
//! warnings or a denial. What the webhook looked up in the cluster comes in as [`Lookup`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tracing::{info, warn};

use super::annotations::INJECTOR_LABEL;
use super::data_planes::Around;
use super::inject::{self, Context, Outcome, SidecarImage};

/// Namespaces whose pods are never touched, whatever their annotations say.
pub const ALWAYS_EXCLUDED: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// What the webhook found around the pod.
#[derive(Debug, Default, Clone)]
pub struct Lookup {
    pub owner_annotations: BTreeMap<String, String>,
    pub services: Vec<Service>,
    /// What in the namespace may name those Services (data-plane detection).
    pub around: Around,
}

/// Policy the server was started with.
#[derive(Debug, Clone)]
pub struct Policy {
    pub sidecar: SidecarImage,
    /// The operator's own namespace, plus [`ALWAYS_EXCLUDED`].
    pub excluded_namespaces: Vec<String>,
    /// This webhook's MutatingWebhookConfiguration: the `graceful.dev/injector` label of the
    /// pods it injects, whose EndpointSlice grants are this release's (endpoint_reader.rs).
    pub injector: String,
}

impl Policy {
    pub fn excludes(&self, namespace: &str) -> bool {
        ALWAYS_EXCLUDED.contains(&namespace)
            || self.excluded_namespaces.iter().any(|n| n == namespace)
    }
}

/// Whether the request is one the webhook may act on at all (before any lookup).
pub fn in_scope(req: &AdmissionRequest<Pod>, policy: &Policy) -> bool {
    matches!(req.operation, Operation::Create)
        && req.object.is_some()
        && !req
            .namespace
            .as_deref()
            .is_some_and(|ns| policy.excludes(ns))
}

pub fn review(
    req: &AdmissionRequest<Pod>,
    lookup: &Lookup,
    policy: &Policy,
    prestop_token: &str,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(req);
    let Some(pod) = req.object.as_ref().filter(|_| in_scope(req, policy)) else {
        return allow;
    };
    let ctx = Context {
        owner_annotations: &lookup.owner_annotations,
        services: &lookup.services,
        around: &lookup.around,
        sidecar: &policy.sidecar,
        prestop_token,
    };
    let who = format!(
        "{}/{}",
        req.namespace.as_deref().unwrap_or(""),
        pod.metadata
            .name
            .as_deref()
            .or(pod.metadata.generate_name.as_deref())
            .unwrap_or("?")
    );
    match inject::inject(pod, &ctx) {
        Outcome::Skip(_) => allow,
        Outcome::Reject(message) => {
            warn!(pod = %who, %message, "pod rejected");
            allow.deny(format!("graceful: {message}"))
        }
        Outcome::Inject {
            pod: mut injected,
            warnings,
        } => {
            injected
                .metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(INJECTOR_LABEL.to_owned(), policy.injector.clone());
            let patch = match (serde_json::to_value(pod), serde_json::to_value(&*injected)) {
                (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
                (Err(e), _) | (_, Err(e)) => {
                    return allow.deny(format!("graceful: cannot serialize the pod: {e}"));
                }
            };
            info!(pod = %who, ops = patch.0.len(), ?warnings, "sidecar injected");
            match allow.with_patch(patch) {
                Ok(mut response) => {
                    if !warnings.is_empty() {
                        response.warnings = Some(warnings);
                    }
                    response
                }
                Err(e) => AdmissionResponse::from(req).deny(format!("graceful: {e}")),
            }
        }
    }
}
