//! The webhook on AdmissionReview fixtures: the request the API server sends for a pod the
//! ReplicaSet controller creates, varied per case; the JSON patch is applied the way the API
//! server applies it, and the resulting pod is what the assertions look at.

use std::collections::BTreeMap;

use graceful_sidecar::defaults;
use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};

use super::admission::{Lookup, Policy, review};
use super::annotations as ann;
use super::data_planes::{Around, ENV_DATA_PLANES};
use super::inject::{SIDECAR_NAME, SidecarImage};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const IMAGE: &str = "localhost/graceful-sidecar:dev";

pub(super) fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/pod-create.json")).unwrap()
}

fn services() -> Vec<Service> {
    serde_json::from_str(include_str!("fixtures/services.json")).unwrap()
}

pub(super) fn policy() -> Policy {
    Policy {
        sidecar: SidecarImage {
            image: IMAGE.into(),
            pull_policy: "Never".into(),
        },
        excluded_namespaces: vec!["graceful-system".into()],
        injector: "graceful-sidecar-injector".into(),
    }
}

fn request(review_json: &Value) -> AdmissionRequest<Pod> {
    let review: AdmissionReview<Pod> = serde_json::from_value(review_json.clone()).unwrap();
    review.try_into().unwrap()
}

fn run_with(review_json: &Value, lookup: &Lookup) -> AdmissionResponse {
    let response = review(&request(review_json), lookup, &policy(), TOKEN);
    // What goes back to the API server must serialize.
    serde_json::to_vec(&response.clone().into_review()).unwrap();
    response
}

fn run(review_json: &Value) -> AdmissionResponse {
    run_with(
        review_json,
        &Lookup {
            services: services(),
            ..Default::default()
        },
    )
}

/// The pod as the API server stores it after applying our patch.
fn patched(review_json: &Value, response: &AdmissionResponse) -> Pod {
    let mut pod = review_json["request"]["object"].clone();
    let ops: json_patch::Patch =
        serde_json::from_slice(response.patch.as_ref().expect("a patch")).unwrap();
    json_patch::patch(&mut pod, &ops).unwrap();
    serde_json::from_value(pod).unwrap()
}

fn object(v: &mut Value) -> &mut Value {
    &mut v["request"]["object"]
}

fn sidecar(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
        .expect("sidecar injected")
}

fn warnings(r: &AdmissionResponse) -> Vec<String> {
    r.warnings.clone().unwrap_or_default()
}

fn denial(r: &AdmissionResponse) -> String {
    assert!(!r.allowed, "expected a denial");
    assert!(r.patch.is_none());
    r.result.message.clone()
}

