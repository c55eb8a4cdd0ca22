//! The HTTPS server the API server calls: `POST /mutate` and `POST /pace` (AdmissionReviews) and
//! `GET /readyz`.
//! TLS only, on its own port. The certificate is reloaded from its Secret every minute, which
//! also puts the caBundle back if someone reset it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::{Selector, SelectorExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use super::admission::{self, Lookup, Policy};
use super::annotations;
use super::data_planes::{self, Around};
use super::inject::{self, SidecarImage};
use super::pace::{self, PACE_PATH};
use super::{CertSource, Error, WebhookArgs};
use crate::cert_rotation::Rotation;
use crate::certs::{self, TlsMaterial};
use crate::endpoint_reader::EndpointReader;
use crate::metrics::Metrics;
use crate::names::POD_TEMPLATE_HASH;
use crate::scope::Scope;
use graceful_sidecar::accept::{
    Accepted, Acceptor, FirstRequest, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, Slots,
};

pub const MUTATE_PATH: &str = "/mutate";
const READYZ_PATH: &str = "/readyz";
/// AdmissionReviews of big pods stay far below this.
const MAX_BODY: usize = 4 << 20;
/// Lookups must end well inside the API server's webhook timeout.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. The API server keeps a pool of a few per replica; past the
/// limit, new ones wait in the listen backlog instead of costing memory.
const MAX_CONNECTIONS: usize = 512;
/// How long the webhook serves on after SIGTERM (and after the chart's 5 s preStop, in which the
/// pod left the Service), every answer saying `Connection: close`. The API server keeps sending
/// reviews on the connections it opened to this pod before; closing one while it is idle can
/// cross a review already on its way (a broken pipe, and with failurePolicy Ignore a pod
/// without the sidecar). Each connection used in this time is closed by the API server itself,
/// after its answer, and the ones left are those it has not used for that long.
pub const RETIRE_FOR: Duration = Duration::from_secs(5);
/// A review's body must arrive within the longest timeoutSeconds a webhook may have.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A review lasts at most the webhook's timeoutSeconds (10 s by default, 30 s at most).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const CERT_REFRESH: Duration = Duration::from_secs(60);
const CERT_RETRY: Duration = Duration::from_secs(2);
/// Of the lookup budget, what the data-plane lookups leave: they are a refinement, and a slow one
/// must not run the whole lookup out of time and cost the pod its owner's annotations.
const AROUND_RESERVE: Duration = Duration::from_secs(1);
/// After a 404 (the CRD is not installed), how long a kind is not asked for again.
const ABSENT_RECHECK: Duration = Duration::from_secs(300);

struct State {
    client: Client,
    policy: Policy,
    /// The operator's ServiceAccount user name, whose Deployment writes pass unpaced.
    operator_user: String,
    metrics: Arc<Metrics>,
    around: AroundLookups,
    /// Reviews need the API server's client certificate (`--client-ca`).
    require_client_cert: bool,
    /// Shutting down: every answer closes its connection (`RETIRE_FOR`).
    retiring: AtomicBool,
}

/// What the data-plane lookups remember across reviews: the kinds whose failure was already
/// logged as a warning (once per kind and process; later ones at debug), and the CRD kinds
/// found absent, not listed again for [`ABSENT_RECHECK`].
#[derive(Default)]
struct AroundLookups {
    warned: Mutex<HashSet<&'static str>>,
    absent_until: Mutex<HashMap<&'static str, tokio::time::Instant>>,
}

