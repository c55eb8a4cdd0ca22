//! Test fixtures: builders for Deployments, ReplicaSets and pods, and a fake API server that
//! serves them from memory and records every write, so reconcile tests can assert what the
//! controller did without a cluster.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use crate::names::POD_TEMPLATE_HASH;

pub const NS: &str = "shop";

/// A write the controller made: path, body.
#[derive(Clone, Debug)]
pub struct Write {
    pub path: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    /// collection path -> name -> object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    writes: Vec<Write>,
    /// Paths read (GET), in order.
    reads: Vec<String>,
    next_uid: u64,
    /// Path fragments whose reads are refused (403), as RBAC refuses them.
    forbidden: Vec<String>,
}

/// An in-memory API server for one namespace.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn collection(api_version: &str, plural: &str) -> String {
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/{NS}/{plural}")
}

fn plural_of(kind: &str) -> &'static str {
    match kind {
        "Deployment" => "deployments",
        "ReplicaSet" => "replicasets",
        "Pod" => "pods",
        "EndpointSlice" => "endpointslices",
        "GracefulRollout" => "gracefulrollouts",
        "Lease" => "leases",
        "Service" => "services",
        "Ingress" => "ingresses",
        "HTTPRoute" => "httproutes",
        "TargetGroupBinding" => "targetgroupbindings",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        other => panic!("fixture does not know kind {other}"),
    }
}

impl FakeApi {
    pub fn client(&self) -> Client {
        self.hangable_client().0
    }

