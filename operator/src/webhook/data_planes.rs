//! Which data planes may send a pod traffic, and for how long after the pod leaves the
//! EndpointSlices (its *lag*). Worked out at injection from the Services that select the pod and
//! what names them (Ingresses, Gateway API HTTPRoutes, AWS TargetGroupBindings), and written
//! into the sidecar's `GRACEFUL_DATA_PLANES` as `NAME=DURATION` items. The sidecar holds a drain
//! that saw silence until the largest non-kube-proxy lag has passed (docs/data-planes.md).
//!
//! Pure functions only: the webhook's server does the lookups, and a lookup that failed simply
//! leaves its kind out.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressServiceBackend};
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};

// The sidecar's side of the contract: its env var (flag `--data-planes`), the item type and
// its name rules, the hold it derives, and the time it needs after the hold.
pub use graceful_sidecar::data_planes::{
    DataPlane, KUBE_PROXY, MAX_DATA_PLANES, MAX_NAME_LEN, hold,
};
pub use graceful_sidecar::defaults::{DRAIN_AFTER_LAG as HOLD_SLACK, ENV_DATA_PLANES};

/// Annotations and values that mark a Service as an AWS Network Load Balancer's (the AWS Load
/// Balancer Controller's and the legacy in-tree provider's).
const AWS_LB_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
const AWS_NLB_TYPES: &[&str] = &["nlb", "nlb-ip", "external"];
const AWS_NLB_TARGET_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type";
const AWS_NLB_CLASS: &str = "service.k8s.aws/nlb";
/// GKE's container-native load balancing: the LB's backends are the pods' IPs (NEGs).
const GKE_NEG: &str = "cloud.google.com/neg";
/// The AWS Load Balancer Controller's Ingress class and its annotations' prefix.
const ALB_CLASS: &str = "alb";
const ALB_ANNOTATION_PREFIX: &str = "alb.ingress.kubernetes.io/";
const INGRESS_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A kind of data plane, with the prefix of its items' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    KubeProxy,
    Ingress,
    Gateway,
    LoadBalancer,
    AwsNlb,
    AwsAlb,
    AwsTargetGroup,
    GkeNeg,
    Declared,
}

/// One row of [`TABLE`].
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub kind: Kind,
    /// `kube-proxy`, `declared`, or the prefix before `/<name>`.
    pub prefix: &'static str,
    /// The lag assumed; None where it comes from the pod's settings (kube-proxy: the
    /// propagation margin; declared: the annotation).
    pub lag: Option<Duration>,
    /// Where the figure comes from (docs/data-planes.md has the links).
    pub source: &'static str,
}

const fn secs(s: u64) -> Option<Duration> {
    Some(Duration::from_secs(s))
}

/// The one table of lags per kind of data plane (docs/data-planes.md explains each row).
pub const TABLE: &[Facts] = &[
    Facts {
        kind: Kind::KubeProxy,
        prefix: KUBE_PROXY,
        lag: None,
        source: "the injected propagation margin (5s): kube-proxy's programming took 2-3s on the busy e2e node (docs/injection.md)",
    },
    Facts {
        kind: Kind::Ingress,
        prefix: "ingress",
        lag: secs(10),
        source: "Traefik batches provider changes for 2s; Envoy Gateway's shutdown manager waits at least 10s; EKS best practices suggest preStop sleep 10",
    },
    Facts {
        kind: Kind::Gateway,
        prefix: "gateway",
        lag: secs(10),
        source: "Gateway API implementations are the same proxies as ingress controllers (Envoy Gateway: min drain 10s)",
    },
    Facts {
        kind: Kind::LoadBalancer,
        prefix: "load-balancer",
        lag: secs(120),
        source: "provider unknown: the slowest published figure, an NLB's ~2 min (aws-load-balancer-controller #2366, #3270)",
    },
    Facts {
        kind: Kind::AwsNlb,
        prefix: "aws-nlb",
        lag: secs(120),
        source: "NLB sends new connections 30-40s after a target turns unhealthy, deregistration takes ~2 min whatever the delay (containers-roadmap #470; aws-load-balancer-controller #2366, #3270)",
    },
    Facts {
        kind: Kind::AwsAlb,
        prefix: "aws-alb",
        lag: secs(30),
        source: "users needed preStop sleeps of 15-25s behind ALB (aws-load-balancer-controller #1064, #2366; alphagov govuk-helm-charts #1004)",
    },
    Facts {
        kind: Kind::AwsTargetGroup,
        prefix: "aws-target-group",
        lag: secs(120),
        source: "a TargetGroupBinding's target group may be an NLB's: its ~2 min (aws-load-balancer-controller #2366, #3270)",
    },
    Facts {
        kind: Kind::GkeNeg,
        prefix: "gke-neg",
        lag: secs(60),
        source: "NEG users report 15-20s of 502s per rollout (ingress-gce #1718), about a minute in #2222",
    },
    Facts {
        kind: Kind::Declared,
        prefix: "declared",
        lag: None,
        source: "the graceful.dev/data-plane-lag annotation",
    },
];