impl AroundLookups {
    /// Every object of one kind in the namespace; nothing when the lookup fails, is forbidden,
    /// or does not answer by `until`. `crd`: a 404 means the kind is not installed.
    async fn list<K>(
        &self,
        what: &'static str,
        api: Api<K>,
        crd: bool,
        until: tokio::time::Instant,
    ) -> Vec<K>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let now = tokio::time::Instant::now();
        if crd
            && self
                .absent_until
                .lock()
                .expect("not poisoned")
                .get(what)
                .is_some_and(|t| *t > now)
        {
            return Vec::new();
        }
        let failed = match tokio::time::timeout_at(until, api.list(&ListParams::default())).await {
            Ok(Ok(list)) => return list.items,
            Ok(Err(kube::Error::Api(e))) if crd && e.code == 404 => {
                debug!(
                    kind = what,
                    "not installed; not asked again for {ABSENT_RECHECK:?}"
                );
                self.absent_until
                    .lock()
                    .expect("not poisoned")
                    .insert(what, now + ABSENT_RECHECK);
                return Vec::new();
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within the lookup budget".to_owned(),
        };
        if self.warned.lock().expect("not poisoned").insert(what) {
            warn!(
                kind = what,
                error = %failed,
                "listing failed; the data planes it would show are left out of injected pods \
                 (this warning is logged once; later failures at debug)"
            );
        } else {
            debug!(kind = what, error = %failed, "listing failed");
        }
        Vec::new()
    }

    /// The Ingresses, HTTPRoutes and TargetGroupBindings of the namespace, at once.
    async fn look(&self, client: &Client, namespace: &str, until: tokio::time::Instant) -> Around {
        let dynamic =
            |resource| Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
        let (ingresses, http_routes, target_group_bindings) = tokio::join!(
            self.list(
                "ingresses",
                Api::<Ingress>::namespaced(client.clone(), namespace),
                false,
                until
            ),
            self.list(
                "httproutes",
                dynamic(data_planes::http_route_resource()),
                true,
                until
            ),
            self.list(
                "targetgroupbindings",
                dynamic(data_planes::target_group_binding_resource()),
                true,
                until
            ),
        );
        Around {
            ingresses,
            http_routes,
            target_group_bindings,
        }
    }
}

/// Serves the webhook until `shutdown` resolves, then finishes the reviews in flight.
/// `scope`: the namespaces whose injected pods get the EndpointSlice grant.
pub async fn serve(
    client: Client,
    args: WebhookArgs,
    scope: Scope,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let material = loop {
        match load_tls(&client, &args).await {
            Ok(m) => break m,
            Err(e) => {
                warn!(error = %e, "webhook certificate not ready; retrying");
                tokio::time::sleep(CERT_RETRY).await;
            }
        }
    };
    let client_ca = args
        .client_ca
        .as_deref()
        .map(certs::ClientCa::read)
        .transpose()?;
    if client_ca.is_none() {
        warn!(
            "no --client-ca: the webhook answers any caller that reaches its port (docs/security.md)"
        );
    }
    let (tls_tx, tls_rx) = watch::channel(certs::server_config(&material, client_ca.as_ref())?);
    let require_client_cert = client_ca.is_some();
    tokio::spawn(refresh_tls(
        client.clone(),
        args.clone(),
        material,
        client_ca,
        tls_tx,
    ));

    // EndpointSlice read for the injected pods, from the pods themselves (endpoint_reader.rs).
    if args.grant_endpointslice_read {
        let reader = EndpointReader::new(
            client.clone(),
            config_owner(&client, &args.webhook_config).await,
            args.webhook_config.clone(),
            scope,
        );
        tokio::spawn(async move { reader.run().await });
    }
    let state = Arc::new(State {
        client,
        policy: Policy {
            sidecar: SidecarImage {
                image: args.sidecar_image.clone(),
                pull_policy: args.sidecar_image_pull_policy.clone(),
            },
            excluded_namespaces: vec![args.operator_namespace.clone()],
            injector: args.webhook_config.clone(),
        },
        operator_user: format!(
            "system:serviceaccount:{}:{}",
            args.operator_namespace, args.service_account
        ),
        metrics,
        around: AroundLookups::default(),
        require_client_cert,
        retiring: AtomicBool::new(false),
    });

    let listener = TcpListener::bind(args.webhook_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: args.webhook_addr,
            source,
        })?;
    info!(addr = %args.webhook_addr, "injection webhook serving");
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT);
    let mut listener = Acceptor::backing_off(listener, "webhook", Slots::new(MAX_CONNECTIONS));
    // After the signal, serve on for RETIRE_FOR, every answer closing its connection.
    let retire = async {
        shutdown.await;
        state.retiring.store(true, Ordering::Relaxed);
        info!(for_ = ?RETIRE_FOR, "injection webhook retiring its connections");
        tokio::time::sleep(RETIRE_FOR).await;
    };
    tokio::pin!(retire);
    loop {
        let Accepted {
            stream: tcp,
            peer,
            slot,
        } = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut retire => break,
        };
        let accepted = tokio::time::Instant::now();
        let acceptor = TlsAcceptor::from(tls_rx.borrow().clone());
        let state = state.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            // Verified against --client-ca in the handshake; absent for a caller without one.
            let authenticated = tls.get_ref().1.peer_certificates().is_some();
            let first = FirstRequest::default();
            let seen = first.clone();
            let service = service_fn(move |req| {
                seen.seen();
                handle(req, state.clone(), authenticated)
            });
            let conn = http.serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                result = watcher.watch(conn) => if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                },
                () = first.unused(accepted, HEADER_READ_TIMEOUT) => {}
            }
        });
    }
    info!("injection webhook draining");
    // Reviews in flight finish (the API server gives each at most its timeoutSeconds); a client
    // that keeps an idle connection open does not hold the shutdown up.
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(timeout = ?DRAIN_TIMEOUT, "webhook connections still open at the end of the drain; closing them");
    }
    Ok(())
}