    /// A client of this API whose requests never answer while the flag is set: a replica whose
    /// connection to the apiserver hangs, beside others that still get through.
    pub fn hangable_client(&self) -> (Client, Arc<AtomicBool>) {
        let me = self.clone();
        let hung = Arc::new(AtomicBool::new(false));
        let flag = hung.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let (me, flag) = (me.clone(), flag.clone());
            async move {
                if flag.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(me.handle(req).await)
            }
        });
        (Client::new(svc, NS), hung)
    }

    pub fn put(&self, obj: Value) -> &Self {
        let kind = obj["kind"].as_str().expect("kind").to_string();
        let path = collection(
            obj["apiVersion"].as_str().expect("apiVersion"),
            plural_of(&kind),
        );
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        self.state
            .lock()
            .unwrap()
            .objects
            .entry(path)
            .or_default()
            .insert(name, obj);
        self
    }

    pub fn delete(&self, api_version: &str, kind: &str, name: &str) {
        let path = collection(api_version, plural_of(kind));
        if let Some(m) = self.state.lock().unwrap().objects.get_mut(&path) {
            m.remove(name);
        }
    }

    pub fn get(&self, api_version: &str, kind: &str, name: &str) -> Option<Value> {
        let path = collection(api_version, plural_of(kind));
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&path)
            .and_then(|m| m.get(name))
            .cloned()
    }

    /// Refuses reads of paths containing `fragment` from now on, as RBAC without the rule does.
    pub fn forbid(&self, fragment: &str) {
        self.state
            .lock()
            .unwrap()
            .forbidden
            .push(fragment.to_owned());
    }

    /// Paths read (gets and lists), in order.
    pub fn reads(&self) -> Vec<String> {
        self.state.lock().unwrap().reads.clone()
    }

    /// Writes other than events, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.state
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|w| !w.path.contains("/events"))
            .cloned()
            .collect()
    }

    /// The events posted, in order.
    pub fn events(&self) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.writes
            .iter()
            .filter(|w| w.path.contains("/events"))
            .map(|w| w.body.clone())
            .collect()
    }

    /// How many events with this reason were posted.
    pub fn events_for(&self, reason: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e["reason"] == reason)
            .count()
    }

    pub fn writes_to(&self, fragment: &str) -> Vec<Write> {
        self.writes()
            .into_iter()
            .filter(|w| w.path.contains(fragment))
            .collect()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_string();
        // Server-side apply creates what is not there yet.
        let apply = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
        let mut st = self.state.lock().unwrap();
        if parts.method == Method::GET {
            st.reads.push(path.clone());
            if st.forbidden.iter().any(|f| path.contains(f.as_str())) {
                return respond(
                    StatusCode::FORBIDDEN,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": format!("cannot list {path}")}),
                );
            }
        } else {
            st.writes.push(Write {
                path: path.clone(),
                body: body.clone(),
            });
        }
        // Split ".../{plural}[/{name}[/status]]".
        let (coll, name) = match st
            .objects
            .keys()
            .find(|c| path == **c || path.starts_with(&format!("{c}/")))
        {
            Some(c) => {
                let rest = path[c.len()..].trim_start_matches('/');
                (
                    c.clone(),
                    rest.split('/')
                        .next()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                )
            }
            None if path.contains("/events") => return respond(StatusCode::CREATED, body),
            None => {
                // An empty collection we were never given: lists are empty, gets are 404.
                // HTTPRoutes and TargetGroupBindings are CRDs: absent unless given, 404.
                let known = [
                    "deployments",
                    "replicasets",
                    "pods",
                    "endpointslices",
                    "services",
                    "ingresses",
                ];
                return if parts.method == Method::GET && known.iter().any(|p| path.ends_with(p)) {
                    respond(
                        StatusCode::OK,
                        json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}),
                    )
                } else if parts.method == Method::POST {
                    let obj = st.create(&path, body);
                    respond(StatusCode::CREATED, obj)
                } else if parts.method == Method::PATCH && apply {
                    let coll = path.rsplit_once('/').map_or(path.as_str(), |(c, _)| c);
                    let obj = st.create(coll, body);
                    respond(StatusCode::CREATED, obj)
                } else {
                    not_found()
                };
            }
        };
        match (parts.method.clone(), name) {
            (Method::GET, None) => {
                let selector = parts.uri.query().and_then(label_selector);
                let items: Vec<Value> = st.objects[&coll]
                    .values()
                    .filter(|o| selector.as_ref().is_none_or(|s| selects(s, o)))
                    .cloned()
                    .collect();
                respond(
                    StatusCode::OK,
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (Method::GET, Some(n)) => match st.objects[&coll].get(&n) {
                Some(o) => respond(StatusCode::OK, o.clone()),
                None => not_found(),
            },
            (Method::POST, _) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                if st.objects[&coll].contains_key(name) {
                    return conflict("already exists");
                }
                let obj = st.create(&coll, body);
                respond(StatusCode::CREATED, obj)
            }
            (Method::PATCH, Some(n)) => {
                if apply && !st.objects[&coll].contains_key(&n) {
                    let obj = st.create(&coll, body);
                    return respond(StatusCode::CREATED, obj);
                }
                let Some(obj) = st.objects.get_mut(&coll).and_then(|m| m.get_mut(&n)) else {
                    return not_found();
                };
                // A patch that names a resourceVersion applies only onto that version, and
                // every write makes a new one, as on a real API server.
                let version = obj["metadata"]["resourceVersion"].as_str().unwrap_or("0");
                if let Some(wanted) = body.pointer("/metadata/resourceVersion")
                    && wanted.as_str() != Some(version)
                {
                    return conflict("the object has been modified");
                }
                let next = version.parse::<u64>().unwrap_or(0) + 1;
                let ct = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct.contains("json-patch") {
                    let patch: json_patch::Patch =
                        serde_json::from_value(body).expect("a JSON patch");
                    // A failed op (a `test` on a stale resourceVersion) rejects the whole patch.
                    let mut next_obj = obj.clone();
                    if let Err(e) = json_patch::patch(&mut next_obj, &patch) {
                        return respond(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": format!("the server rejected our request due to an error in our request: {e}")}),
                        );
                    }
                    *obj = next_obj;
                } else {
                    // Merge and apply patches both merge here; enough for these tests.
                    json_patch::merge(obj, &body);
                }
                obj["metadata"]["resourceVersion"] = json!(next.to_string());
                respond(StatusCode::OK, obj.clone())
            }
            (Method::PUT, Some(n)) => {
                let stored = st.objects[&coll]
                    .get(&n)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                if stored
                    .as_ref()
                    .is_some_and(|rv| *rv != body["metadata"]["resourceVersion"])
                {
                    return conflict("the object has been modified");
                }
                // Every write makes a new resourceVersion, as on a real API server.
                let next = stored
                    .and_then(|rv| rv.as_str().and_then(|v| v.parse::<u64>().ok()))
                    .unwrap_or(0)
                    + 1;
                let mut body = body;
                body["metadata"]["resourceVersion"] = json!(next.to_string());
                st.objects.get_mut(&coll).unwrap().insert(n, body.clone());
                respond(StatusCode::OK, body)
            }
            (Method::DELETE, Some(n)) => {
                let gone = st.objects.get_mut(&coll).unwrap().remove(&n);
                gone.map(|o| respond(StatusCode::OK, o))
                    .unwrap_or_else(not_found)
            }
            _ => not_found(),
        }
    }
}

