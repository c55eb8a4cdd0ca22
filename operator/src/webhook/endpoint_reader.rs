//! EndpointSlice read access for injected pods. The sidecar deregisters precisely when it may
//! watch the EndpointSlices of its namespace; without that it waits a fixed delay. The webhook
//! grants exactly that read, in that namespace, to the ServiceAccount of each injected pod:
//! one Role (get/list/watch endpointslices) and one RoleBinding per ServiceAccount. Both are
//! owned by the MutatingWebhookConfiguration, so uninstalling the chart garbage-collects them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

pub const ROLE_NAME: &str = "graceful-endpointslice-reader";
const FIELD_MANAGER: &str = "graceful-operator";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "graceful-operator");

/// Grants made by this process, so a busy namespace costs two API writes once, not per pod.
pub struct EndpointReader {
    client: Client,
    owner: Option<OwnerReference>,
    granted: Mutex<HashSet<(String, String)>>,
}

impl EndpointReader {
    /// `owner`: the MutatingWebhookConfiguration (cluster-scoped objects may own namespaced ones).
    pub fn new(client: Client, owner: Option<OwnerReference>) -> Self {
        Self {
            client,
            owner,
            granted: Mutex::new(HashSet::new()),
        }
    }

    /// Lets `service_account` in `namespace` read EndpointSlices there. Idempotent.
    pub async fn grant(&self, namespace: &str, service_account: &str) -> Result<(), kube::Error> {
        let key = (namespace.to_owned(), service_account.to_owned());
        if self.granted.lock().expect("not poisoned").contains(&key) {
            return Ok(());
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let roles: Api<Role> = Api::namespaced(self.client.clone(), namespace);
        roles
            .patch(ROLE_NAME, &params, &Patch::Apply(role(self.owner.clone())))
            .await?;
        let name = binding_name(service_account);
        let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), namespace);
        let binding = binding(&name, namespace, service_account, self.owner.clone());
        bindings
            .patch(&name, &params, &Patch::Apply(binding))
            .await?;
        self.granted.lock().expect("not poisoned").insert(key);
        Ok(())
    }
}

pub fn binding_name(service_account: &str) -> String {
    format!("{ROLE_NAME}-{service_account}")
}

fn meta(name: &str, owner: Option<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([(
            MANAGED_BY.0.to_owned(),
            MANAGED_BY.1.to_owned(),
        )])),
        owner_references: owner.map(|o| vec![o]),
        ..Default::default()
    }
}

pub fn role(owner: Option<OwnerReference>) -> Role {
    Role {
        metadata: meta(ROLE_NAME, owner),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
            resources: Some(vec!["endpointslices".to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
            ..Default::default()
        }]),
    }
}

pub fn binding(
    name: &str,
    namespace: &str,
    service_account: &str,
    owner: Option<OwnerReference>,
) -> RoleBinding {
    RoleBinding {
        metadata: meta(name, owner),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: ROLE_NAME.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: service_account.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        }]),
    }
}
