//! The injection itself: a pure function from a Pod (and what the webhook looked up around it)
//! to the Pod graceful wants, or a refusal. No I/O here, so every rule has a unit test.

use std::collections::BTreeMap;
use std::time::Duration;

use graceful_sidecar::defaults;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, HTTPHeader,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::annotations::{self, GracePolicy, PortRef, Settings};
use super::data_planes::{self, Around, DataPlane};
use crate::names::ADMIN_PORT_NAME;

/// Name of the injected init container; its presence means "already injected".
pub const SIDECAR_NAME: &str = "graceful-sidecar";
/// Grace period on top of deregistration and drain: the app's own exit after SIGTERM, and the
/// sidecar's, once the drain is done.
pub const GRACE_MARGIN: Duration = Duration::from_secs(5);
/// Kubernetes' default terminationGracePeriodSeconds.
const DEFAULT_GRACE_PERIOD_SECS: i64 = 30;
/// Name of the sidecar's traffic port when the app port had no name to take over.
const FALLBACK_TRAFFIC_PORT_NAME: &str = "graceful-http";
/// Where the ServiceAccount admission plugin mounts the API token.
const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The distroless "nonroot" user: the sidecar needs no identity on the node.
const SIDECAR_UID: i64 = 65532;

/// What the operator was configured to inject.
#[derive(Debug, Clone)]
pub struct SidecarImage {
    pub image: String,
    pub pull_policy: String,
}

/// Everything the injector needs besides the pod, looked up by the webhook.
pub struct Context<'a> {
    /// Annotations of the Deployment that owns the pod (through its ReplicaSet), if any.
    pub owner_annotations: &'a BTreeMap<String, String>,
    /// Services of the pod's namespace (the injector picks those that select the pod).
    pub services: &'a [Service],
    /// What may name those Services: Ingresses, HTTPRoutes, TargetGroupBindings.
    pub around: &'a Around,
    pub sidecar: &'a SidecarImage,
    /// Random per pod: the kubelet presents it on preStop, the sidecar checks it.
    pub prestop_token: &'a str,
}

#[derive(Debug)]
pub enum Outcome {
    /// Leave the pod exactly as it is.
    Skip(&'static str),
    /// The pod to create instead, and what the user should know about it.
    Inject {
        pod: Box<Pod>,
        warnings: Vec<String>,
    },
    /// Refuse the pod; the message tells what to fix.
    Reject(String),
}

/// The app port the sidecar fronts: its number (the sidecar's upstream) and the name Services
/// use to reach it, which moves to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppPort {
    number: u16,
    name: Option<String>,
}

pub fn inject(pod: &Pod, ctx: &Context<'_>) -> Outcome {
    let empty = BTreeMap::new();
    let pod_annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let all = annotations::merged(ctx.owner_annotations, pod_annotations);
    match annotations::wants_injection(&all) {
        Ok(true) => {}
        Ok(false) => return Outcome::Skip("no graceful.dev/inject=true annotation"),
        Err(e) => return Outcome::Reject(e.to_string()),
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Outcome::Skip("pod without spec");
    };
    if spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == SIDECAR_NAME)
    {
        return Outcome::Skip("already injected");
    }
    if spec.host_network == Some(true) {
        return Outcome::Reject(format!(
            "{}: a hostNetwork pod cannot be injected (the sidecar's ports {} and {} would be the node's)",
            annotations::INJECT,
            defaults::TRAFFIC_PORT,
            defaults::ADMIN_PORT
        ));
    }
    let settings = match Settings::from_annotations(&all) {
        Ok(s) => s,
        Err(e) => return Outcome::Reject(e.to_string()),
    };
    match build(pod, &all, &settings, ctx) {
        Ok((pod, warnings)) => Outcome::Inject {
            pod: Box::new(pod),
            warnings,
        },
        Err(message) => Outcome::Reject(message),
    }
}

