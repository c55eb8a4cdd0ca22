//! Forwarding one request to the app: bodies streamed both ways, hop-by-hop headers handled
//! as RFC 9110 section 7.6.1 says, X-Forwarded-For/Proto added, Upgrade (WebSocket) tunnelled,
//! and a short 502 when the app cannot be reached.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version, uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::drain::{Drain, Phase};
use crate::metrics::{Protocol, RestartFailure};
use crate::restarts::{AtApp, HoldRefused, Restarts};
use crate::{event_stream, websocket};

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What goes to the app: the client's body as it arrives, or none (a request sent again).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Hop-by-hop fields a proxy must not forward (RFC 9110 7.6.1), besides those that
/// `Connection` itself names.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Increments a gauge for as long as it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Drives one upstream connection; run by the task of the client connection it serves.
pub type UpstreamConn = Pin<Box<dyn Future<Output = ()> + Send>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client connection a request arrived on, as the proxy needs it.
pub struct Downstream {
    forwarded_for: HeaderValue,
    /// HTTP/1.1 requests on one client connection come one at a time, so that connection gets
    /// an upstream connection of its own: no shared pool, no lock contention, and both sides
    /// are driven by one task, so no hop between tasks per request.
    upstream: Mutex<Option<http1::SendRequest<UpstreamBody>>>,
    drive: mpsc::UnboundedSender<UpstreamConn>,
}

impl Downstream {
    /// The receiver yields the upstream connections the caller's task must drive.
    pub fn new(peer: SocketAddr) -> (Self, mpsc::UnboundedReceiver<UpstreamConn>) {
        let (drive, driven) = mpsc::unbounded_channel();
        let ip = peer.ip().to_canonical().to_string();
        let down = Self {
            forwarded_for: HeaderValue::from_str(&ip).expect("an IP is a valid header value"),
            upstream: Mutex::new(None),
            drive,
        };
        (down, driven)
    }

    fn take_upstream(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        self.upstream.lock().expect("not poisoned").take()
    }

    fn keep_upstream(&self, sender: http1::SendRequest<UpstreamBody>) {
        *self.upstream.lock().expect("not poisoned") = Some(sender);
    }
}

/// How a send to the app failed, and so what may be done with the request.
enum Failed {
    /// Nothing reached the app; here is the request back.
    NotSent(Box<Request<UpstreamBody>>, UpstreamError),
    /// Nothing reached the app, but the pooled client kept the request.
    Lost(UpstreamError),
    /// The request was written, at least in part: the app may have received it.
    Sent(UpstreamError),
}

