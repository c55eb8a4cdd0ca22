//! Traffic through Traefik, the e2e cluster's ingress controller (e2e/scripts: IngressClass
//! `traefik`, the default, and Gateway `traefik`, both on the node address port 8000): routes
//! by Ingress and by HTTPRoute, and load of several kinds (GET, POST) at once through them.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::networking::v1::Ingress;
use serde_json::json;

use crate::load::{Load, LoadReport, Request};
use crate::namespace::TestNamespace;
use crate::{Result, cluster, wait};

/// Where Traefik listens for HTTP (e2e/scripts/common.sh says the same).
pub const ADDR: &str = "10.244.0.1:8000";
/// The Gateway every HTTPRoute attaches to: namespace and name.
pub const GATEWAY: (&str, &str) = ("traefik", "traefik");

/// An Ingress sending every path of `host` to port 80 of Service `service`; `class` None uses the
/// cluster's default class (Traefik's).
pub fn ingress(name: &str, host: &str, service: &str, class: Option<&str>) -> Ingress {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name},
        "spec": {
            "ingressClassName": class,
            "rules": [{"host": host, "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": service, "port": {"number": 80}}},
            }]}}],
        },
    }))
    .expect("Ingress manifest")
}

/// An HTTPRoute on the Gateway, sending every path of `host` to port 80 of Service `service`.
pub async fn http_route(ns: &TestNamespace, name: &str, host: &str, service: &str) -> Result<()> {
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns.name},
        "spec": {
            "parentRefs": [{"namespace": GATEWAY.0, "name": GATEWAY.1}],
            "hostnames": [host],
            "rules": [{"backendRefs": [{"name": service, "port": 80}]}],
        },
    });
    kubectl_apply(&route.to_string())
}

/// `kubectl apply --server-side -f -` of one manifest (JSON is YAML).
pub fn kubectl_apply(manifest: &str) -> Result<()> {
    let args = ["apply", "--server-side", "--force-conflicts", "-f", "-"];
    let out = cluster::kubectl_with_input(&args, manifest)?;
    cluster::stdout_of(out, || format!("kubectl {}", args.join(" ")))?;
    Ok(())
}

/// Waits until `GET /` with `Host: host` at `addr` answers 2xx ten times in a row: the
/// controller has read the route and every backend it lists answers.
pub async fn wait_routed(addr: &str, host: &str, timeout: Duration) -> Result<()> {
    wait::until_seen(&format!("{host} routed at {addr}"), timeout, || async {
        Ok(wait::ten_2xx_in_a_row(addr, host).await)
    })
    .await
}

/// One stream of load: its settings and its URL.
pub type Stream = (Load, String);

/// Runs `action` under every stream at once (each its own vegeta) and returns its output with
/// each stream's counts, in order. The first stream times the action; the others start with it
/// and stop after their tail once it is done.
pub async fn during_all<F: Future>(
    streams: &[Stream],
    action: F,
) -> Result<(F::Output, Vec<LoadReport>)> {
    let (first, rest) = streams.split_first().expect("at least one stream");
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let timed = async {
        let output = action.await;
        done_tx.send_replace(true);
        output
    };
    let others = rest.iter().map(|(load, url)| {
        let mut done = done_rx.clone();
        load.during(url, async move {
            let _ = done.wait_for(|d| *d).await;
        })
    });
    let (first, others) = tokio::join!(
        first.0.during(&first.1, timed),
        futures::future::join_all(others)
    );
    let (output, report) = first?;
    let mut reports = vec![report];
    for other in others {
        reports.push(other?.1);
    }
    Ok((output, reports))
}

/// GET and POST streams through each of `hosts` at `addr`, `rate` requests per second each.
pub fn get_and_post(addr: &str, hosts: &[impl AsRef<str>], rate: u32) -> Vec<Stream> {
    let mut streams = Vec::new();
    for host in hosts {
        let get = Load {
            rate,
            connections: 4,
            host: Some(host.as_ref().to_owned()),
            request: Request::Get,
            ..Load::default()
        };
        streams.push((get.clone(), format!("http://{addr}/")));
        let post = Load {
            request: Request::Post("graceful-e2e".into()),
            ..get
        };
        streams.push((post, format!("http://{addr}/echo")));
    }
    streams
}

/// What each stream saw, one line each: "GET demo.local: sent ... failed ...".
pub fn describe(streams: &[Stream], reports: &[LoadReport]) -> String {
    streams
        .iter()
        .zip(reports)
        .map(|((load, _), r)| {
            format!(
                "{} {}: {r}",
                load.request.method(),
                load.host.as_deref().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