async fn load_tls(client: &Client, args: &WebhookArgs) -> Result<TlsMaterial, certs::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.operator_namespace);
    match args.webhook_cert_source {
        CertSource::External => certs::read_external(&secrets, &args.webhook_secret).await,
        CertSource::Generate => {
            let names = certs::dns_names(&args.webhook_service, &args.operator_namespace);
            // The configuration first: it owns the Secret (uninstall removes both), and without
            // it there is no caBundle to write (Helm may still be creating it).
            let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
            let owner = owner_ref(&configs.get(&args.webhook_config).await?);
            let (name, config) = (&args.webhook_secret, &args.webhook_config);
            let secret = certs::ensure_generated(&secrets, name, &names, Some(owner)).await?;
            let rotation = Rotation::read(&secret, name)?;
            // Every CA in use trusted first: a renewal's step assumes it (cert_rotation.rs).
            certs::patch_ca_bundle(&configs, config, &rotation.ca_bundle()).await?;
            let Some(next) = rotation.step(Timestamp::now(), &names)? else {
                return Ok(rotation.serving);
            };
            let mut renewed = secret.clone();
            next.write(&mut renewed);
            match secrets
                .replace(name, &PostParams::default(), &renewed)
                .await
            {
                Ok(_) => {
                    info!(secret = %name, "{}", rotation.describe_step(&next));
                    certs::patch_ca_bundle(&configs, config, &next.ca_bundle()).await?;
                    Ok(next.serving)
                }
                // Another replica's step won the write; the next refresh reads what it wrote.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(rotation.serving),
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn refresh_tls(
    client: Client,
    args: WebhookArgs,
    mut current: TlsMaterial,
    client_ca: Option<certs::ClientCa>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
) {
    loop {
        tokio::time::sleep(CERT_REFRESH).await;
        match load_tls(&client, &args).await {
            Ok(m) if m == current => {}
            Ok(m) => match certs::server_config(&m, client_ca.as_ref()) {
                Ok(config) => {
                    info!("webhook certificate changed; serving the new one");
                    tx.send_replace(config);
                    current = m;
                }
                Err(e) => {
                    error!(error = %e, "new webhook certificate unusable; keeping the old one")
                }
            },
            Err(e) => warn!(error = %e, "webhook certificate refresh failed"),
        }
    }
}

/// The MutatingWebhookConfiguration as owner of the RBAC the webhook creates.
async fn config_owner(client: &Client, name: &str) -> Option<OwnerReference> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    match configs.get(name).await {
        Ok(c) => Some(owner_ref(&c)),
        Err(e) => {
            warn!(config = name, error = %e, "no owner for EndpointSlice grants; they outlive uninstall");
            None
        }
    }
}

fn owner_ref(config: &MutatingWebhookConfiguration) -> OwnerReference {
    OwnerReference {
        api_version: "admissionregistration.k8s.io/v1".to_owned(),
        kind: "MutatingWebhookConfiguration".to_owned(),
        name: config.metadata.name.clone().unwrap_or_default(),
        uid: config.metadata.uid.clone().unwrap_or_default(),
        ..Default::default()
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    authenticated: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let retiring = state.retiring.load(Ordering::Relaxed);
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if retiring {
            r.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, READYZ_PATH) => Ok(reply(StatusCode::OK, b"{\"ready\":true}".to_vec())),
        (&Method::POST, path @ (MUTATE_PATH | PACE_PATH)) => {
            let pace = path == PACE_PATH;
            let webhook = if pace { "pace" } else { "inject" };
            if state.require_client_cert && !authenticated {
                state.metrics.observe_review(webhook, "unauthenticated");
                debug!(
                    webhook,
                    "review without the API server's client certificate refused"
                );
                return Ok(reply(
                    StatusCode::FORBIDDEN,
                    b"{\"message\":\"a client certificate signed by the webhook's client CA is required\"}".to_vec(),
                ));
            }
            // A body trickled in slower than the API server's longest review would hold the
            // connection's slot for ever; hyper times only the head.
            let read = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => {
                    state.metrics.observe_review(webhook, "bad_request");
                    return Ok(reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()));
                }
                Err(_) => {
                    state.metrics.observe_review(webhook, "bad_request");
                    return Ok(reply(
                        StatusCode::REQUEST_TIMEOUT,
                        b"request body too slow".to_vec(),
                    ));
                }
            };
            let response = if pace {
                pace_deployment(&body, &state)
            } else {
                mutate(&body, &state).await
            };
            state
                .metrics
                .observe_review(webhook, review_outcome(&response));
            let review = response.into_review();
            match serde_json::to_vec(&review) {
                Ok(json) => Ok(reply(StatusCode::OK, json)),
                Err(e) => Ok(reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string().into_bytes(),
                )),
            }
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, b"{}".to_vec())),
    }
}