/// A bodyless request, kept to be sent again.
struct Resend {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Resend {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn request(self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Safe to send again even if the app's handler may have seen it: the methods RFC 9110 calls
/// safe, or a request the client marked with an `Idempotency-Key`.
fn is_idempotent<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.headers().contains_key("idempotency-key")
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    #[error("cannot connect to the app: timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

pub struct Proxy {
    /// Pooled client for HTTP/2 clients, h2c upstreams and upgrades.
    client: Client<HttpConnector, UpstreamBody>,
    upstream: SocketAddr,
    h2c: bool,
    authority: uri::Authority,
    upstream_version: Version,
    drain: Arc<Drain>,
    restarts: Arc<Restarts>,
    /// How long a WebSocket tunnel runs on once the data planes have let go, before the drain
    /// asks it to leave (`--stream-leave-after`).
    stream_leave_after: Duration,
    /// Set by the first failure of a burst, cleared by the next success: one log line each.
    upstream_down: AtomicBool,
    failures: AtomicU64,
}

impl Proxy {
    pub fn new(
        upstream: SocketAddr,
        h2c: bool,
        drain: Arc<Drain>,
        restarts: Arc<Restarts>,
        stream_leave_after: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(h2c)
            .build(connector);
        Self {
            client,
            upstream,
            h2c,
            authority: upstream
                .to_string()
                .parse()
                .expect("a socket address is an authority"),
            upstream_version: if h2c {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            drain,
            restarts,
            stream_leave_after,
            upstream_down: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        down: &Downstream,
    ) -> Response<ProxyBody> {
        let metrics = &self.drain.metrics;
        metrics.requests.inc();
        if self.drain.phase() != Phase::Serving {
            metrics.requests_after_trigger.inc();
        }
        // Both end with the response's last frame (or the client leaving), as the body drops.
        let in_flight = (
            GaugeGuard::new(&metrics.in_flight),
            metrics.request_duration.start(),
        );
        let downstream = req.version();

        let upgrade = wants_upgrade(&req);
        let websocket = upgrade && upgrades_to_websocket(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let paired = downstream <= Version::HTTP_11 && !upgrade && !self.h2c;
        if let Err(e) = self.prepare(&mut req, down, upgrade, !paired) {
            return short(StatusCode::BAD_REQUEST, e);
        }

        let (mut resp, at_app) = match self.forward(req, down, paired).await {
            Ok(sent) => sent,
            Err(failed) => return failed,
        };
        if self.upstream_down.swap(false, Ordering::Relaxed) {
            let n = self.failures.swap(0, Ordering::Relaxed);
            info!(failed_requests = n, "app reachable again");
        }

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let leave = websocket.then(|| self.leave());
                tunnel(self.drain.clone(), client_upgrade, upstream_upgrade, leave);
            }
        } else {
            strip_hop_by_hop(resp.headers_mut());
            // hyper closes an HTTP/1.1 connection after graceful_shutdown() but does not say so
            // in the response; clients should know before they reuse it.
            if downstream <= Version::HTTP_11 && self.drain.phase() >= Phase::Quiescing {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        let (parts, body) = resp.into_parts();
        // The request stays in flight until its body is fully sent (or the client goes away).
        let body = body
            .map_frame(move |frame| {
                let _ = &in_flight;
                frame
            })
            // The app died while sending it: nothing can be answered any more, but it counts.
            .map_err(move |e| {
                at_app.cut();
                e
            })
            .boxed_unsync();
        let body = if is_event_stream(&parts.headers) {
            let ended = self.drain.metrics.streams.event_streams_ended.clone();
            event_stream::Leaving::new(body, self.leave(), move || {
                ended.inc();
            })
            .boxed_unsync()
        } else {
            body
        };
        Response::from_parts(parts, body)
    }

    /// Resolves when long-lived streams should be asked to leave: `--stream-leave-after` once
    /// every data plane has let go of the pod (docs/long-lived.md).
    fn leave(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut let_go = self.drain.let_go();
        let after = self.stream_leave_after;
        async move {
            let _ = let_go.wait_for(|g| *g).await;
            tokio::time::sleep(after).await;
        }
    }

    /// Turns the client's request into the app's: origin-form URI, hop-by-hop fields out,
    /// forwarding fields in.
    fn prepare(
        &self,
        req: &mut Request<Incoming>,
        down: &Downstream,
        upgrade: bool,
        absolute_uri: bool,
    ) -> Result<(), &'static str> {
        let uri = req.uri().clone();
        let headers = req.headers_mut();
        // HTTP/2 requests carry the host as :authority; the app expects a Host field.
        if !headers.contains_key(header::HOST)
            && let Some(authority) = uri.authority()
        {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|_| "bad authority")?;
            headers.insert(header::HOST, host);
        }
        if !headers.contains_key(header::HOST) {
            let host =
                HeaderValue::from_str(self.authority.as_str()).map_err(|_| "bad authority")?;
            headers.insert(header::HOST, host);
        }
        let trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        let upgrade_value = if upgrade {
            headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(headers);
        if trailers {
            // We pass trailers through, so our own TE toward the app may say so (gRPC needs it).
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(protocol) = upgrade_value {
            headers.insert(header::UPGRADE, protocol);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        forwarded_for(headers, &down.forwarded_for);
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }

        if absolute_uri {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = Uri::builder()
                .scheme(uri::Scheme::HTTP)
                .authority(self.authority.clone())
                .path_and_query(path)
                .build()
                .map_err(|_| "bad request target")?;
        } else if uri.scheme().is_some() || uri.authority().is_some() {
            // An HTTP/1.1 connection sends origin-form: the path only.
            let path = uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| "/".parse().expect("valid"));
            *req.uri_mut() = Uri::from(path);
        }
        *req.version_mut() = self.upstream_version;
        Ok(())
    }

    /// Sends the request; while the app restarts, waits for it and sends again what is safe
    /// to send again (see `restarts` and docs/restarts.md). On failure, the response to give.
    async fn forward(
        &self,
        req: Request<Incoming>,
        down: &Downstream,
        paired: bool,
    ) -> Result<(Response<Incoming>, AtApp), Response<ProxyBody>> {
        let restarts = &self.restarts;
        let idempotent = is_idempotent(&req);
        // A copy to send again: of an idempotent request the app may have received, and of any
        // bodyless one the pooled client would lose to a refused connect. A body is never
        // copied: it stays in the client's socket until the app can take it.
        let mut copy =
            (!restarts.wait().is_zero() && req.body().is_end_stream() && (idempotent || !paired))
                .then(|| Resend::of(&req));
        let mut next = req.map(Either::Left);
        let mut deadline = None;
        let mut retried = false;
        // The wait ends `--upstream-restart-wait` after the first hold or refusal.
        let ends_at = |deadline: &mut Option<Instant>| {
            *deadline.get_or_insert_with(|| Instant::now() + restarts.wait())
        };
        // Waiting is on and its time is not over.
        let may_wait = |deadline: &mut Option<Instant>| {
            !restarts.wait().is_zero() && Instant::now() < ends_at(deadline)
        };
        loop {
            if restarts.holding() {
                self.hold(ends_at(&mut deadline)).await?;
            }
            let at_app = restarts.at_app();
            let sent = if paired {
                self.send_paired(next, down).await
            } else {
                self.send_pooled(next).await
            };
            let error = match sent {
                Ok(resp) => {
                    restarts.accepted();
                    return Ok((resp, at_app));
                }
                // Nothing reached the app: wait for it and try again, whatever the method and
                // whatever the state says now (the app may be back already: the prober can see
                // it between this refusal and the next look).
                Err(Failed::NotSent(req, e)) => {
                    restarts.refused();
                    if may_wait(&mut deadline) {
                        next = *req;
                        continue;
                    }
                    if !restarts.wait().is_zero() {
                        restarts.failed(RestartFailure::wait_expired);
                        return Err(unavailable(HoldRefused::Expired));
                    }
                    e
                }
                Err(Failed::Lost(e)) => {
                    restarts.refused();
                    match copy.take() {
                        Some(c) if may_wait(&mut deadline) => {
                            next = c.request();
                            continue;
                        }
                        _ => e,
                    }
                }
                // The app may have received it: only a request safe to repeat goes again, once.
                Err(Failed::Sent(e)) => match copy.take().filter(|_| idempotent && !retried) {
                    Some(c) => {
                        retried = true;
                        restarts.retried();
                        restarts.look_again().await;
                        next = c.request();
                        continue;
                    }
                    None => {
                        restarts.failed(RestartFailure::cut_in_flight);
                        e
                    }
                },
            };
            return Err(self.bad_gateway(error));
        }
    }

    /// Waits for the app until `deadline` (or the drain's forced close); a 503 past it.
    async fn hold(&self, deadline: Instant) -> Result<(), Response<ProxyBody>> {
        let mut force = self.drain.forced();
        let held = tokio::select! {
            held = self.restarts.hold(deadline) => held,
            _ = crate::drain::forced(&mut force) => {
                self.restarts.failed(RestartFailure::wait_expired);
                Err(HoldRefused::Expired)
            }
        };
        held.map_err(unavailable)
    }

    /// Sends on this client connection's own upstream connection; a request that was never
    /// written because a kept-alive connection was closing goes once more on a new one.
    async fn send_paired(
        &self,
        mut req: Request<UpstreamBody>,
        down: &Downstream,
    ) -> Result<Response<Incoming>, Failed> {
        if let Some(mut sender) = down.take_upstream().filter(|s| !s.is_closed())
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    down.keep_upstream(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(Failed::Sent(e.into_error().into())),
                },
            }
        }
        let mut sender = match self.connect_paired(down).await {
            Ok(sender) => sender,
            Err(e) => return Err(Failed::NotSent(Box::new(req), e)),
        };
        if let Err(e) = sender.ready().await {
            return Err(Failed::NotSent(Box::new(req), e.into()));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                down.keep_upstream(sender);
                Ok(resp)
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) => Err(Failed::NotSent(Box::new(unsent), e.into_error().into())),
                None => Err(Failed::Sent(e.into_error().into())),
            },
        }
    }

