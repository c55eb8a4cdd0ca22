//! Revisions: a pod template's identity. The Deployment controller's ReplicaSets carry it in the
//! `pod-template-hash` label; which ReplicaSet is the Deployment's "new" one is decided as that
//! controller decides it, by comparing templates without that label.

use k8s_openapi::api::core::v1::PodTemplateSpec;

use crate::names::POD_TEMPLATE_HASH;

/// The template without the hash label, so a Deployment's template and a ReplicaSet's compare.
pub fn normalized(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(meta) = t.metadata.as_mut()
        && let Some(labels) = meta.labels.as_mut()
    {
        labels.remove(POD_TEMPLATE_HASH);
    }
    t
}

/// Same pods, ignoring the hash label (what `EqualIgnoreHash` does in the Deployment controller).
pub fn same_template(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    normalized(a) == normalized(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn template(image: &str, hash: Option<&str>) -> PodTemplateSpec {
        let mut labels = std::collections::BTreeMap::from([("app".to_string(), "web".to_string())]);
        if let Some(h) = hash {
            labels.insert(POD_TEMPLATE_HASH.into(), h.into());
        }
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn templates_compare_without_the_hash_label() {
        let a = template("demo:1", None);
        let a_labelled = template("demo:1", Some("abc"));
        let b = template("demo:2", None);
        assert!(same_template(&a, &a_labelled));
        assert!(!same_template(&a, &b));
    }
}