/// How a review ended, for `graceful_operator_webhook_reviews_total`.
fn review_outcome(response: &AdmissionResponse) -> &'static str {
    match (response.allowed, response.patch.is_some()) {
        (true, true) => "patched",
        (true, false) => "unchanged",
        // What `AdmissionResponse::invalid` answers a body that was not an AdmissionReview.
        (false, _) if response.result.reason == "InvalidRequest" => "bad_request",
        (false, _) => "rejected",
    }
}

fn pace_deployment(body: &[u8], state: &State) -> AdmissionResponse {
    let review: AdmissionReview<Deployment> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(format!("not an AdmissionReview: {e}")),
    };
    let req: Result<AdmissionRequest<Deployment>, _> = review.try_into();
    match req {
        Ok(req) => pace::review(&req, &state.operator_user),
        Err(e) => AdmissionResponse::invalid(format!("AdmissionReview without request: {e}")),
    }
}

async fn mutate(body: &[u8], state: &State) -> AdmissionResponse {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(format!("not an AdmissionReview: {e}")),
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return AdmissionResponse::invalid(format!("AdmissionReview without request: {e}"));
        }
    };
    if !admission::in_scope(&req, &state.policy) {
        return AdmissionResponse::from(&req);
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    // One budget for every API call this review makes.
    let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
    let lookup = match tokio::time::timeout_at(
        deadline,
        look_up(&state.client, &namespace, &req, &state.around, deadline),
    )
    .await
    {
        Ok(l) => l,
        Err(_) => {
            warn!(
                namespace,
                "lookups timed out; deciding on the pod's own annotations"
            );
            Lookup::default()
        }
    };
    admission::review(&req, &lookup, &state.policy, &prestop_token())
}