fn build(
    original: &Pod,
    all: &BTreeMap<String, String>,
    settings: &Settings,
    ctx: &Context<'_>,
) -> Result<(Pod, Vec<String>), String> {
    let mut pod = original.clone();
    let mut warnings = Vec::new();
    let spec = pod.spec.as_mut().expect("checked by inject");

    let app_index = app_container(&spec.containers, all, settings)?;
    check_port_clash(
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten()),
    )?;
    let app = &mut spec.containers[app_index];
    let port = app_port(app, settings)?;
    if let Some(name) = &port.name {
        take_over_port(app, name, port.number);
    }
    replace_prestop(app, ctx.prestop_token, &mut warnings)?;
    let app_name = app.name.clone();

    let labels = original.metadata.labels.clone().unwrap_or_default();
    let (planes, settings) = size_for_data_planes(settings, &labels, ctx, &mut warnings);
    let settings = &settings;
    let mut sidecar = sidecar_container(settings, &port, &labels, &planes, ctx);
    // The ServiceAccount admission plugin ran before this webhook and mounted the API token
    // only into the containers that existed then: the sidecar needs it to watch EndpointSlices.
    let token_mounts: Vec<VolumeMount> = app
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path == SERVICE_ACCOUNT_PATH)
        .cloned()
        .collect();
    if !token_mounts.is_empty() {
        sidecar.volume_mounts = Some(token_mounts);
    }
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .push(sidecar);

    let required = grace_needed(settings);
    let current = spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_PERIOD_SECS);
    if current < required {
        let budget = format!(
            "deregister {} + drain {} + margin {}",
            human(settings.deregister_delay),
            human(settings.drain_timeout),
            human(GRACE_MARGIN)
        );
        match settings.grace_policy {
            GracePolicy::Raise => {
                spec.termination_grace_period_seconds = Some(required);
                warnings.push(format!(
                    "graceful: terminationGracePeriodSeconds raised from {current} to {required} ({budget})"
                ));
            }
            GracePolicy::Reject => {
                let lag = data_planes::hold(&planes);
                let lag = if lag.is_zero() {
                    String::new()
                } else {
                    format!(
                        " (the drain covers a data-plane lag of {}: {})",
                        human(lag),
                        annotations::DATA_PLANE_LAG
                    )
                };
                return Err(format!(
                    "terminationGracePeriodSeconds {current} is shorter than the drain needs: {required} \
                     ({budget}); raise it, shorten {} / {}{lag}, or drop {}=reject to have it raised",
                    annotations::DRAIN_TIMEOUT,
                    annotations::DEREGISTER_DELAY,
                    annotations::GRACE_PERIOD
                ));
            }
        }
    }

    warnings.extend(bypassing_services(original, ctx.services, &port));
    if port.name.is_none() {
        warnings.push(format!(
            "graceful: port {} of container {app_name} has no name to take over; Services reach the \
             sidecar only with targetPort: {FALLBACK_TRAFFIC_PORT_NAME}",
            port.number
        ));
    }

    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotations::INJECTED.to_owned(), ctx.sidecar.image.clone());
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(annotations::INJECTED_LABEL.to_owned(), "true".to_owned());
    Ok((pod, warnings))
}