#[test]
fn annotated_pod_gets_a_native_sidecar_in_the_traffic_path() {
    let review_json = fixture();
    let r = run(&review_json);
    assert!(r.allowed);
    let pod = patched(&review_json, &r);
    let spec = pod.spec.as_ref().unwrap();
    let side = sidecar(&pod);
    assert_eq!(side.restart_policy.as_deref(), Some("Always"));
    assert_eq!(side.image.as_deref(), Some(IMAGE));
    let args = side.args.clone().unwrap().join(" ");
    assert!(args.contains("--upstream 127.0.0.1:8080"), "{args}");
    assert!(
        args.contains(&format!("--listen 0.0.0.0:{}", defaults::TRAFFIC_PORT)),
        "{args}"
    );
    assert!(
        args.contains("--drain-timeout 30000ms --") || args.ends_with("--drain-timeout 30000ms"),
        "{args}"
    );

    // The Service's named port now resolves to the sidecar: the name left the app container.
    let side_ports = side.ports.clone().unwrap();
    assert!(side_ports.iter().any(|p| p.name.as_deref() == Some("http")
        && p.container_port == i32::from(defaults::TRAFFIC_PORT)));
    let app = &spec.containers[0];
    let app_ports = app.ports.clone().unwrap();
    assert!(app_ports.iter().all(|p| p.name.as_deref() != Some("http")));
    assert!(
        app_ports
            .iter()
            .any(|p| p.container_port == 8080 && p.name.is_none())
    );
    assert_eq!(
        app_ports
            .iter()
            .find(|p| p.container_port == 9100)
            .unwrap()
            .name
            .as_deref(),
        Some("metrics")
    );
    // The app's probe used the name; it still reaches the app by number.
    let probe = app
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::Int(8080));

    // Readiness is the sidecar's.
    let ready = side
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some(defaults::READYZ_PATH));
    assert_eq!(
        ready.port,
        IntOrString::Int(i32::from(defaults::ADMIN_PORT))
    );

    // preStop drains through the sidecar, authenticated with the token the sidecar holds.
    let pre = app
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(pre.path.as_deref(), Some(defaults::PRESTOP_PATH));
    assert_eq!(pre.port, IntOrString::Int(i32::from(defaults::ADMIN_PORT)));
    assert_eq!(
        pre.http_headers.as_ref().unwrap()[0].value,
        format!("Bearer {TOKEN}")
    );
    let env = side.env.clone().unwrap();
    let token = env
        .iter()
        .find(|e| e.name == defaults::ENV_PRESTOP_TOKEN)
        .unwrap();
    assert_eq!(token.value.as_deref(), Some(TOKEN));
    for (name, path) in [
        (defaults::ENV_POD_IP, "status.podIP"),
        (defaults::ENV_POD_NAMESPACE, "metadata.namespace"),
        (defaults::ENV_POD_NAME, "metadata.name"),
    ] {
        let e = env.iter().find(|e| e.name == name).unwrap();
        assert_eq!(
            e.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            path
        );
    }

    // The API token the ServiceAccount plugin mounted into the app, for the EndpointSlice watch.
    let mounts = side.volume_mounts.clone().unwrap_or_default();
    assert!(
        mounts.iter().any(|m| m.name == "kube-api-access-7xq2d"
            && m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"),
        "{mounts:?}"
    );

    // Restrictive by default, with requests.
    let sc = side.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    let requests = side.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // 30s does not cover 5s + 30s + 5s: raised, and said.
    assert_eq!(spec.termination_grace_period_seconds, Some(40));
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("raised from 30 to 40")),
        "{:?}",
        warnings(&r)
    );
    assert_eq!(
        pod.metadata
            .annotations
            .as_ref()
            .unwrap()
            .get(ann::INJECTED)
            .map(String::as_str),
        Some(IMAGE)
    );
    // The label the operator's pod watch selects on; the app's own labels stay.
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels.get(ann::INJECTED_LABEL).map(String::as_str),
        Some("true")
    );
    assert!(labels.len() > 1, "{labels:?}");
}

#[test]
fn unannotated_pod_is_left_alone() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"] = json!({});
    let r = run(&review_json);
    assert!(r.allowed);
    assert!(r.patch.is_none());
    assert!(r.warnings.is_none());
}

#[test]
fn deployment_annotation_is_enough_and_the_pod_may_opt_out() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"] = json!({});
    let owner = BTreeMap::from([(ann::INJECT.to_string(), "true".to_string())]);
    let lookup = Lookup {
        owner_annotations: owner.clone(),
        services: services(),
        ..Default::default()
    };
    let r = run_with(&review_json, &lookup);
    sidecar(&patched(&review_json, &r));

    object(&mut review_json)["metadata"]["annotations"] = json!({ann::INJECT: "false"});
    let r = run_with(&review_json, &lookup);
    assert!(r.allowed && r.patch.is_none());
}

#[test]
fn already_injected_pod_gets_no_second_patch() {
    let review_json = fixture();
    let first = run(&review_json);
    let pod = patched(&review_json, &first);
    let mut again = fixture();
    *object(&mut again) = serde_json::to_value(&pod).unwrap();
    let second = run(&again);
    assert!(second.allowed);
    assert!(second.patch.is_none(), "injected twice");
}

#[test]
fn bad_annotation_values_are_rejected_by_name() {
    for (key, value) in [
        (ann::DRAIN_TIMEOUT, "forever"),
        (ann::DEREGISTER_DELAY, "-3s"),
        (ann::PROPAGATION_MARGIN, "2 parsecs"),
        (ann::APP_PORT, "99999"),
        (ann::GRACE_PERIOD, "sometimes"),
        (ann::INJECT, "yes"),
    ] {
        let mut review_json = fixture();
        object(&mut review_json)["metadata"]["annotations"][key] = json!(value);
        let message = denial(&run(&review_json));
        assert!(message.contains(key), "{key}={value}: {message}");
    }
    // A port name the app container does not have.
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::APP_PORT] = json!("grpc");
    assert!(denial(&run(&review_json)).contains(ann::APP_PORT));
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::APP_CONTAINER] = json!("nginx");
    assert!(denial(&run(&review_json)).contains(ann::APP_CONTAINER));
}