/// The owning Deployment's annotations (pod -> ReplicaSet -> Deployment), and the namespace's
/// Services when the pod is to be injected, and when some select it what may name them (the
/// data planes in front: Ingresses, HTTPRoutes, TargetGroupBindings). A failed lookup decides
/// on what is known.
async fn look_up(
    client: &Client,
    namespace: &str,
    req: &AdmissionRequest<Pod>,
    around: &AroundLookups,
    deadline: tokio::time::Instant,
) -> Lookup {
    let mut lookup = Lookup::default();
    let Some(pod) = req.object.as_ref() else {
        return lookup;
    };
    if let Some(rs) = controller(pod.metadata.owner_references.as_deref(), "ReplicaSet") {
        match owner_annotations(client, namespace, pod, &rs).await {
            Ok(a) => lookup.owner_annotations = a,
            Err(e) => warn!(namespace, replicaset = rs, error = %e, "owner lookup failed"),
        }
    }
    let empty = BTreeMap::new();
    let all = annotations::merged(
        &lookup.owner_annotations,
        pod.metadata.annotations.as_ref().unwrap_or(&empty),
    );
    if annotations::wants_injection(&all) == Ok(true) {
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        match services.list(&ListParams::default()).await {
            Ok(list) => lookup.services = list.items,
            Err(e) => {
                warn!(namespace, error = %e, "listing Services failed; no targetPort warnings")
            }
        }
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        if lookup
            .services
            .iter()
            .any(|svc| inject::selects(svc, labels))
        {
            let until = deadline.checked_sub(AROUND_RESERVE).unwrap_or(deadline);
            lookup.around = around.look(client, namespace, until).await;
        }
    }
    lookup
}

/// The annotations of the Deployment that owns `replicaset`, `pod`'s owner. The Deployment
/// controller names its ReplicaSets `<deployment>-<pod-template-hash>` and puts that hash on
/// their pods, so one GET finds the Deployment, taken as the owner when its selector matches
/// the pod (the Deployment controller adopts exactly the ReplicaSets whose pods it selects).
/// A ReplicaSet named otherwise is followed as before: pod -> ReplicaSet -> Deployment. Every
/// pod creation the webhook sees waits on these calls, injected or not; at 11,000 pods on a
/// busy apiserver each took about 55 ms (docs/scale.md).
async fn owner_annotations(
    client: &Client,
    namespace: &str,
    pod: &Pod,
    replicaset: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    if let Some(name) = deployment_by_name(replicaset, pod)
        && let Some(deployment) = deployments.get_opt(name).await?
        && selects(&deployment, pod)
    {
        return Ok(deployment.metadata.annotations.unwrap_or_default());
    }
    let Some(rs) = Api::<ReplicaSet>::namespaced(client.clone(), namespace)
        .get_opt(replicaset)
        .await?
    else {
        return Ok(BTreeMap::new());
    };
    let Some(deploy) = controller(rs.metadata.owner_references.as_deref(), "Deployment") else {
        return Ok(BTreeMap::new());
    };
    Ok(deployments
        .get_opt(&deploy)
        .await?
        .and_then(|d| d.metadata.annotations)
        .unwrap_or_default())
}

/// The Deployment a ReplicaSet's name says it belongs to: the name less `-<pod-template-hash>`.
fn deployment_by_name<'a>(replicaset: &'a str, pod: &Pod) -> Option<&'a str> {
    let hash = pod.metadata.labels.as_ref()?.get(POD_TEMPLATE_HASH)?;
    replicaset
        .strip_suffix(hash.as_str())?
        .strip_suffix('-')
        .filter(|name| !name.is_empty())
}

fn selects(deployment: &Deployment, pod: &Pod) -> bool {
    let Some(spec) = deployment.spec.as_ref() else {
        return false;
    };
    let Ok(selector) = Selector::try_from(spec.selector.clone()) else {
        return false;
    };
    let none = BTreeMap::new();
    !selector.selects_all() && selector.matches(pod.metadata.labels.as_ref().unwrap_or(&none))
}

fn controller(owners: Option<&[OwnerReference]>, kind: &str) -> Option<String> {
    owners?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == kind)
        .map(|o| o.name.clone())
}