impl Kind {
    pub fn facts(self) -> &'static Facts {
        TABLE
            .iter()
            .find(|f| f.kind == self)
            .expect("every kind has a row")
    }

    /// The lag of a detected data plane of this kind (zero for the two whose lag is set).
    pub fn lag(self) -> Duration {
        self.facts().lag.unwrap_or_default()
    }

    /// The item `<prefix>/<name>`, sanitized to the sidecar's rules.
    pub fn item(self, name: &str) -> DataPlane {
        DataPlane {
            name: item_name(&format!("{}/{name}", self.facts().prefix)),
            lag: self.lag(),
        }
    }
}

/// What the webhook found in the pod's namespace that may name the pod's Services.
#[derive(Debug, Default, Clone)]
pub struct Around {
    pub ingresses: Vec<Ingress>,
    /// gateway.networking.k8s.io/v1 HTTPRoutes.
    pub http_routes: Vec<DynamicObject>,
    /// elbv2.k8s.aws/v1beta1 TargetGroupBindings.
    pub target_group_bindings: Vec<DynamicObject>,
}

pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GATEWAY_GROUP, "v1", "HTTPRoute"),
        "httproutes",
    )
}

pub fn target_group_binding_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding"),
        "targetgroupbindings",
    )
}

/// The data planes other than kube-proxy in front of a pod that `selecting` (the Services that
/// select it) reach, one item per name.
pub fn detect(selecting: &[&Service], around: &Around) -> Vec<DataPlane> {
    let names: Vec<&str> = selecting
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    let mut found = Vec::new();
    for svc in selecting {
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let named_by_ingress = around
            .ingresses
            .iter()
            .any(|ing| ingress_backends(ing).any(|b| b == name));
        found.extend(service_plane(svc, named_by_ingress));
    }
    for ing in &around.ingresses {
        if ingress_backends(ing).any(|b| names.contains(&b)) {
            found.push(ingress_plane(ing));
        }
    }
    for route in &around.http_routes {
        if route_backends(route)
            .iter()
            .any(|b| names.contains(&b.as_str()))
        {
            found.extend(route_gateways(route).iter().map(|g| Kind::Gateway.item(g)));
        }
    }
    for tgb in &around.target_group_bindings {
        let service = tgb
            .data
            .pointer("/spec/serviceRef/name")
            .and_then(|v| v.as_str());
        if service.is_some_and(|s| names.contains(&s)) {
            found.push(Kind::AwsTargetGroup.item(&name_of(&tgb.metadata.name)));
        }
    }
    dedup(found)
}

/// What a Service adds beyond kube-proxy. A NodePort Service adds nothing: whatever sends to a
/// node port reaches the pod through that node's kube-proxy, whose lag is already counted.
///
/// GKE writes `cloud.google.com/neg: '{"ingress": true}'` on every Service of a VPC-native
/// cluster; such NEGs exist only for Services an Ingress names (`named_by_ingress`). Standalone
/// NEGs (`exposed_ports`) exist whatever names them.
fn service_plane(svc: &Service, named_by_ingress: bool) -> Option<DataPlane> {
    let empty = BTreeMap::new();
    let annotations = svc.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = svc.spec.as_ref()?;
    let name = name_of(&svc.metadata.name);
    let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    let aws_nlb = annotations
        .get(AWS_LB_TYPE)
        .is_some_and(|t| AWS_NLB_TYPES.contains(&t.trim()))
        || annotations
            .get(AWS_NLB_TARGET_TYPE)
            .is_some_and(|t| t.trim() == "ip")
        || spec.load_balancer_class.as_deref() == Some(AWS_NLB_CLASS);
    if load_balancer && aws_nlb {
        Some(Kind::AwsNlb.item(&name))
    } else if annotations
        .get(GKE_NEG)
        .is_some_and(|v| gke_negs_exist(v, named_by_ingress))
    {
        Some(Kind::GkeNeg.item(&name))
    } else if load_balancer {
        Some(Kind::LoadBalancer.item(&name))
    } else {
        None
    }
}

/// Whether a `cloud.google.com/neg` value makes NEGs: standalone ones (`exposed_ports`), or
/// the Ingress's (`"ingress": true`) when an Ingress names the Service. A value that does not
/// parse is taken to make them (the longer hold is the safe side).
fn gke_negs_exist(value: &str, named_by_ingress: bool) -> bool {
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(v) => {
            v.get("exposed_ports").is_some()
                || (named_by_ingress && v.get("ingress").and_then(|i| i.as_bool()) == Some(true))
        }
        Err(_) => true,
    }
}