impl State {
    fn create(&mut self, coll: &str, mut obj: Value) -> Value {
        self.next_uid += 1;
        obj["metadata"]["uid"] = json!(format!("uid-created-{}", self.next_uid));
        obj["metadata"]["resourceVersion"] = json!("1");
        obj["metadata"]["creationTimestamp"] = json!(Timestamp::now().to_string());
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or("unnamed")
            .to_string();
        self.objects
            .entry(coll.to_string())
            .or_default()
            .insert(name, obj.clone());
        obj
    }
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn conflict(message: &str) -> Response<Body> {
    respond(
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": message}),
    )
}

/// The `labelSelector` of a list request (equality, existence and `in (a,b)` terms, what the
/// controller sends), as the API server reads it.
fn label_selector(query: &str) -> Option<kube::core::Selector> {
    let (_, raw) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "labelSelector")?;
    let mut selector = kube::core::Selector::default();
    let mut rest = raw.as_ref();
    while !rest.is_empty() {
        // A set's values are separated by commas too: a term ends at the first comma outside ().
        let end = match (rest.find('('), rest.find(',')) {
            (Some(open), Some(comma)) if open < comma => {
                rest.find(')').map_or(rest.len(), |c| c + 1)
            }
            (_, Some(comma)) => comma,
            (_, None) => rest.len(),
        };
        let term = &rest[..end];
        rest = rest[end..].trim_start_matches(',');
        let expr = if let Some((k, set)) = term.split_once(" in ") {
            let values = set.trim_matches(|c| c == '(' || c == ')' || c == ' ');
            kube::core::Expression::In(
                k.trim().into(),
                values.split(',').map(str::to_owned).collect(),
            )
        } else if let Some((k, v)) = term.split_once('=') {
            kube::core::Expression::Equal(k.into(), v.into())
        } else {
            kube::core::Expression::Exists(term.into())
        };
        selector.extend(std::iter::once(expr));
    }
    Some(selector)
}

fn selects(selector: &kube::core::Selector, obj: &Value) -> bool {
    let labels: BTreeMap<String, String> =
        serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default();
    kube::core::SelectorExt::matches(selector, &labels)
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Seconds before now, as an RFC 3339 string.
pub fn ago(secs: i64) -> String {
    Timestamp::now()
        .checked_sub(jiff_secs(secs))
        .unwrap()
        .to_string()
}

fn jiff_secs(secs: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(secs)
}

pub fn template(version: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "localhost/graceful-demo:dev", "env": [{"name": "DEMO_VERSION", "value": version}]}]}
    })
}