/// 256 random bits, hex: the pod's preStop credential.
fn prestop_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    #[test]
    fn a_replicaset_belongs_to_the_deployment_that_controls_it() {
        let native = [owner("Deployment", "web", true)];
        assert_eq!(
            controller(Some(&native), "Deployment").as_deref(),
            Some("web")
        );
        let other = [owner("Deployment", "web", false)];
        assert_eq!(controller(Some(&other), "Deployment"), None);
        assert_eq!(controller(None, "Deployment"), None);
    }

    #[test]
    fn only_the_controlling_replicaset_of_a_pod_counts() {
        let owners = [
            owner("ReplicaSet", "other", false),
            owner("ReplicaSet", "web-1", true),
        ];
        assert_eq!(
            controller(Some(&owners), "ReplicaSet").as_deref(),
            Some("web-1")
        );
    }

    #[test]
    fn prestop_tokens_are_long_and_differ() {
        let (a, b) = (prestop_token(), prestop_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn reviews_are_counted_by_what_they_answered() {
        let not_a_review = AdmissionResponse::invalid("not an AdmissionReview");
        assert_eq!(review_outcome(&not_a_review), "bad_request");
        let review: AdmissionReview<Pod> =
            serde_json::from_value(super::super::tests::fixture()).unwrap();
        let req: AdmissionRequest<Pod> = review.try_into().unwrap();
        let allowed = AdmissionResponse::from(&req);
        assert_eq!(review_outcome(&allowed), "unchanged");
        assert_eq!(
            review_outcome(&allowed.clone().deny("bad annotation")),
            "rejected"
        );
    }

    fn annotated(mut obj: serde_json::Value) -> serde_json::Value {
        obj["metadata"]["annotations"] = serde_json::json!({annotations::INJECT: "true"});
        obj
    }

    fn deployment_pod(replicaset: &str) -> Pod {
        let mut pod = fixtures::pod("web-1", "6d8f7c9b4", None);
        pod["metadata"]["ownerReferences"][0]["name"] = replicaset.into();
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn a_replicaset_name_less_its_pods_hash_names_the_deployment() {
        let pod = deployment_pod("web-6d8f7c9b4");
        assert_eq!(deployment_by_name("web-6d8f7c9b4", &pod), Some("web"));
        assert_eq!(deployment_by_name("my-web-6d8f7c9b4", &pod), Some("my-web"));
        // Named otherwise (adopted), or no hash on the pod: follow the ReplicaSet instead.
        assert_eq!(deployment_by_name("web-adopted", &pod), None);
        assert_eq!(deployment_by_name("web6d8f7c9b4", &pod), None);
        assert_eq!(deployment_by_name("-6d8f7c9b4", &pod), None);
        let mut bare = pod.clone();
        bare.metadata.labels = None;
        assert_eq!(deployment_by_name("web-6d8f7c9b4", &bare), None);
    }

    #[tokio::test]
    async fn a_deployments_pod_costs_one_get() {
        let api = fixtures::FakeApi::default();
        api.put(annotated(fixtures::deployment("v1", 3, false, None)));
        let pod = deployment_pod("web-6d8f7c9b4");
        let found = owner_annotations(&api.client(), fixtures::NS, &pod, "web-6d8f7c9b4")
            .await
            .unwrap();
        assert_eq!(
            found.get(annotations::INJECT).map(String::as_str),
            Some("true")
        );
        assert_eq!(
            api.reads(),
            [format!(
                "/apis/apps/v1/namespaces/{}/deployments/web",
                fixtures::NS
            )]
        );
    }

    #[tokio::test]
    async fn a_replicaset_named_otherwise_is_followed_to_its_deployment() {
        let api = fixtures::FakeApi::default();
        api.put(annotated(fixtures::deployment("v1", 3, false, None)));
        let mut rs = fixtures::replica_set("v1", "6d8f7c9b4", 3, 0, 60);
        rs["metadata"]["name"] = "web-adopted".into();
        api.put(rs);
        let pod = deployment_pod("web-adopted");
        let found = owner_annotations(&api.client(), fixtures::NS, &pod, "web-adopted")
            .await
            .unwrap();
        assert_eq!(
            found.get(annotations::INJECT).map(String::as_str),
            Some("true")
        );
        assert_eq!(api.reads().len(), 2, "{:?}", api.reads());
    }

    #[tokio::test]
    async fn a_deployment_named_alike_that_does_not_select_the_pod_is_not_its_owner() {
        let api = fixtures::FakeApi::default();
        // `web` selects app=shop, not the pod (app=web): its annotations are not the pod's,
        // and the ReplicaSet it would own is absent, so nothing is known.
        let mut other = annotated(fixtures::deployment("v1", 3, false, None));
        other["spec"]["selector"] = serde_json::json!({"matchLabels": {"app": "shop"}});
        api.put(other);
        let pod = deployment_pod("web-6d8f7c9b4");
        let found = owner_annotations(&api.client(), fixtures::NS, &pod, "web-6d8f7c9b4")
            .await
            .unwrap();
        assert!(found.is_empty(), "{found:?}");
    }

    pub(super) fn state_of(api: &fixtures::FakeApi) -> State {
        let client = api.client();
        State {
            client: client.clone(),
            policy: super::super::tests::policy(),
            operator_user: "system:serviceaccount:graceful:graceful-operator".into(),
            metrics: Arc::new(Metrics::new(
                &mut prometheus_client::registry::Registry::default(),
            )),
            around: AroundLookups::default(),
            require_client_cert: false,
            retiring: AtomicBool::new(false),
        }
    }

    /// The pod's sidecar's GRACEFUL_DATA_PLANES after a review through the fake API.
    async fn reviewed(state: &State) -> (AdmissionResponse, String) {
        let review_json = super::super::tests::fixture();
        let body = serde_json::to_vec(&review_json).unwrap();
        let response = mutate(&body, state).await;
        let mut pod = review_json["request"]["object"].clone();
        let ops: json_patch::Patch =
            serde_json::from_slice(response.patch.as_ref().expect("a patch")).unwrap();
        json_patch::patch(&mut pod, &ops).unwrap();
        let env = pod["spec"]["initContainers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == data_planes::ENV_DATA_PLANES)
            .and_then(|e| e["value"].as_str())
            .unwrap()
            .to_owned();
        (response, env)
    }

    fn service(name: &str, selector: &str, kind: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": fixtures::NS},
            "spec": {"type": kind, "selector": {"app": selector},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        })
    }

    fn route(backend: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": fixtures::NS},
            "spec": {"parentRefs": [{"name": "public"}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}
        })
    }

    #[tokio::test]
    async fn the_data_planes_are_looked_up_around_the_services_that_select_the_pod() {
        let api = fixtures::FakeApi::default();
        api.put(service("web", "web", "LoadBalancer"));
        api.put(route("web"));
        let state = state_of(&api);
        let (response, env) = reviewed(&state).await;
        assert!(response.allowed);
        assert_eq!(
            env,
            "kube-proxy=5s,load-balancer/web=120s,gateway/public=10s"
        );
        let reads = api.reads().join("\n");
        for kind in ["services", "ingresses", "httproutes", "targetgroupbindings"] {
            assert!(reads.contains(&format!("/{kind}")), "{reads}");
        }
    }

    #[tokio::test]
    async fn no_service_selects_the_pod_no_data_plane_lookups() {
        let api = fixtures::FakeApi::default();
        api.put(service("other", "other", "LoadBalancer"));
        let state = state_of(&api);
        let (_, env) = reviewed(&state).await;
        assert_eq!(env, "kube-proxy=5s");
        let reads = api.reads().join("\n");
        assert!(!reads.contains("/ingresses"), "{reads}");
    }

    #[tokio::test]
    async fn a_review_writes_nothing() {
        // Anyone who reaches the webhook can send it a review: answering one changes nothing in
        // the cluster (the EndpointSlice grants follow admitted pods: endpoint_reader.rs).
        let api = fixtures::FakeApi::default();
        api.put(service("web", "web", "LoadBalancer"));
        let state = state_of(&api);
        let (response, _) = reviewed(&state).await;
        assert!(response.allowed && response.patch.is_some());
        assert!(api.writes().is_empty(), "{:?}", api.writes());
    }

    #[tokio::test]
    async fn a_crd_that_is_not_installed_is_not_asked_for_again() {
        let api = fixtures::FakeApi::default();
        api.put(service("web", "web", "ClusterIP"));
        let state = state_of(&api);
        let asked = |kind: &str| api.reads().iter().filter(|r| r.ends_with(kind)).count();
        reviewed(&state).await;
        reviewed(&state).await;
        // Both 404 (no Gateway API, no AWS controller): asked once; Ingresses every time.
        assert_eq!(asked("/httproutes"), 1);
        assert_eq!(asked("/targetgroupbindings"), 1);
        assert_eq!(asked("/ingresses"), 2);
    }

    #[tokio::test]
    async fn a_forbidden_lookup_leaves_its_kind_out_and_admits_the_pod() {
        let api = fixtures::FakeApi::default();
        api.put(service("web", "web", "LoadBalancer"));
        api.put(route("web"));
        api.forbid("/httproutes");
        api.forbid("/ingresses");
        let state = state_of(&api);
        let (response, env) = reviewed(&state).await;
        assert!(response.allowed);
        assert_eq!(env, "kube-proxy=5s,load-balancer/web=120s");
        // Warned once per kind; a forbidden kind is asked again (RBAC may be fixed).
        assert!(state.around.warned.lock().unwrap().contains("httproutes"));
        reviewed(&state).await;
        let asked = api
            .reads()
            .iter()
            .filter(|r| r.ends_with("/httproutes"))
            .count();
        assert_eq!(asked, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_apiserver_costs_a_review_at_most_its_lookup_budget() {
        let (client, hung) = crate::fixtures::FakeApi::default().hangable_client();
        hung.store(true, std::sync::atomic::Ordering::Relaxed);
        let state = State {
            client: client.clone(),
            policy: super::super::tests::policy(),
            operator_user: "system:serviceaccount:graceful:graceful-operator".into(),
            metrics: Arc::new(Metrics::new(
                &mut prometheus_client::registry::Registry::default(),
            )),
            around: AroundLookups::default(),
            require_client_cert: false,
            retiring: AtomicBool::new(false),
        };
        let body = serde_json::to_vec(&super::super::tests::fixture()).unwrap();
        let started = tokio::time::Instant::now();
        let response = tokio::time::timeout(LOOKUP_TIMEOUT * 3, mutate(&body, &state))
            .await
            .expect("a review answers while the apiserver hangs");
        assert!(started.elapsed() <= LOOKUP_TIMEOUT);
        // Decided on the pod's own annotation.
        assert!(response.allowed && response.patch.is_some());
    }
}

/// AdmissionReview bodies are outside input (any caller without --client-ca, and the pods whose
/// creation they carry): whatever arrives, the webhook answers with a review that serializes.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::fixtures;

    fn answer(body: &[u8]) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let response = rt.block_on(async {
            let api = fixtures::FakeApi::default();
            mutate(body, &super::tests::state_of(&api)).await
        });
        serde_json::to_vec(&response.into_review()).expect("the answer serializes")
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Fields of the pod-creation fixture a caller could set to anything.
    const POINTERS: [&str; 12] = [
        "/request",
        "/request/uid",
        "/request/kind",
        "/request/namespace",
        "/request/operation",
        "/request/object",
        "/request/object/metadata",
        "/request/object/metadata/annotations",
        "/request/object/spec",
        "/request/object/spec/containers",
        "/request/object/spec/containers/0",
        "/request/object/spec/containers/0/ports",
    ];

    proptest! {
        #[test]
        fn any_bytes_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..512)) {
            answer(&body);
        }

        #[test]
        fn a_review_with_any_field_replaced_gets_an_answer(
            at in prop::sample::select(POINTERS.to_vec()),
            value in json(),
        ) {
            let mut review = super::super::tests::fixture();
            if let Some(field) = review.pointer_mut(at) {
                *field = value;
            }
            answer(&serde_json::to_vec(&review).unwrap());
        }
    }
}