#[test]
fn tuning_annotations_reach_the_sidecar_and_the_grace_period() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::DRAIN_TIMEOUT] = json!("50s");
    object(&mut review_json)["metadata"]["annotations"][ann::DEREGISTER_DELAY] = json!("1500ms");
    let r = run(&review_json);
    let pod = patched(&review_json, &r);
    let args = sidecar(&pod).args.clone().unwrap().join(" ");
    assert!(args.contains("--deregister-delay 1500ms"), "{args}");
    assert!(args.contains("--drain-timeout 50000ms"), "{args}");
    assert!(args.contains("--propagation-margin 5000ms"), "{args}");
    assert!(
        args.contains("--quiet-window auto --min-quiet-window 250ms"),
        "{args}"
    );
    assert!(args.contains("--upstream-restart-wait 10000ms"), "{args}");

    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::PROPAGATION_MARGIN] = json!("4s");
    object(&mut review_json)["metadata"]["annotations"][ann::QUIET_WINDOW] = json!("0s");
    object(&mut review_json)["metadata"]["annotations"][ann::MIN_QUIET_WINDOW] = json!("5s");
    object(&mut review_json)["metadata"]["annotations"][ann::UPSTREAM_RESTART_WAIT] = json!("0s");
    let r = run(&review_json);
    let args = sidecar(&patched(&review_json, &r))
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.contains("--propagation-margin 4000ms"), "{args}");
    assert!(
        args.contains("--quiet-window 0ms --min-quiet-window 5000ms"),
        "{args}"
    );
    assert!(args.contains("--upstream-restart-wait 0ms"), "{args}");
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::QUIET_WINDOW] = json!("soon");
    let denied = denial(&run(&review_json));
    assert!(
        denied.contains(ann::QUIET_WINDOW) && denied.contains("auto"),
        "{denied}"
    );
    // 1.5 + 50 + 5 = 56.5 -> 57 whole seconds.
    assert_eq!(pod.spec.unwrap().termination_grace_period_seconds, Some(57));
}

#[test]
fn numeric_target_port_services_are_named_in_a_warning() {
    let review_json = fixture();
    let r = run(&review_json);
    let w = warnings(&r);
    assert!(
        w.iter()
            .any(|w| w.contains("Service web-legacy targets port 8080 by number")),
        "{w:?}"
    );
    // The Service targeting the name goes through the sidecar; the one selecting other pods is
    // none of this pod's business.
    assert!(
        !w.iter()
            .any(|w| w.contains("Service web ") || w.contains("Service other")),
        "{w:?}"
    );
}

#[test]
fn the_sidecar_watches_the_slices_of_the_services_that_select_the_pod() {
    let review_json = fixture();
    let pod = patched(&review_json, &run(&review_json));
    let env = sidecar(&pod).env.clone().unwrap();
    let services = env
        .iter()
        .find(|e| e.name == graceful_sidecar::defaults::ENV_SERVICES)
        .and_then(|e| e.value.clone());
    assert_eq!(services.as_deref(), Some("web,web-legacy"));
}

#[test]
fn grace_period_too_short_is_raised_or_rejected_as_asked() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::GRACE_PERIOD] = json!("reject");
    let message = denial(&run(&review_json));
    assert!(
        message.contains("terminationGracePeriodSeconds 30"),
        "{message}"
    );
    assert!(message.contains("40"), "{message}");

    // Long enough already: untouched and nothing to say about it.
    let mut review_json = fixture();
    object(&mut review_json)["spec"]["terminationGracePeriodSeconds"] = json!(60);
    let r = run(&review_json);
    assert_eq!(
        patched(&review_json, &r)
            .spec
            .unwrap()
            .termination_grace_period_seconds,
        Some(60)
    );
    assert!(
        !warnings(&r)
            .iter()
            .any(|w| w.contains("terminationGracePeriodSeconds"))
    );

    // Unset means Kubernetes' 30s: raised too.
    let mut review_json = fixture();
    object(&mut review_json)["spec"]
        .as_object_mut()
        .unwrap()
        .remove("terminationGracePeriodSeconds");
    let r = run(&review_json);
    assert_eq!(
        patched(&review_json, &r)
            .spec
            .unwrap()
            .termination_grace_period_seconds,
        Some(40)
    );
}

