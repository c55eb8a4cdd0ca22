//! Every annotation the injector reads or writes, and the per-workload drain settings parsed from
//! them. Values come from the owning Deployment, overridden by the pod (template) itself.

use std::collections::BTreeMap;
use std::time::Duration;

use graceful_sidecar::defaults;

/// `"true"` on a Deployment or its pod template: inject the sidecar.
pub const INJECT: &str = "graceful.dev/inject";
/// Wait after readiness turns off when the pod may not read EndpointSlices (e.g. `5s`).
pub const DEREGISTER_DELAY: &str = "graceful.dev/deregister-delay";
/// From the drain trigger to the forced close of what is still open (e.g. `30s`).
pub const DRAIN_TIMEOUT: &str = "graceful.dev/drain-timeout";
/// The least time from deregistration to the end of the drain of a pod that had traffic: a
/// bound on kube-proxy's lag, which no pod can see (e.g. `4s`).
pub const PROPAGATION_MARGIN: &str = "graceful.dev/propagation-margin";
/// Injected pods get 5s where the sidecar alone has none: kube-proxy re-routes only new
/// connections, and one may come from a client this pod never served (reconnecting after a
/// sibling's drain) for as long as kube-proxy lags, which reached 2-3s on the busy 2-core e2e
/// node (docs/injection.md, docs/drain.md). An idle pod skips it.
pub const DEFAULT_PROPAGATION_MARGIN: Duration = Duration::from_secs(5);
/// The silence that ends the drain: `auto` (from the traffic before the trigger) or a fixed
/// duration (`0s`: stop as soon as nothing is open). docs/drain.md.
pub const QUIET_WINDOW: &str = "graceful.dev/quiet-window";
/// The shortest quiet window `auto` picks: raise it behind a balancer that lags and sends
/// sparse traffic (e.g. `5s`).
pub const MIN_QUIET_WINDOW: &str = "graceful.dev/min-quiet-window";
/// How long a request waits in the sidecar for the app while it restarts (a crash, a failed
/// liveness probe), before a 503 with Retry-After (e.g. `20s`; `0s`: 502 at once).
pub const UPSTREAM_RESTART_WAIT: &str = "graceful.dev/upstream-restart-wait";
/// How long a WebSocket stream runs on once every data plane has let go of the pod, before the
/// drain asks it to leave with a Close 1001 (e.g. `20s`; default `0s`: at once). Shorter than
/// the drain timeout, which cuts what is left (docs/long-lived.md).
pub const STREAM_LEAVE_AFTER: &str = "graceful.dev/stream-leave-after";
/// The longest any data plane in front of the pod may keep sending new requests after the pod
/// leaves the EndpointSlices (e.g. `120s`; `0s`: none beyond kube-proxy). Replaces what the
/// injector detects (docs/data-planes.md).
pub const DATA_PLANE_LAG: &str = "graceful.dev/data-plane-lag";
/// The app's port the sidecar takes over: a port name of the app container, or a number.
pub const APP_PORT: &str = "graceful.dev/app-port";
/// The container the sidecar fronts, when the pod has more than one.
pub const APP_CONTAINER: &str = "graceful.dev/app-container";
/// `raise` (default): a too-short terminationGracePeriodSeconds is raised; `reject`: the pod is
/// refused instead, so the grace period stays whatever the user wrote.
pub const GRACE_PERIOD: &str = "graceful.dev/grace-period";
/// Written by the injector on every pod it changed: the sidecar image it injected.
pub const INJECTED: &str = "graceful.dev/injected";
/// A label (value "true") on the same pods, so the operator can watch only them.
pub const INJECTED_LABEL: &str = "graceful.dev/injected";
/// A label naming the MutatingWebhookConfiguration that injected the pod: with two releases in
/// one cluster, each grants only for its own pods.
pub const INJECTOR_LABEL: &str = "graceful.dev/injector";
/// Kubernetes' own convention for "the main container" (read only).
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Longest accepted drain timing: beyond this a pod would linger for ages on every rollout.
const MAX_DURATION: Duration = Duration::from_secs(3600);

