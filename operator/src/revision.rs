//! Revisions: a pod template's identity. ReplicaSets carry it in the `pod-template-hash` label,
//! as the Deployment controller's do, so a ReplicaSet we create is the one the Deployment
//! controller later recognises as its own "new ReplicaSet" (it compares templates, not hashes).

use k8s_openapi::api::core::v1::PodTemplateSpec;

/// The label every ReplicaSet of a Deployment and its pods carry.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

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

/// A short stable name for a template: FNV-1a over its canonical JSON (k8s-openapi maps are
/// ordered), in the Kubernetes "safe" alphabet so it is a valid label value and name suffix.
/// Written here because the Deployment controller's own hash hashes Go's in-memory layout, which
/// no Rust crate reproduces; the name only has to be stable, and template equality decides.
pub fn template_hash(template: &PodTemplateSpec, collision: u32) -> String {
    let json = serde_json::to_vec(&normalized(template)).expect("a PodTemplateSpec serializes");
    let mut h: u32 = 0x811c_9dc5;
    for b in json.iter().chain(collision.to_le_bytes().iter()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::new();
    let mut v = u64::from(h);
    while out.len() < 10 {
        out.push(ALPHABET[(v % ALPHABET.len() as u64) as usize] as char);
        v = v / ALPHABET.len() as u64 + u64::from(h.rotate_left(out.len() as u32 * 3));
    }
    out
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
    fn hash_ignores_the_hash_label_and_tracks_the_template() {
        let a = template("demo:1", None);
        let a_labelled = template("demo:1", Some("abc"));
        let b = template("demo:2", None);
        assert_eq!(template_hash(&a, 0), template_hash(&a_labelled, 0));
        assert!(same_template(&a, &a_labelled));
        assert_ne!(template_hash(&a, 0), template_hash(&b, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        assert!(!same_template(&a, &b));
        let h = template_hash(&a, 0);
        assert_eq!(h.len(), 10);
        assert!(h.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