#[test]
fn excluded_namespaces_and_other_operations_are_never_patched() {
    for ns in ["kube-system", "graceful-system"] {
        let mut review_json = fixture();
        review_json["request"]["namespace"] = json!(ns);
        let r = run(&review_json);
        assert!(r.allowed && r.patch.is_none(), "{ns}");
    }
    let mut review_json = fixture();
    review_json["request"]["operation"] = json!("UPDATE");
    review_json["request"]["oldObject"] = review_json["request"]["object"].clone();
    let r = run(&review_json);
    assert!(r.allowed && r.patch.is_none());
}

#[test]
fn a_prestop_sleep_is_replaced_but_other_hooks_are_refused() {
    let mut review_json = fixture();
    object(&mut review_json)["spec"]["containers"][0]["lifecycle"] =
        json!({"preStop": {"sleep": {"seconds": 15}}});
    let r = run(&review_json);
    let pod = patched(&review_json, &r);
    let pre = pod.spec.unwrap().containers[0]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap();
    assert!(pre.sleep.is_none() && pre.http_get.is_some());
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("preStop sleep of 15s"))
    );

    let mut review_json = fixture();
    object(&mut review_json)["spec"]["containers"][0]["lifecycle"] =
        json!({"preStop": {"exec": {"command": ["nginx", "-s", "quit"]}}});
    assert!(denial(&run(&review_json)).contains("already has a preStop hook"));
}

#[test]
fn ports_the_sidecar_needs_are_refused() {
    let mut review_json = fixture();
    object(&mut review_json)["spec"]["containers"][0]["ports"][1]["containerPort"] =
        json!(defaults::ADMIN_PORT);
    assert!(denial(&run(&review_json)).contains(&defaults::ADMIN_PORT.to_string()));
}

#[test]
fn an_unnamed_app_port_is_fronted_but_said_to_be_unreachable_by_name() {
    let mut review_json = fixture();
    object(&mut review_json)["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": 3000, "protocol": "TCP"}]);
    object(&mut review_json)["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
        json!(3000);
    let r = run(&review_json);
    let pod = patched(&review_json, &r);
    let side = sidecar(&pod);
    assert!(
        side.args
            .clone()
            .unwrap()
            .join(" ")
            .contains("--upstream 127.0.0.1:3000")
    );
    assert!(
        warnings(&r)
            .iter()
            .any(|w| w.contains("no name to take over")),
        "{:?}",
        warnings(&r)
    );
}

fn data_plane_fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/data-planes.json")).unwrap()
}

/// Of fixtures/data-planes.json's `key`, the objects named.
fn picked<T: serde::de::DeserializeOwned>(key: &str, names: &[&str]) -> Vec<T> {
    data_plane_fixture()[key]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| names.contains(&o["metadata"]["name"].as_str().unwrap()))
        .map(|o| serde_json::from_value(o.clone()).unwrap())
        .collect()
}

/// The Services of services.json, and of fixtures/data-planes.json the objects named.
fn around(names: &[&str]) -> Lookup {
    let mut services = services();
    services.extend(picked::<Service>("services", names));
    Lookup {
        services,
        around: Around {
            ingresses: picked("ingresses", names),
            http_routes: picked("httpRoutes", names),
            target_group_bindings: picked("targetGroupBindings", names),
        },
        ..Default::default()
    }
}

/// What the sidecar is told: its data planes, its drain timeout; and the pod's grace period.
fn sized(review_json: &Value, lookup: &Lookup) -> (String, String, i64, Vec<String>) {
    let r = run_with(review_json, lookup);
    let pod = patched(review_json, &r);
    let side = sidecar(&pod);
    let env = side
        .env
        .clone()
        .unwrap()
        .into_iter()
        .find(|e| e.name == ENV_DATA_PLANES)
        .and_then(|e| e.value)
        .expect("GRACEFUL_DATA_PLANES");
    let args = side.args.clone().unwrap();
    let at = args.iter().position(|a| a == "--drain-timeout").unwrap();
    let grace = pod.spec.unwrap().termination_grace_period_seconds.unwrap();
    (env, args[at + 1].clone(), grace, warnings(&r))
}