/// A bad annotation value; the message names the annotation, as the user must fix it there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {reason} (value {value:?})")]
pub struct BadAnnotation {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl BadAnnotation {
    fn new(key: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            key,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A port of the app container, by name (the one Services target) or by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GracePolicy {
    Raise,
    Reject,
}

/// What one workload asked for, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub deregister_delay: Duration,
    pub drain_timeout: Duration,
    pub propagation_margin: Duration,
    /// None: `auto`.
    pub quiet_window: Option<Duration>,
    pub min_quiet_window: Duration,
    pub upstream_restart_wait: Duration,
    pub stream_leave_after: Duration,
    /// None: detect the data planes.
    pub data_plane_lag: Option<Duration>,
    pub app_port: Option<PortRef>,
    pub app_container: Option<String>,
    pub grace_policy: GracePolicy,
}

/// Annotations of the owning Deployment overlaid with the pod's own (the pod wins).
pub fn merged(
    owner: &BTreeMap<String, String>,
    pod: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut all = owner.clone();
    all.extend(pod.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

/// Whether injection is asked for. Only `"true"` and `"false"` are values; anything else is a
/// typo the user should hear about rather than a silent no.
pub fn wants_injection(annotations: &BTreeMap<String, String>) -> Result<bool, BadAnnotation> {
    match annotations.get(INJECT).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(BadAnnotation::new(
            INJECT,
            other,
            "must be \"true\" or \"false\"",
        )),
    }
}

impl Settings {
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, BadAnnotation> {
        let get = |key: &str| annotations.get(key).map(|v| v.trim());
        let deregister_delay = match get(DEREGISTER_DELAY) {
            Some(v) => duration(DEREGISTER_DELAY, v)?,
            None => defaults::DEREGISTER_DELAY,
        };
        let drain_timeout = match get(DRAIN_TIMEOUT) {
            Some(v) => duration(DRAIN_TIMEOUT, v)?,
            None => defaults::DRAIN_TIMEOUT,
        };
        if drain_timeout.is_zero() {
            return Err(BadAnnotation::new(
                DRAIN_TIMEOUT,
                "0",
                "must be more than zero",
            ));
        }
        // The sidecar refuses to start on this (its --drain-timeout bounds the whole drain,
        // the delay included): say so at admission rather than inject a crash loop.
        if drain_timeout < deregister_delay {
            return Err(BadAnnotation::new(
                DRAIN_TIMEOUT,
                &humantime::format_duration(drain_timeout).to_string(),
                format!(
                    "must not be shorter than {DEREGISTER_DELAY} ({}): lower that too",
                    humantime::format_duration(deregister_delay)
                ),
            ));
        }
        let propagation_margin = match get(PROPAGATION_MARGIN) {
            Some(v) => duration(PROPAGATION_MARGIN, v)?,
            None => DEFAULT_PROPAGATION_MARGIN,
        };
        let quiet_window = match get(QUIET_WINDOW) {
            None | Some("auto") => None,
            Some(v) => Some(duration(QUIET_WINDOW, v).map_err(|mut e| {
                e.reason = format!("\"auto\" or {}", e.reason);
                e
            })?),
        };
        let min_quiet_window = match get(MIN_QUIET_WINDOW) {
            Some(v) => duration(MIN_QUIET_WINDOW, v)?,
            None => defaults::MIN_QUIET_WINDOW,
        };
        let upstream_restart_wait = match get(UPSTREAM_RESTART_WAIT) {
            Some(v) => duration(UPSTREAM_RESTART_WAIT, v)?,
            None => defaults::UPSTREAM_RESTART_WAIT,
        };
        let stream_leave_after = match get(STREAM_LEAVE_AFTER) {
            Some(v) => duration(STREAM_LEAVE_AFTER, v)?,
            None => defaults::STREAM_LEAVE_AFTER,
        };
        if stream_leave_after >= drain_timeout {
            return Err(BadAnnotation::new(
                STREAM_LEAVE_AFTER,
                get(STREAM_LEAVE_AFTER).unwrap_or_default(),
                format!(
                    "must be shorter than the drain timeout ({}), which cuts what is still open",
                    humantime::format_duration(drain_timeout)
                ),
            ));
        }
        let data_plane_lag = get(DATA_PLANE_LAG)
            .map(|v| duration(DATA_PLANE_LAG, v))
            .transpose()?;
        let app_port = get(APP_PORT).map(port_ref).transpose()?;
        let app_container = match get(APP_CONTAINER) {
            Some("") => {
                return Err(BadAnnotation::new(
                    APP_CONTAINER,
                    "",
                    "must name a container",
                ));
            }
            Some(v) => Some(v.to_owned()),
            None => None,
        };
        let grace_policy = match get(GRACE_PERIOD) {
            None | Some("raise") => GracePolicy::Raise,
            Some("reject") => GracePolicy::Reject,
            Some(other) => {
                return Err(BadAnnotation::new(
                    GRACE_PERIOD,
                    other,
                    "must be \"raise\" or \"reject\"",
                ));
            }
        };
        Ok(Self {
            deregister_delay,
            drain_timeout,
            propagation_margin,
            quiet_window,
            min_quiet_window,
            upstream_restart_wait,
            stream_leave_after,
            data_plane_lag,
            app_port,
            app_container,
            grace_policy,
        })
    }
}

fn duration(key: &'static str, value: &str) -> Result<Duration, BadAnnotation> {
    let d = humantime::parse_duration(value).map_err(|e| {
        BadAnnotation::new(key, value, format!("not a duration like 5s or 1500ms: {e}"))
    })?;
    if d > MAX_DURATION {
        return Err(BadAnnotation::new(key, value, "must be at most 1h"));
    }
    Ok(d)
}

fn port_ref(value: &str) -> Result<PortRef, BadAnnotation> {
    if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
        return match value.parse::<u16>() {
            Ok(n) if n > 0 => Ok(PortRef::Number(n)),
            _ => Err(BadAnnotation::new(
                APP_PORT,
                value,
                "port number must be 1-65535",
            )),
        };
    }
    if is_port_name(value) {
        Ok(PortRef::Name(value.to_owned()))
    } else {
        Err(BadAnnotation::new(
            APP_PORT,
            value,
            "must be a port number or a port name (IANA_SVC_NAME: 1-15 lowercase letters, digits, '-')",
        ))
    }
}

/// Kubernetes' IANA_SVC_NAME rule for container port names.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_come_from_the_sidecar() {
        let s = Settings::from_annotations(&ann(&[(INJECT, "true")])).unwrap();
        assert_eq!(s.deregister_delay, defaults::DEREGISTER_DELAY);
        assert_eq!(s.drain_timeout, defaults::DRAIN_TIMEOUT);
        assert_eq!(s.grace_policy, GracePolicy::Raise);
        assert_eq!(s.app_port, None);
        assert_eq!(s.upstream_restart_wait, defaults::UPSTREAM_RESTART_WAIT);
        assert_eq!(s.data_plane_lag, None);
        let s = Settings::from_annotations(&ann(&[(DATA_PLANE_LAG, " 120s ")])).unwrap();
        assert_eq!(s.data_plane_lag, Some(Duration::from_secs(120)));
        let s = Settings::from_annotations(&ann(&[(DATA_PLANE_LAG, "0s")])).unwrap();
        assert_eq!(s.data_plane_lag, Some(Duration::ZERO));
        let s = Settings::from_annotations(&ann(&[(UPSTREAM_RESTART_WAIT, "0s")])).unwrap();
        assert_eq!(s.upstream_restart_wait, Duration::ZERO);
        assert_eq!(s.stream_leave_after, Duration::ZERO);
    }