/// The data planes in front of the pod (declared, else detected) and the settings with the drain
/// timeout raised to cover their lag, which the sidecar requires; a raise is said in a warning.
fn size_for_data_planes(
    settings: &Settings,
    labels: &BTreeMap<String, String>,
    ctx: &Context<'_>,
    warnings: &mut Vec<String>,
) -> (Vec<DataPlane>, Settings) {
    let selecting: Vec<&Service> = ctx
        .services
        .iter()
        .filter(|svc| selects(svc, labels))
        .collect();
    let detected = match settings.data_plane_lag {
        Some(_) => Vec::new(),
        None => data_planes::detect(&selecting, ctx.around),
    };
    let planes = data_planes::plan(
        settings.propagation_margin,
        settings.data_plane_lag,
        detected,
    );
    let hold = data_planes::hold(&planes);
    let mut sized = settings.clone();
    sized.drain_timeout =
        data_planes::drain_timeout(settings.drain_timeout, settings.deregister_delay, hold);
    if sized.drain_timeout > settings.drain_timeout {
        let slowest: Vec<&str> = planes
            .iter()
            .filter(|d| !d.is_kube_proxy() && d.lag == hold)
            .map(|d| d.name.as_str())
            .collect();
        warnings.push(format!(
            "graceful: drain timeout raised from {} to {} to cover a data-plane lag of {} ({}) plus {}; \
             state the lag with {} if it is shorter (docs/data-planes.md)",
            human(settings.drain_timeout),
            human(sized.drain_timeout),
            human(hold),
            slowest.join(", "),
            human(data_planes::HOLD_SLACK),
            annotations::DATA_PLANE_LAG
        ));
    }
    (planes, sized)
}

/// Whole seconds covering deregistration, drain and the margin.
pub fn grace_needed(settings: &Settings) -> i64 {
    let total = settings.deregister_delay + settings.drain_timeout + GRACE_MARGIN;
    total.as_secs() as i64 + i64::from(total.subsec_nanos() > 0)
}

fn app_container(
    containers: &[Container],
    all: &BTreeMap<String, String>,
    settings: &Settings,
) -> Result<usize, String> {
    let (wanted, key) = match (
        &settings.app_container,
        all.get(annotations::DEFAULT_CONTAINER),
    ) {
        (Some(name), _) => (name.as_str(), annotations::APP_CONTAINER),
        (None, Some(name)) => (name.as_str(), annotations::DEFAULT_CONTAINER),
        (None, None) if containers.is_empty() => return Err("pod has no containers".into()),
        (None, None) => return Ok(0),
    };
    containers
        .iter()
        .position(|c| c.name == wanted)
        .ok_or_else(|| format!("annotation {key}: the pod has no container named {wanted:?}"))
}

/// The port named by the annotation; else the port named `http`; else the only TCP port; else
/// the sidecar's default upstream port.
fn app_port(app: &Container, settings: &Settings) -> Result<AppPort, String> {
    let tcp = || {
        app.ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
    };
    let found = |p: &ContainerPort| AppPort {
        number: p.container_port as u16,
        name: p.name.clone(),
    };
    let port = match &settings.app_port {
        Some(PortRef::Name(name)) => tcp()
            .find(|p| p.name.as_ref() == Some(name))
            .map(found)
            .ok_or_else(|| {
                format!(
                    "annotation {}: container {} has no TCP port named {name:?}",
                    annotations::APP_PORT,
                    app.name
                )
            })?,
        Some(PortRef::Number(n)) => tcp()
            .find(|p| p.container_port == i32::from(*n))
            .map(found)
            .unwrap_or(AppPort {
                number: *n,
                name: None,
            }),
        None => {
            let mut ports = tcp();
            if let Some(http) = tcp().find(|p| p.name.as_deref() == Some("http")) {
                found(http)
            } else if let (Some(only), None) = (ports.next(), ports.next()) {
                found(only)
            } else {
                AppPort {
                    number: defaults::UPSTREAM_PORT,
                    name: None,
                }
            }
        }
    };
    if port.number == defaults::TRAFFIC_PORT || port.number == defaults::ADMIN_PORT {
        return Err(format!(
            "container {} serves on port {}, which the sidecar needs; move the app or set {}",
            app.name,
            port.number,
            annotations::APP_PORT
        ));
    }
    Ok(port)
}