    /// Sends through the pooled client, which takes the request whatever happens: a refused
    /// connect loses it (`Lost`).
    async fn send_pooled(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, Failed> {
        self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                Failed::Lost(e.into())
            } else {
                Failed::Sent(e.into())
            }
        })
    }

    async fn connect_paired(
        &self,
        down: &Downstream,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.upstream))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        let conn: UpstreamConn = Box::pin(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        // The client connection's task drives it; if that task is gone, a task of its own.
        if let Err(mpsc::error::SendError(conn)) = down.drive.send(conn) {
            tokio::spawn(conn);
        }
        Ok(sender)
    }

    fn bad_gateway(&self, e: UpstreamError) -> Response<ProxyBody> {
        self.drain.metrics.upstream_errors.inc();
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.upstream_down.swap(true, Ordering::Relaxed) {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            warn!(error = %e, cause, upstream = %self.authority, "app unreachable: answering 502 until it is back");
        }
        short(StatusCode::BAD_GATEWAY, "graceful-sidecar: app unreachable")
    }
}

/// 503 with `Retry-After`: the app is restarting, another pod may answer.
fn unavailable(why: HoldRefused) -> Response<ProxyBody> {
    let text = match why {
        HoldRefused::Full => "graceful-sidecar: app restarting, too many requests waiting",
        HoldRefused::Expired | HoldRefused::Off => {
            "graceful-sidecar: app restarting, not back in time"
        }
    };
    let mut resp = short(StatusCode::SERVICE_UNAVAILABLE, text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn short(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// A server-sent event stream (`Content-Type: text/event-stream`, parameters aside).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// `Upgrade: websocket` (RFC 6455 section 4.1: the token is case-insensitive).
fn upgrades_to_websocket(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no hashing, no allocation.
    if !headers
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || k == header::UPGRADE)
    {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let combined = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            HeaderValue::from_str(&format!("{prior}, {}", ip.to_str().unwrap_or_default())).ok()
        }
        _ => None,
    };
    headers.insert("x-forwarded-for", combined.unwrap_or_else(|| ip.clone()));
}

/// Copies bytes both ways between the client and the app once both sides switched protocols.
/// The tunnel counts as an open connection: the drain waits for it, and cuts it at the deadline.
/// A WebSocket tunnel is asked to leave with a close handshake when `leave` resolves
/// (`websocket`), so the drain seldom has to cut it.
fn tunnel(
    drain: Arc<Drain>,
    client: OnUpgrade,
    upstream: OnUpgrade,
    leave: Option<impl Future<Output = ()> + Send + 'static>,
) {
    let guard = drain.connection();
    let open = GaugeGuard::new(drain.metrics.open(Protocol::upgraded));
    let mut force = drain.forced();
    tokio::spawn(async move {
        let _guards = (guard, open);
        let copy = async {
            let (client, upstream) = tokio::try_join!(client, upstream)?;
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            let Some(leave) = leave else {
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                return Ok(());
            };
            let leaving = websocket::tunnel(client, upstream, leave).await;
            drain.metrics.streams.record(&leaving);
            if leaving.asked {
                debug!(?leaving, "websocket tunnel closed by the drain's handshake");
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        tokio::select! {
            result = copy => if let Err(e) = result { debug!(error = %e, "upgraded tunnel ended") },
            _ = crate::drain::forced(&mut force) => debug!("upgraded tunnel cut by the drain deadline"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert(header::TRAILER, "grpc-status".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["trailer", "x-end-to-end"]);
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        let ip = |a: &str| Downstream::new(a.parse().unwrap()).0.forwarded_for;
        forwarded_for(&mut h, &ip("10.0.0.9:5555"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        forwarded_for(&mut h, &ip("[::ffff:10.0.0.10]:5555"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 10.0.0.10");
    }
}