    #[test]
    fn streams_must_be_asked_to_leave_before_the_drain_timeout() {
        let s = Settings::from_annotations(&ann(&[(STREAM_LEAVE_AFTER, "20s")])).unwrap();
        assert_eq!(s.stream_leave_after, Duration::from_secs(20));
        let e = Settings::from_annotations(&ann(&[
            (STREAM_LEAVE_AFTER, "30s"),
            (DRAIN_TIMEOUT, "30s"),
        ]))
        .unwrap_err();
        assert_eq!(e.key, STREAM_LEAVE_AFTER);
        assert!(
            e.reason.contains("shorter than the drain timeout (30s)"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn pod_annotations_override_the_deployment() {
        let all = merged(
            &ann(&[(INJECT, "true"), (DRAIN_TIMEOUT, "10s")]),
            &ann(&[(DRAIN_TIMEOUT, "1500ms"), (DEREGISTER_DELAY, "1s")]),
        );
        let s = Settings::from_annotations(&all).unwrap();
        assert_eq!(s.drain_timeout, Duration::from_millis(1500));
        assert!(wants_injection(&all).unwrap());
        let off = merged(&ann(&[(INJECT, "true")]), &ann(&[(INJECT, "false")]));
        assert!(!wants_injection(&off).unwrap());
    }

    #[test]
    fn a_drain_shorter_than_the_deregister_delay_is_refused_at_admission() {
        // The sidecar would refuse to start: the pod would loop on it.
        let err = Settings::from_annotations(&ann(&[(DRAIN_TIMEOUT, "2s")])).unwrap_err();
        assert_eq!(err.key, DRAIN_TIMEOUT);
        assert!(err.reason.contains(DEREGISTER_DELAY), "{}", err.reason);
        let s =
            Settings::from_annotations(&ann(&[(DRAIN_TIMEOUT, "2s"), (DEREGISTER_DELAY, "1s")]))
                .unwrap();
        assert_eq!(s.drain_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_their_annotation() {
        for (key, value) in [
            (DRAIN_TIMEOUT, "soon"),
            (DRAIN_TIMEOUT, "0s"),
            (DEREGISTER_DELAY, "2h"),
            (APP_PORT, "70000"),
            (APP_PORT, "Not_A_Name"),
            (GRACE_PERIOD, "maybe"),
            (UPSTREAM_RESTART_WAIT, "a while"),
            (APP_CONTAINER, ""),
            (DATA_PLANE_LAG, "abc"),
            (DATA_PLANE_LAG, "-1s"),
            (DATA_PLANE_LAG, "2h"),
            (DATA_PLANE_LAG, ""),
        ] {
            let err = Settings::from_annotations(&ann(&[(key, value)])).unwrap_err();
            assert_eq!(err.key, key, "{value}");
            assert!(
                err.to_string().starts_with(&format!("annotation {key}:")),
                "{err}"
            );
        }
        assert_eq!(
            wants_injection(&ann(&[(INJECT, "yes")])).unwrap_err().key,
            INJECT
        );
    }

    #[test]
    fn port_names_follow_kubernetes_rules() {
        assert!(is_port_name("http"));
        assert!(is_port_name("http-2"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("a-very-long-port-name"));
        assert!(!is_port_name("a--b"));
        assert_eq!(port_ref("8080").unwrap(), PortRef::Number(8080));
        assert_eq!(port_ref("web").unwrap(), PortRef::Name("web".into()));
    }
}

/// Annotations are outside input: anyone who may create a pod writes them. Whatever they hold,
/// parsing ends in settings or in a refusal that names an annotation, never in a panic.
/// `make test` runs a fixed seed (PROPTEST_RNG_SEED), `make fuzz` many more cases.
#[cfg(test)]
pub(crate) mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    pub(crate) const KEYS: [&str; 11] = [
        INJECT,
        DEREGISTER_DELAY,
        DRAIN_TIMEOUT,
        PROPAGATION_MARGIN,
        QUIET_WINDOW,
        MIN_QUIET_WINDOW,
        UPSTREAM_RESTART_WAIT,
        DATA_PLANE_LAG,
        APP_PORT,
        APP_CONTAINER,
        GRACE_PERIOD,
    ];

    /// Anything, and things close to what the parsers take.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[ 0-9]{0,25}(ns|us|ms|s|m|h|d|y|)[ 0-9a-z]{0,6}",
            "( |auto|raise|reject|true|false|-1s|1h1s|0)",
            "[a-z0-9-]{0,20}",
        ]
    }

    pub(crate) fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(
            prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
            value(),
            0..8,
        )
    }

    proptest! {
        #[test]
        fn any_annotations_give_settings_or_a_refusal_naming_one(map in annotations()) {
            let _ = wants_injection(&map);
            match Settings::from_annotations(&map) {
                Ok(s) => {
                    prop_assert!(!s.drain_timeout.is_zero());
                    prop_assert!(s.drain_timeout >= s.deregister_delay);
                    for d in [s.deregister_delay, s.drain_timeout, s.propagation_margin, s.min_quiet_window, s.upstream_restart_wait] {
                        prop_assert!(d <= MAX_DURATION);
                    }
                }
                // A drain timeout shorter than the delay is refused on the timeout, which may
                // be the default while only the delay was given.
                Err(e) => prop_assert!(
                    map.contains_key(e.key) || (e.key == DRAIN_TIMEOUT && map.contains_key(DEREGISTER_DELAY)),
                    "{e:?} names no annotation of {map:?}"
                ),
            }
        }

        #[test]
        fn a_duration_up_to_an_hour_is_taken_as_written(ms in 0u64..=3_600_000) {
            let d = Duration::from_millis(ms);
            let written = humantime::format_duration(d).to_string();
            let map = BTreeMap::from([
                (UPSTREAM_RESTART_WAIT.to_owned(), written.clone()),
                (DATA_PLANE_LAG.to_owned(), format!(" {written} ")),
            ]);
            let s = Settings::from_annotations(&map).unwrap();
            prop_assert_eq!(s.upstream_restart_wait, d);
            prop_assert_eq!(s.data_plane_lag, Some(d));
        }
    }
}