fn check_port_clash<'a>(containers: impl Iterator<Item = &'a Container>) -> Result<(), String> {
    for c in containers {
        for p in c.ports.iter().flatten() {
            let n = p.container_port;
            if n == i32::from(defaults::TRAFFIC_PORT) || n == i32::from(defaults::ADMIN_PORT) {
                return Err(format!(
                    "container {} declares port {n}, which the graceful sidecar needs ({} traffic, {} admin)",
                    c.name,
                    defaults::TRAFFIC_PORT,
                    defaults::ADMIN_PORT
                ));
            }
        }
    }
    Ok(())
}

/// Moves the port name from the app to the sidecar: Kubernetes resolves a Service's named
/// targetPort in the regular containers first, so the name must leave the app. Probes that
/// used the name now use the number (the app still listens there).
fn take_over_port(app: &mut Container, name: &str, number: u16) {
    for p in app.ports.iter_mut().flatten() {
        if p.name.as_deref() == Some(name) {
            p.name = None;
        }
    }
    let by_number = |port: &mut IntOrString| {
        if *port == IntOrString::String(name.to_owned()) {
            *port = IntOrString::Int(i32::from(number));
        }
    };
    for probe in [
        &mut app.liveness_probe,
        &mut app.readiness_probe,
        &mut app.startup_probe,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(h) = probe.http_get.as_mut() {
            by_number(&mut h.port);
        }
        if let Some(t) = probe.tcp_socket.as_mut() {
            by_number(&mut t.port);
        }
    }
    if let Some(lifecycle) = app.lifecycle.as_mut() {
        for handler in [&mut lifecycle.post_start, &mut lifecycle.pre_stop]
            .into_iter()
            .flatten()
        {
            if let Some(h) = handler.http_get.as_mut() {
                by_number(&mut h.port);
            }
            if let Some(t) = handler.tcp_socket.as_mut() {
                by_number(&mut t.port);
            }
        }
    }
}

