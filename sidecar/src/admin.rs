//! The admin address (never the traffic one): /healthz, /readyz, /prestop, /metrics, and
//! /connections for draining siblings.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::accept::{
    ACCEPT_PAUSE, Accepted, Acceptor, FirstRequest, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, Slots,
};
use crate::app::App;
use crate::defaults;
use crate::deregister::{EndpointWatch, Listing, PodRef};
use crate::drain::{Drain, Phase, Trigger};
use crate::exposition;
use crate::node::NodePeers;
use crate::restarts::Restarts;
use crate::siblings;

/// A /connections question names at most `siblings::MAX_ASKED` addresses.
const CONNECTIONS_BODY_LIMIT: usize = 64 * 1024;

pub struct Admin {
    drain: Arc<Drain>,
    prestop_token: Option<String>,
    app: Arc<App>,
    restarts: Arc<Restarts>,
    /// To tell a pod's deletion from a container restart when preStop comes.
    pod: Option<PodRef>,
    /// Where the kubelet's calls come from: only they may hold requests for a whole restart.
    node: NodePeers,
}

impl Admin {
    pub fn new(
        drain: Arc<Drain>,
        prestop_token: Option<String>,
        app: Arc<App>,
        restarts: Arc<Restarts>,
        pod: Option<PodRef>,
        node: NodePeers,
    ) -> Self {
        if node.addrs().is_empty() {
            warn!(
                "neither the node's address nor a default gateway is known: every restart's preStop holds requests only briefly"
            );
        } else {
            info!(node = ?node.addrs(), "a restart's preStop from these addresses is the kubelet's");
        }
        Self {
            drain,
            prestop_token,
            app,
            restarts,
            pod,
            node,
        }
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        match req.uri().path() {
            defaults::HEALTHZ_PATH if get => text(StatusCode::OK, "ok\n"),
            defaults::READYZ_PATH if get => self.readyz().await,
            defaults::METRICS_PATH if get => {
                self.drain.refresh_phase_seconds();
                let (kind, body) = exposition::negotiate(
                    req.headers().get(header::ACCEPT),
                    self.drain.metrics.encode(),
                );
                let mut resp = text(StatusCode::OK, body);
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
                resp
            }
            defaults::PRESTOP_PATH if get || req.method() == Method::POST => {
                self.prestop(&req, peer).await
            }
            defaults::CONNECTIONS_PATH if req.method() == Method::POST => {
                self.connections(req).await
            }
            defaults::HEALTHZ_PATH
            | defaults::READYZ_PATH
            | defaults::METRICS_PATH
            | defaults::PRESTOP_PATH
            | defaults::CONNECTIONS_PATH => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn readyz(&self) -> Response<Full<Bytes>> {
        let phase = self.drain.phase();
        if phase != Phase::Serving {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("draining: {}\n", phase.as_str()),
            );
        }
        if let Some(why) = self.restarts.unready().await {
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
        }
        if !self.app.ready().await {
            return text(StatusCode::SERVICE_UNAVAILABLE, "app not ready\n");
        }
        text(StatusCode::OK, "ready\n")
    }

    /// Starts the drain (or joins it), blocks until it is done, answers its summary.
    async fn prestop(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if !self.authorized(req, peer) {
            warn!(%peer, "refused /prestop: missing or wrong credentials");
            return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        }
        let listing = match self.drain.phase() {
            Phase::Serving => self.listing().await,
            _ => None,
        };
        if listing == Some(Listing::Staying) {
            // The pod stays: no drain. Requests wait for the new process from now on; the
            // old one finishes what it has before the kubelet stops it. A caller that is not
            // the node holds a token anyone who may `get` the pod can read: its requests wait
            // only as long as a real stop takes to show, and readiness stays as it is.
            let by_kubelet = self.node.contains(peer.ip());
            let left = self.restarts.stop_for_restart(by_kubelet).await;
            if by_kubelet {
                info!(
                    requests_left_at_app = left,
                    %peer,
                    "preStop for a container restart (the pod is not terminating): holding requests until the app is back"
                );
            } else {
                warn!(
                    requests_left_at_app = left,
                    %peer,
                    confirm_within = ?defaults::UNCONFIRMED_STOP_WAIT,
                    "preStop for a container restart from a peer that is not the node: holding requests only until the app stops or the wait ends"
                );
            }
            return json(format!(
                "{{\"restart\":true,\"by_kubelet\":{by_kubelet},\"requests_left_at_app\":{left}}}\n"
            ));
        }
        // Out of every slice's ready endpoints already: the drain need not look again.
        let deregistered = listing == Some(Listing::Terminating { ready: false });
        if !self.drain.trigger(Trigger::Prestop, deregistered) {
            info!(%peer, "/prestop joins the drain under way");
        }
        let summary = self.drain.done().await;
        json(serde_json::to_string(&summary).expect("summary serializes") + "\n")
    }

    /// A draining sibling asks how many new connections came here from the sources it names
    /// (a JSON array of IPs; the answer: their counts, in order). It learns nothing about a
    /// source it does not already know.
    async fn connections(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // hyper times the head only: a body trickled in would hold an admin slot for ever.
        let read = Limited::new(req.into_body(), CONNECTIONS_BODY_LIMIT).collect();
        let body = match tokio::time::timeout(HEADER_READ_TIMEOUT, read).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "body too slow\n"),
        };
        match serde_json::from_slice::<Vec<IpAddr>>(&body) {
            Ok(ips) if ips.len() <= siblings::MAX_ASKED => {
                let counts = self.drain.sources.counts(&ips);
                json(serde_json::to_string(&counts).expect("counts serialize"))
            }
            Ok(_) => text(StatusCode::PAYLOAD_TOO_LARGE, "too many sources\n"),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!("expected a JSON array of IP addresses: {e}\n"),
            ),
        }
    }

    /// With a token: `Authorization: Bearer <token>`, compared in constant time. Without one:
    /// only loopback peers (nothing else in or outside the pod may start a drain).
    fn authorized<B>(&self, req: &Request<B>, peer: SocketAddr) -> bool {
        match &self.prestop_token {
            Some(token) => req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .is_some_and(|given| bool::from(given.ct_eq(token.as_bytes()))),
            None => peer.ip().to_canonical().is_loopback(),
        }
    }

    /// The kubelet runs a container's preStop for every stop it makes, a failed liveness probe
    /// or a resize as much as a deletion. Only a pod that its EndpointSlices list, and not as
    /// terminating, is known to stay; anything else (no slice, no access: None) drains, as
    /// before.
    async fn listing(&self) -> Option<Listing> {
        let pod = self.pod.as_ref()?;
        match EndpointWatch::listing(pod, defaults::TERMINATING_PATIENCE).await {
            Ok(listing) => {
                info!(?listing, "preStop: what the EndpointSlices say of the pod");
                Some(listing)
            }
            Err(e) => {
                warn!(error = %e, "preStop: cannot read EndpointSlices, draining the pod");
                None
            }
        }
    }
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::OK, body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid header"),
    );
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid header"),
    );
    resp
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let slots = Slots::new(defaults::ADMIN_MAX_CONNECTIONS);
    let mut listener = Acceptor::fixed(listener, "admin", ACCEPT_PAUSE, slots);
    loop {
        let Accepted { stream, peer, slot } = listener.accept().await;
        let accepted = Instant::now();
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let first = FirstRequest::default();
            let service = {
                let first = first.clone();
                service_fn(move |req| {
                    first.seen();
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(req, peer).await) }
                })
            };
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = conn => if let Err(e) = result {
                    debug!(error = %e, "admin connection ended with an error");
                },
                () = first.unused(accepted, HEADER_READ_TIMEOUT) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admin(token: Option<&str>) -> Admin {
        let drain = Drain::new(crate::metrics::Metrics::new());
        let upstream = "127.0.0.1:1".parse().unwrap();
        let app = Arc::new(App::new(upstream, None, None));
        let restarts = Restarts::new(
            upstream,
            Duration::from_secs(1),
            1,
            drain.metrics.restarts.clone(),
        );
        Admin::new(
            drain,
            token.map(str::to_owned),
            app,
            restarts,
            None,
            NodePeers::default(),
        )
    }

    fn req(auth: Option<&str>) -> Request<()> {
        let mut b = Request::get("/prestop");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[tokio::test]
    async fn prestop_token_is_required_when_set() {
        let a = admin(Some("s3cret"));
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let node: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert!(a.authorized(&req(Some("Bearer s3cret")), node));
        assert!(!a.authorized(&req(Some("Bearer s3cre")), node));
        assert!(!a.authorized(&req(Some("Bearer s3cret2")), local));
        assert!(!a.authorized(&req(Some("s3cret")), local));
        assert!(!a.authorized(&req(None), local));
    }

    #[tokio::test]
    async fn without_token_only_loopback_may_drain() {
        let a = admin(None);
        assert!(a.authorized(&req(None), "127.0.0.1:4000".parse().unwrap()));
        assert!(a.authorized(&req(None), "[::1]:4000".parse().unwrap()));
        assert!(!a.authorized(&req(None), "10.1.2.3:4000".parse().unwrap()));
    }
}
