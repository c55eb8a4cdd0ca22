//! EndpointSlice read access for injected pods. The sidecar deregisters precisely when it may
//! watch the EndpointSlices of its namespace; without that it waits a fixed delay. The operator
//! grants exactly that read, in that namespace, to the ServiceAccount of each injected pod:
//! one Role (get/list/watch endpointslices) and one RoleBinding per ServiceAccount. Both are
//! owned by the MutatingWebhookConfiguration, so uninstalling the chart garbage-collects them.
//!
//! The grants follow the pods the API server admitted (a watch of the pods the webhook labelled
//! injected), never an admission review: anyone who can reach the webhook can send it a review
//! naming any namespace and ServiceAccount (docs/security.md). A Role or RoleBinding of that
//! name that graceful did not make is the user's and is left alone.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::scope::Scope;
use crate::webhook::annotations::{INJECTED_LABEL, INJECTOR_LABEL};

pub const ROLE_NAME: &str = "graceful-endpointslice-reader";
const FIELD_MANAGER: &str = "graceful-operator";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "graceful-operator");

/// Grants made by this process, so a busy namespace costs two API writes once, not per pod.
pub struct EndpointReader {
    client: Client,
    owner: Option<OwnerReference>,
    granted: Mutex<HashSet<(String, String)>>,
    /// This release's MutatingWebhookConfiguration: the pods it injected are this reader's.
    injector: String,
    /// The namespaces whose pods it watches (and so grants in).
    scope: Scope,
}

impl EndpointReader {
    /// `owner`: the MutatingWebhookConfiguration (cluster-scoped objects may own namespaced ones).
    /// `injector`: this release's MutatingWebhookConfiguration, whose pods this reader grants.
    /// `scope`: where it watches those pods, so where it grants.
    pub fn new(
        client: Client,
        owner: Option<OwnerReference>,
        injector: String,
        scope: Scope,
    ) -> Self {
        Self {
            client,
            owner,
            granted: Mutex::new(HashSet::new()),
            injector,
            scope,
        }
    }

    /// Lets `service_account` in `namespace` read EndpointSlices there. Idempotent; false when
    /// a Role or RoleBinding of graceful's name there is someone else's (left as it is).
    pub async fn grant(&self, namespace: &str, service_account: &str) -> Result<bool, kube::Error> {
        let key = (namespace.to_owned(), service_account.to_owned());
        if self.granted.lock().expect("not poisoned").contains(&key) {
            return Ok(true);
        }
        // Applied without force: a field another manager owns is a conflict, not taken over.
        let params = PatchParams::apply(FIELD_MANAGER);
        let roles: Api<Role> = Api::namespaced(self.client.clone(), namespace);
        if roles.get_opt(ROLE_NAME).await?.is_some_and(|r| !ours(&r)) {
            return Ok(false);
        }
        roles
            .patch(ROLE_NAME, &params, &Patch::Apply(role(self.owner.clone())))
            .await?;
        let name = binding_name(service_account);
        let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), namespace);
        if bindings.get_opt(&name).await?.is_some_and(|b| !ours(&b)) {
            return Ok(false);
        }
        let binding = binding(&name, namespace, service_account, self.owner.clone());
        bindings
            .patch(&name, &params, &Patch::Apply(binding))
            .await?;
        self.granted.lock().expect("not poisoned").insert(key);
        Ok(true)
    }

    /// Grants the read to every injected pod's ServiceAccount in the scope, as the pods come, until the
    /// watch ends (never on its own: errors are retried with backoff). A grant that failed is
    /// tried again every `RETRY_EVERY`.
    pub async fn run(&self) {
        let config = watcher::Config::default().labels(&format!(
            "{INJECTED_LABEL}=true,{INJECTOR_LABEL}={}",
            self.injector
        ));
        let mut pods = self
            .scope
            .watch::<Pod>(&self.client, config)
            .applied_objects();
        let mut failed: BTreeSet<(String, String)> = BTreeSet::new();
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            let keys = tokio::select! {
                pod = pods.next() => match pod {
                    Some(Ok(pod)) => vec![account_of(&pod)],
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pod watch for EndpointSlice grants");
                        continue;
                    }
                    None => return,
                },
                _ = retry.tick(), if !failed.is_empty() => std::mem::take(&mut failed).into_iter().collect(),
            };
            for (namespace, account) in keys {
                match self.grant(&namespace, &account).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Once per process: the pair is remembered as done.
                        warn!(
                            namespace,
                            role = ROLE_NAME,
                            "a Role or RoleBinding of graceful's name is not graceful's: left alone; the sidecars there wait their deregister delay"
                        );
                        self.granted
                            .lock()
                            .expect("not poisoned")
                            .insert((namespace, account));
                    }
                    Err(e) => {
                        info!(namespace, account, error = %e, "EndpointSlice read not granted yet");
                        failed.insert((namespace, account));
                    }
                }
            }
        }
    }
}

/// How often grants that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(10);

/// The namespace and ServiceAccount a pod runs as.
fn account_of(pod: &Pod) -> (String, String) {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    (pod.namespace().unwrap_or_default(), account)
}

/// Whether graceful made this object (its label), rather than a user who chose the same name.
fn ours(obj: &impl ResourceExt) -> bool {
    obj.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{FakeApi, NS};

    #[tokio::test]
    async fn a_service_account_gets_the_read_once() {
        let api = FakeApi::default();
        let reader = EndpointReader::new(
            api.client(),
            None,
            "graceful-sidecar-injector".into(),
            Scope::Cluster,
        );
        assert!(reader.grant(NS, "web").await.unwrap());
        assert!(reader.grant(NS, "web").await.unwrap());
        let writes: Vec<_> = api.writes().into_iter().map(|w| w.path).collect();
        assert_eq!(writes.len(), 2, "{writes:?}");
        let role = api
            .get("rbac.authorization.k8s.io/v1", "Role", ROLE_NAME)
            .expect("the Role");
        assert_eq!(role["rules"][0]["resources"], json!(["endpointslices"]));
        let binding = api
            .get(
                "rbac.authorization.k8s.io/v1",
                "RoleBinding",
                &binding_name("web"),
            )
            .expect("the RoleBinding");
        assert_eq!(binding["subjects"][0]["name"], "web");
        assert_eq!(binding["roleRef"]["name"], ROLE_NAME);
    }

    #[tokio::test]
    async fn a_role_of_that_name_that_graceful_did_not_make_is_left_alone() {
        let api = FakeApi::default();
        api.put(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": ROLE_NAME, "namespace": NS},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        }));
        let reader = EndpointReader::new(
            api.client(),
            None,
            "graceful-sidecar-injector".into(),
            Scope::Cluster,
        );
        assert!(!reader.grant(NS, "web").await.unwrap());
        assert!(api.writes().is_empty(), "{:?}", api.writes());
    }

    #[test]
    fn a_pod_without_a_service_account_runs_as_default() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": NS},
            "spec": {"containers": []},
        }))
        .unwrap();
        assert_eq!(account_of(&pod), (NS.to_owned(), "default".to_owned()));
    }
}