/// The Services an Ingress sends to (its rules and its default backend).
fn ingress_backends(ing: &Ingress) -> impl Iterator<Item = &str> {
    let spec = ing.spec.as_ref();
    let default = spec
        .and_then(|s| s.default_backend.as_ref())
        .and_then(|b| b.service.as_ref());
    let rules = spec
        .and_then(|s| s.rules.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|r| r.http.as_ref())
        .flat_map(|h| &h.paths)
        .filter_map(|p| p.backend.service.as_ref());
    default
        .into_iter()
        .chain(rules)
        .map(|b: &IngressServiceBackend| b.name.as_str())
}

fn ingress_plane(ing: &Ingress) -> DataPlane {
    let empty = BTreeMap::new();
    let annotations = ing.metadata.annotations.as_ref().unwrap_or(&empty);
    let class = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or(annotations
            .get(INGRESS_CLASS_ANNOTATION)
            .map(String::as_str))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .unwrap_or("default");
    if class == ALB_CLASS
        || annotations
            .keys()
            .any(|k| k.starts_with(ALB_ANNOTATION_PREFIX))
    {
        Kind::AwsAlb.item(&name_of(&ing.metadata.name))
    } else {
        Kind::Ingress.item(class)
    }
}

/// The core Services an HTTPRoute's rules send to, in the route's own namespace (a route in
/// another namespace needs a ReferenceGrant and is not looked up).
fn route_backends(route: &DynamicObject) -> Vec<String> {
    let own_ns = route.metadata.namespace.as_deref();
    let rules = route
        .data
        .pointer("/spec/rules")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten();
    rules
        .filter_map(|r| r.get("backendRefs").and_then(|b| b.as_array()))
        .flatten()
        .filter(|b| {
            let str_of = |k: &str| b.get(k).and_then(|v| v.as_str());
            str_of("group").unwrap_or("").is_empty()
                && str_of("kind").unwrap_or("Service") == "Service"
                && str_of("namespace").is_none_or(|ns| Some(ns) == own_ns)
        })
        .filter_map(|b| b.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect()
}

/// The Gateways an HTTPRoute attaches to (parentRefs of kind Gateway; a Service parent is a
/// mesh's, which has no lag of its own to add).
fn route_gateways(route: &DynamicObject) -> Vec<String> {
    route
        .data
        .pointer("/spec/parentRefs")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter(|p| {
            let str_of = |k: &str| p.get(k).and_then(|v| v.as_str());
            str_of("group").unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
                && str_of("kind").unwrap_or("Gateway") == "Gateway"
        })
        .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect()
}

fn name_of(name: &Option<String>) -> String {
    name.clone().unwrap_or_else(|| "unnamed".to_owned())
}

/// The sidecar's name rules: `[a-z0-9./-]`, at most [`MAX_NAME_LEN`] characters.
pub fn item_name(raw: &str) -> String {
    raw.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '/' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect()
}

/// One item per name, the largest lag where names collide.
fn dedup(items: Vec<DataPlane>) -> Vec<DataPlane> {
    let mut by_name: BTreeMap<String, Duration> = BTreeMap::new();
    for item in items {
        let lag = by_name.entry(item.name).or_default();
        *lag = (*lag).max(item.lag);
    }
    by_name
        .into_iter()
        .map(|(name, lag)| DataPlane { name, lag })
        .collect()
}

/// The items to write: kube-proxy at the propagation margin, then either what the user
/// declared (`graceful.dev/data-plane-lag`, which replaces detection) or what was detected. At
/// most [`MAX_DATA_PLANES`], keeping kube-proxy and the largest lags; the largest first.
pub fn plan(
    margin: Duration,
    declared: Option<Duration>,
    detected: Vec<DataPlane>,
) -> Vec<DataPlane> {
    let kube_proxy = DataPlane {
        name: KUBE_PROXY.to_owned(),
        lag: margin,
    };
    let mut others = match declared {
        Some(lag) => vec![DataPlane {
            name: Kind::Declared.facts().prefix.to_owned(),
            lag,
        }],
        None => dedup(detected)
            .into_iter()
            .filter(|d| !d.is_kube_proxy())
            .collect(),
    };
    others.sort_by(|a, b| b.lag.cmp(&a.lag).then_with(|| a.name.cmp(&b.name)));
    others.truncate(MAX_DATA_PLANES - 1);
    let mut items = vec![kube_proxy];
    items.extend(others);
    items
}

/// The drain timeout to write: the one asked for, raised when there is a hold to cover
/// deregistration (the timeout counts from the trigger, the hold from deregistration), the hold,
/// and [`HOLD_SLACK`] for what is still open after it (the sidecar refuses less than the last two).
pub fn drain_timeout(asked: Duration, deregister_delay: Duration, hold: Duration) -> Duration {
    if hold.is_zero() {
        asked
    } else {
        asked.max(deregister_delay + hold + HOLD_SLACK)
    }
}

/// `kube-proxy=5s,load-balancer/web=120s`.
pub fn env_value(items: &[DataPlane]) -> String {
    items
        .iter()
        .map(|d| format!("{}={}", d.name, duration_text(d.lag)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whole seconds as `5s`, anything finer as `1500ms`: humantime syntax without spaces.
pub fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(name: &str, secs: u64) -> DataPlane {
        DataPlane {
            name: name.into(),
            lag: Duration::from_secs(secs),
        }
    }

    #[test]
    fn every_kind_has_one_row_and_a_source() {
        for kind in [
            Kind::KubeProxy,
            Kind::Ingress,
            Kind::Gateway,
            Kind::LoadBalancer,
            Kind::AwsNlb,
            Kind::AwsAlb,
            Kind::AwsTargetGroup,
            Kind::GkeNeg,
            Kind::Declared,
        ] {
            assert_eq!(TABLE.iter().filter(|f| f.kind == kind).count(), 1);
            assert!(!kind.facts().source.is_empty());
        }
        assert_eq!(Kind::AwsNlb.lag(), Duration::from_secs(120));
        assert_eq!(Kind::GkeNeg.lag(), Duration::from_secs(60));
        assert_eq!(Kind::AwsAlb.lag(), Duration::from_secs(30));
        assert_eq!(Kind::Ingress.lag(), Duration::from_secs(10));
    }

    #[test]
    fn names_follow_the_sidecars_rules() {
        assert_eq!(
            item_name("ingress/Traefik_Internal"),
            "ingress/traefik-internal"
        );
        let long = "x".repeat(300);
        let name = Kind::AwsTargetGroup.item(&long).name;
        assert_eq!(name.len(), MAX_NAME_LEN);
        assert!(name.starts_with("aws-target-group/xxx"));
    }

    #[test]
    fn the_plan_keeps_kube_proxy_and_the_largest_lags() {
        let mut detected: Vec<DataPlane> = (0..30)
            .map(|i| dp(&format!("ingress/c{i:02}"), i))
            .collect();
        detected.push(dp("load-balancer/web", 120));
        let items = plan(Duration::from_secs(5), None, detected);
        assert_eq!(items.len(), MAX_DATA_PLANES);
        assert_eq!(items[0], dp("kube-proxy", 5));
        assert_eq!(items[1], dp("load-balancer/web", 120));
        assert_eq!(items[2], dp("ingress/c29", 29));
        assert_eq!(items.last().unwrap(), &dp("ingress/c16", 16));
        assert_eq!(hold(&items), Duration::from_secs(120));
    }

    #[test]
    fn a_declared_lag_replaces_detection() {
        let items = plan(
            Duration::from_secs(5),
            Some(Duration::from_secs(45)),
            vec![dp("load-balancer/web", 120)],
        );
        assert_eq!(env_value(&items), "kube-proxy=5s,declared=45s");
        assert_eq!(hold(&items), Duration::from_secs(45));
        let none = plan(Duration::from_millis(1500), Some(Duration::ZERO), vec![]);
        assert_eq!(env_value(&none), "kube-proxy=1500ms,declared=0s");
        assert_eq!(hold(&none), Duration::ZERO);
    }

    #[test]
    fn the_drain_timeout_covers_the_hold() {
        let s = Duration::from_secs;
        assert_eq!(drain_timeout(s(30), s(5), Duration::ZERO), s(30));
        assert_eq!(drain_timeout(s(2), s(5), Duration::ZERO), s(2));
        assert_eq!(drain_timeout(s(30), s(5), s(10)), s(30));
        assert_eq!(drain_timeout(s(30), s(5), s(120)), s(140));
        assert_eq!(drain_timeout(s(300), s(5), s(120)), s(300));
    }

    #[test]
    fn the_sidecar_reads_back_the_env_value() {
        let items = vec![
            dp("kube-proxy", 5),
            dp("aws-nlb/web", 120),
            Kind::Ingress.item("Traefik Public"),
        ];
        let text = env_value(&items);
        assert_eq!(
            text,
            "kube-proxy=5s,aws-nlb/web=120s,ingress/traefik-public=10s"
        );
        let read: Vec<DataPlane> = text
            .split(',')
            .map(|item| graceful_sidecar::data_planes::parse(item).unwrap())
            .collect();
        assert_eq!(read, items);
    }
}