#[test]
fn each_kind_of_data_plane_is_detected_from_what_names_the_pods_services() {
    for (names, want, drain) in [
        (&[][..], "kube-proxy=5s", "30000ms"),
        (
            &["web-lb"],
            "kube-proxy=5s,load-balancer/web-lb=120s",
            "140000ms",
        ),
        (
            &["web-nlb"],
            "kube-proxy=5s,aws-nlb/web-nlb=120s",
            "140000ms",
        ),
        (
            &["web-nlb-class"],
            "kube-proxy=5s,aws-nlb/web-nlb-class=120s",
            "140000ms",
        ),
        (&["web-neg"], "kube-proxy=5s,gke-neg/web-neg=60s", "80000ms"),
        // What GKE writes on every Service: a NEG only once an Ingress names it.
        (&["web-neg-auto"], "kube-proxy=5s", "30000ms"),
        (
            &["web-neg-auto", "web-gce"],
            "kube-proxy=5s,gke-neg/web-neg-auto=60s,ingress/gce=10s",
            "80000ms",
        ),
        // A node port reaches the pod through the node's kube-proxy: nothing to add.
        (&["web-nodeport"], "kube-proxy=5s", "30000ms"),
        // Selects other pods.
        (&["other-lb"], "kube-proxy=5s", "30000ms"),
        // 5s + 10s + 15s is within the 30s drain timeout.
        (
            &["web-traefik"],
            "kube-proxy=5s,ingress/traefik=10s",
            "30000ms",
        ),
        (
            &["web-old-style"],
            "kube-proxy=5s,ingress/nginx=10s",
            "30000ms",
        ),
        // Its Service does not select the pod unless it is there.
        (&["web-no-class"], "kube-proxy=5s", "30000ms"),
        (
            &["web-no-class", "web-nodeport"],
            "kube-proxy=5s,ingress/default=10s",
            "30000ms",
        ),
        (&["web-alb"], "kube-proxy=5s,aws-alb/web-alb=30s", "50000ms"),
        (
            &["web-alb-annotated"],
            "kube-proxy=5s,aws-alb/web-alb-annotated=30s",
            "50000ms",
        ),
        (&["other"], "kube-proxy=5s", "30000ms"),
        // The Gateway parent counts, the mesh Service parent does not.
        (&["web"], "kube-proxy=5s,gateway/public=10s", "30000ms"),
        // Sends to other Services, or to a `web` of another namespace.
        (&["elsewhere"], "kube-proxy=5s", "30000ms"),
        (
            &["web-tg"],
            "kube-proxy=5s,aws-target-group/web-tg=120s",
            "140000ms",
        ),
        (&["other-tg"], "kube-proxy=5s", "30000ms"),
    ] {
        let (env, drain_timeout, _, _) = sized(&fixture(), &around(names));
        assert_eq!(env, want, "{names:?}");
        assert_eq!(drain_timeout, drain, "{names:?}");
    }
}

#[test]
fn every_data_plane_at_once_largest_lag_first() {
    let all = [
        "web-lb",
        "web-nlb",
        "web-neg",
        "web-nodeport",
        "web-traefik",
        "web-old-style",
        "web-no-class",
        "web-alb",
        "web",
        "web-tg",
    ];
    let (env, drain, grace, w) = sized(&fixture(), &around(&all));
    assert_eq!(
        env,
        "kube-proxy=5s,aws-nlb/web-nlb=120s,aws-target-group/web-tg=120s,\
         load-balancer/web-lb=120s,gke-neg/web-neg=60s,aws-alb/web-alb=30s,gateway/public=10s,\
         ingress/default=10s,ingress/nginx=10s,ingress/traefik=10s"
    );
    assert_eq!(drain, "140000ms");
    // deregister 5 + drain 140 + margin 5.
    assert_eq!(grace, 150);
    assert!(
        w.iter().any(|w| w.contains(
            "drain timeout raised from 30s to 140s to cover a data-plane lag of 120s \
             (aws-nlb/web-nlb, aws-target-group/web-tg, load-balancer/web-lb) plus 15s"
        )),
        "{w:?}"
    );
    assert!(
        w.iter().any(|w| w.contains("raised from 30 to 150")),
        "{w:?}"
    );
}