/// The app's preStop becomes the sidecar's drain. A `sleep` hook was the usual workaround for
/// the same race and is replaced; any other hook does work graceful cannot know about.
fn replace_prestop(
    app: &mut Container,
    token: &str,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let lifecycle = app.lifecycle.get_or_insert_with(Lifecycle::default);
    if let Some(old) = &lifecycle.pre_stop {
        if let Some(sleep) = &old.sleep {
            warnings.push(format!(
                "graceful: the preStop sleep of {}s on container {} is replaced by the sidecar's drain",
                sleep.seconds, app.name
            ));
        } else {
            return Err(format!(
                "container {} already has a preStop hook; graceful needs it to trigger the drain \
                 (remove the hook, or set {}: \"false\")",
                app.name,
                annotations::INJECT
            ));
        }
    }
    lifecycle.pre_stop = Some(LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some(defaults::PRESTOP_PATH.to_owned()),
            port: IntOrString::Int(i32::from(defaults::ADMIN_PORT)),
            scheme: Some("HTTP".to_owned()),
            http_headers: Some(vec![HTTPHeader {
                name: "Authorization".to_owned(),
                value: format!("Bearer {token}"),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    Ok(())
}

fn sidecar_container(
    settings: &Settings,
    port: &AppPort,
    original_labels: &BTreeMap<String, String>,
    planes: &[DataPlane],
    ctx: &Context<'_>,
) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let env_from = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(field(path)),
        ..Default::default()
    };
    let traffic_name = port
        .name
        .clone()
        .unwrap_or_else(|| FALLBACK_TRAFFIC_PORT_NAME.to_owned());
    let quantity = |q: &str| Quantity(q.to_owned());
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(ctx.sidecar.image.clone()),
        image_pull_policy: Some(ctx.sidecar.pull_policy.clone()),
        // A native sidecar: started before the app, stopped after it.
        restart_policy: Some("Always".to_owned()),
        args: Some(vec![
            "--listen".into(),
            format!("0.0.0.0:{}", defaults::TRAFFIC_PORT),
            "--upstream".into(),
            format!("127.0.0.1:{}", port.number),
            "--admin".into(),
            format!("0.0.0.0:{}", defaults::ADMIN_PORT),
            "--deregister-delay".into(),
            format!("{}ms", settings.deregister_delay.as_millis()),
            "--drain-timeout".into(),
            format!("{}ms", settings.drain_timeout.as_millis()),
            "--propagation-margin".into(),
            format!("{}ms", settings.propagation_margin.as_millis()),
            "--quiet-window".into(),
            settings
                .quiet_window
                .map_or_else(|| "auto".to_owned(), |d| format!("{}ms", d.as_millis())),
            "--min-quiet-window".into(),
            format!("{}ms", settings.min_quiet_window.as_millis()),
            "--upstream-restart-wait".into(),
            format!("{}ms", settings.upstream_restart_wait.as_millis()),
            "--stream-leave-after".into(),
            format!("{}ms", settings.stream_leave_after.as_millis()),
        ]),
        env: Some(vec![
            env_from(defaults::ENV_POD_IP, "status.podIP"),
            env_from(defaults::ENV_POD_NAMESPACE, "metadata.namespace"),
            env_from(defaults::ENV_POD_NAME, "metadata.name"),
            env_from(defaults::ENV_HOST_IP, "status.hostIP"),
            EnvVar {
                name: defaults::ENV_PRESTOP_TOKEN.to_owned(),
                value: Some(ctx.prestop_token.to_owned()),
                ..Default::default()
            },
            // The drain watches only these Services' EndpointSlices. One created after the pod
            // is not watched; the quiet window still covers it (docs/drain.md).
            EnvVar {
                name: defaults::ENV_SERVICES.to_owned(),
                value: Some(selecting_services(original_labels, ctx.services).join(",")),
                ..Default::default()
            },
            // What may send the pod traffic and for how long after it leaves the
            // EndpointSlices: the drain holds for the largest lag (docs/data-planes.md).
            EnvVar {
                name: data_planes::ENV_DATA_PLANES.to_owned(),
                value: Some(data_planes::env_value(planes)),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(traffic_name),
                container_port: i32::from(defaults::TRAFFIC_PORT),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(defaults::ADMIN_PORT),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(defaults::READYZ_PATH.to_owned()),
                port: IntOrString::Int(i32::from(defaults::ADMIN_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(1),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity("10m")),
                ("memory".to_owned(), quantity("16Mi")),
            ])),
            // No CPU limit: throttling a proxy adds latency to every request.
            limits: Some(BTreeMap::from([("memory".to_owned(), quantity("128Mi"))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    }
}

/// Whether the Service's selector picks a pod with these labels (a Service without one picks
/// none: its endpoints are managed by hand).
pub(crate) fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
        .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The names of the Services that select a pod with these labels, sorted.
fn selecting_services(labels: &BTreeMap<String, String>, services: &[Service]) -> Vec<String> {
    let mut names: Vec<String> = services
        .iter()
        .filter(|svc| selects(svc, labels))
        .filter_map(|svc| svc.metadata.name.clone())
        .collect();
    names.sort();
    names
}

/// Services that select this pod but reach the app port by number go around the sidecar.
fn bypassing_services(pod: &Pod, services: &[Service], port: &AppPort) -> Vec<String> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut warnings = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref().filter(|_| selects(svc, labels)) else {
            continue;
        };
        for sp in spec.ports.iter().flatten() {
            if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
            if target == IntOrString::Int(i32::from(port.number)) {
                warnings.push(format!(
                    "graceful: Service {} targets port {} by number, so its traffic bypasses the \
                     sidecar; use targetPort: {}",
                    svc.metadata.name.as_deref().unwrap_or("?"),
                    port.number,
                    port.name.as_deref().unwrap_or(FALLBACK_TRAFFIC_PORT_NAME)
                ));
            }
        }
    }
    warnings
}

fn human(d: Duration) -> String {
    data_planes::duration_text(d)
}