/// The Deployment `web`, labelled as managed by GracefulRollout `web` when `managed`; `held`
/// is the user's values while a rollout is paced (then its own fields carry the hold).
pub fn deployment(version: &str, replicas: i32, managed: bool, held: Option<Value>) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS, "uid": "uid-deploy", "resourceVersion": "7", "generation": 2, "labels": {}},
        "spec": {"replicas": replicas, "minReadySeconds": 0, "selector": {"matchLabels": {"app": "web"}}, "template": template(version),
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}},
        "status": {"observedGeneration": 2}
    });
    if managed {
        d["metadata"]["labels"] = json!({crate::names::MANAGED_LABEL: "web"});
    }
    if let Some(h) = held {
        d["metadata"]["annotations"] = json!({crate::names::HELD_ANNOTATION: h.to_string()});
        d["spec"]["minReadySeconds"] = json!(crate::names::DEFAULT_PROGRESS_DEADLINE_SECONDS - 1);
        d["spec"]["strategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    }
    d
}

/// The user's values while a rollout is paced, as the webhook stores them.
pub fn user_held() -> Value {
    json!({"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}})
}

/// A ReplicaSet of the Deployment for `version`, with `replicas` and `min_ready` seconds.
pub fn replica_set(version: &str, hash: &str, replicas: i32, min_ready: i32, age: i64) -> Value {
    let mut t = template(version);
    t["metadata"]["labels"][POD_TEMPLATE_HASH] = json!(hash);
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("web-{hash}"), "namespace": NS, "uid": format!("uid-rs-{hash}"), "resourceVersion": "3",
            "creationTimestamp": ago(age), "labels": {"app": "web", POD_TEMPLATE_HASH: hash},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-deploy", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": replicas, "minReadySeconds": min_ready, "selector": {"matchLabels": {"app": "web", POD_TEMPLATE_HASH: hash}}, "template": t}
    })
}

/// A pod of ReplicaSet `web-{hash}`; `ready_for` seconds of readiness, or not ready.
pub fn pod(name: &str, hash: &str, ready_for: Option<i64>) -> Value {
    let conditions = match ready_for {
        Some(s) => json!([{"type": "Ready", "status": "True", "lastTransitionTime": ago(s)}]),
        None => json!([{"type": "Ready", "status": "False", "lastTransitionTime": ago(1)}]),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "labels": {"app": "web", POD_TEMPLATE_HASH: hash},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("web-{hash}"), "uid": format!("uid-rs-{hash}"), "controller": true}]},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
        "status": {"conditions": conditions}
    })
}

/// One EndpointSlice listing these pods with their readiness.
pub fn slice(pods: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, (name, ready))| json!({"addresses": [format!("10.244.0.{}", i + 10)], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": name, "namespace": NS}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-abcde", "namespace": NS}, "addressType": "IPv4", "endpoints": endpoints})
}

/// `slice`, as the EndpointSlice controller makes it for Service `service`.
pub fn slice_of(service: &str, pods: &[(&str, bool)]) -> Value {
    let mut s = slice(pods);
    s["metadata"]["name"] = json!(format!("{service}-abcde"));
    s["metadata"]["labels"] = json!({"kubernetes.io/service-name": service});
    s
}

/// `pod` with an injected sidecar naming the Services that select it (comma-separated).
pub fn injected(mut pod: Value, services: &str) -> Value {
    pod["spec"]["initContainers"] = json!([{"name": "graceful-sidecar", "image": "x",
        "env": [{"name": graceful_sidecar::defaults::ENV_SERVICES, "value": services}]}]);
    pod
}

pub fn rollout(spec_extra: Value, status: Value) -> Value {
    let mut spec = json!({"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}, "strategy": {"minServingSeconds": 10}});
    json_patch::merge(&mut spec, &spec_extra);
    json!({
        "apiVersion": "graceful.dev/v1alpha1", "kind": "GracefulRollout",
        "metadata": {"name": "web", "namespace": NS, "uid": "uid-gr", "generation": 1, "resourceVersion": "5", "finalizers": [crate::names::FINALIZER]},
        "spec": spec,
        "status": status
    })
}