#[test]
fn a_declared_lag_replaces_what_is_detected() {
    let everything = around(&["web-lb", "web-traefik", "web-tg"]);
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::DATA_PLANE_LAG] = json!("45s");
    let (env, drain, grace, _) = sized(&review_json, &everything);
    assert_eq!(env, "kube-proxy=5s,declared=45s");
    assert_eq!((drain.as_str(), grace), ("65000ms", 75));

    // 0s: no hold, today's rule; nothing raised beyond today's budget.
    object(&mut review_json)["metadata"]["annotations"][ann::DATA_PLANE_LAG] = json!("0s");
    let (env, drain, grace, w) = sized(&review_json, &everything);
    assert_eq!(env, "kube-proxy=5s,declared=0s");
    assert_eq!((drain.as_str(), grace), ("30000ms", 40));
    assert!(
        !w.iter().any(|w| w.contains("drain timeout raised")),
        "{w:?}"
    );

    // On the Deployment, as the other annotations.
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"] = json!({});
    let owner = BTreeMap::from([
        (ann::INJECT.to_string(), "true".to_string()),
        (ann::DATA_PLANE_LAG.to_string(), "2m".to_string()),
    ]);
    let lookup = Lookup {
        owner_annotations: owner,
        ..everything
    };
    let (env, drain, grace, _) = sized(&review_json, &lookup);
    assert_eq!(env, "kube-proxy=5s,declared=120s");
    assert_eq!((drain.as_str(), grace), ("140000ms", 150));
}

#[test]
fn kube_proxys_lag_is_the_propagation_margin_and_a_long_drain_timeout_stays() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::PROPAGATION_MARGIN] = json!("1500ms");
    object(&mut review_json)["metadata"]["annotations"][ann::DRAIN_TIMEOUT] = json!("200s");
    let (env, drain, grace, w) = sized(&review_json, &around(&["web-lb"]));
    assert_eq!(env, "kube-proxy=1500ms,load-balancer/web-lb=120s");
    assert_eq!((drain.as_str(), grace), ("200000ms", 210));
    assert!(
        !w.iter().any(|w| w.contains("drain timeout raised")),
        "{w:?}"
    );
}

#[test]
fn a_grace_period_too_short_for_the_data_planes_is_refused_when_asked() {
    let mut review_json = fixture();
    object(&mut review_json)["metadata"]["annotations"][ann::GRACE_PERIOD] = json!("reject");
    object(&mut review_json)["spec"]["terminationGracePeriodSeconds"] = json!(60);
    let message = denial(&run_with(&review_json, &around(&["web-nlb"])));
    assert!(message.contains("150"), "{message}");
    assert!(
        message.contains("data-plane lag of 120s") && message.contains(ann::DATA_PLANE_LAG),
        "{message}"
    );
    // Long enough: untouched.
    object(&mut review_json)["spec"]["terminationGracePeriodSeconds"] = json!(150);
    let (_, _, grace, _) = sized(&review_json, &around(&["web-nlb"]));
    assert_eq!(grace, 150);
}

#[test]
fn bad_data_plane_lags_are_refused_at_admission() {
    for value in ["abc", "-1s", "2h", "120"] {
        let mut review_json = fixture();
        object(&mut review_json)["metadata"]["annotations"][ann::DATA_PLANE_LAG] = json!(value);
        let message = denial(&run(&review_json));
        assert!(
            message.starts_with(&format!("graceful: annotation {}:", ann::DATA_PLANE_LAG)),
            "{value}: {message}"
        );
    }
}

/// A review carries the pod's annotations as its creator wrote them: whatever they are, the
/// webhook injects with a patch that applies to that very pod, or refuses naming an annotation.
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::webhook::annotations::properties::{KEYS, annotations};

    proptest! {
        #[test]
        fn any_annotations_are_injected_with_a_patch_that_applies_or_refused_by_name(map in annotations()) {
            let mut review_json = fixture();
            let given = object(&mut review_json)["metadata"]["annotations"]
                .as_object_mut()
                .unwrap();
            for (k, v) in &map {
                given.insert(k.clone(), Value::String(v.clone()));
            }
            let r = run(&review_json);
            if r.allowed {
                if r.patch.is_some() {
                    let pod = patched(&review_json, &r);
                    prop_assert!(pod.spec.unwrap().init_containers.unwrap().iter().any(|c| c.name == SIDECAR_NAME));
                }
            } else {
                let message = &r.result.message;
                prop_assert!(KEYS.iter().any(|k| message.contains(k)), "{message}");
            }
        }
    }
}
