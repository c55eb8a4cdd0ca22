//! When the API server was last away, as this replica's own requests saw it, and when every
//! data plane watching it is surely back.
//!
//! kube-proxy, ingress controllers and cloud load-balancer controllers follow EndpointSlices
//! through client-go informers, and so does kube-controller-manager (the EndpointSlice and node
//! lifecycle controllers). While the API server is away their watches fail, and client-go retries
//! them with an exponential backoff: 0.8 s doubling up to 30 s, each wait stretched by up to as
//! much again at random (the reflector's `NewExponentialBackoffManager(800ms, 30s, 2m, 2.0,
//! 1.0)`), so up to 60 s. Once the API server answers again, an informer may still be in that
//! wait, and when its first watch is then refused as too old (a restarted API server's watch
//! cache starts from the present) it waits once more before it lists again. Meanwhile it routes,
//! or decides, by what it knew before the outage: a pod removed then is dropped by the API at
//! once but by that data plane only when its waits end. A draining pod cannot see that (its own
//! traffic may have moved elsewhere by chance), so the operator gives no old pod leave to go
//! until [`RECONNECT_BOUND`] after the API server was back (`plan::step`).
//!
//! Seen through every request this replica makes (a layer under its kube client): a transport
//! error, a 429, 502, 503 or 504 is an outage (client-go backs off on connection refused and on
//! 429; a restarted API server answers 503 until its paths are installed and 429 "storage is
//! (re)initializing" while its watch cache reloads); any other answer is the API server back.
//! A 500 is not: it is one request failing (an admission webhook down, say), not the API away,
//! and would otherwise hold every rollout for one broken object.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// The longest a client-go informer may go on by what it knew before an outage, once the API
/// server is back: two of its backoff's longest waits (30 s, doubled by the most jitter it adds),
/// the one under way and the one before a relist. On the e2e cluster kube-controller-manager's
/// caches caught up 74 s after a 22 s outage (docs/faults.md).
pub const RECONNECT_BOUND: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Seen {
    /// The last request that found the API server away.
    last_failure: Option<Instant>,
    /// The first answer after that failure, if one came yet.
    back_since: Option<Instant>,
}

/// The API server's outages as this replica's requests met them. Shared by the kube client's
/// layer, which records, and the reconciles, which ask.
#[derive(Debug, Default)]
pub struct ApiOutages {
    seen: Mutex<Seen>,
}

impl ApiOutages {
    /// A request found the API server away.
    pub fn failed(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let was_up = seen.last_failure.is_none() || seen.back_since.is_some();
        seen.last_failure = Some(Instant::now());
        seen.back_since = None;
        if was_up {
            tracing::warn!(wait = ?RECONNECT_BOUND, "the API server is away (a transport error, 429, 502, 503 or 504): no old pod gets leave to go until this long after it is back");
        }
    }

    /// A request was answered.
    pub fn answered(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.last_failure.is_some() && seen.back_since.is_none() {
            seen.back_since = Some(Instant::now());
            tracing::info!(
                wait = ?RECONNECT_BOUND,
                "the API server answers again; old pods wait for the data planes' watches to reconnect"
            );
        }
    }

    /// This replica has just come to lead without knowing what happened before (the lease was
    /// not handed back, `leader::Leadership::inherited`): the API server may have been away
    /// moments ago, as seen by the replica that led, so it is taken as just back.
    pub fn assume_just_back(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        seen.last_failure = Some(now);
        seen.back_since = Some(now);
    }

    /// How long yet until every informer is surely watching again, if an outage was seen and
    /// that is still to come: from the first answer after it, or from now while it lasts.
    pub fn settling(&self) -> Option<Duration> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.last_failure?;
        let back = seen.back_since.unwrap_or_else(Instant::now);
        (back + RECONNECT_BOUND)
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }
}

/// The layer under the kube client that shows every request's outcome to [`ApiOutages`].
#[derive(Clone)]
pub struct OutageLayer(pub Arc<ApiOutages>);

impl<S> tower::Layer<S> for OutageLayer {
    type Service = OutageService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OutageService {
            inner,
            outages: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OutageService<S> {
    inner: S,
    outages: Arc<ApiOutages>,
}

/// An answer that says the API server (or the etcd behind it) is away or shedding load.
fn is_outage(status: http::StatusCode) -> bool {
    use http::StatusCode as S;
    matches!(
        status,
        S::TOO_MANY_REQUESTS | S::BAD_GATEWAY | S::SERVICE_UNAVAILABLE | S::GATEWAY_TIMEOUT
    )
}

impl<S, Req, B> tower::Service<Req> for OutageService<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let outages = self.outages.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            match &result {
                Ok(r) if !is_outage(r.status()) => outages.answered(),
                _ => outages.failed(),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn settles_a_reconnect_bound_after_the_first_answer_that_follows_the_last_failure() {
        let o = ApiOutages::default();
        assert_eq!(o.settling(), None, "no outage seen");
        o.answered();
        assert_eq!(o.settling(), None);

        o.failed();
        tokio::time::advance(Duration::from_secs(20)).await;
        // Still away: the whole bound is ahead, whenever it comes back.
        assert_eq!(o.settling(), Some(RECONNECT_BOUND));
        o.failed();
        tokio::time::advance(Duration::from_secs(5)).await;
        o.answered();
        tokio::time::advance(Duration::from_secs(10)).await;
        o.answered(); // later answers do not move the start
        assert_eq!(
            o.settling(),
            Some(RECONNECT_BOUND - Duration::from_secs(10))
        );
        // A failure after it was back starts over.
        o.failed();
        o.answered();
        assert_eq!(o.settling(), Some(RECONNECT_BOUND));
        tokio::time::advance(RECONNECT_BOUND).await;
        assert_eq!(o.settling(), None);
        // A leader that inherited its lease does not know; it waits as if just back.
        o.assume_just_back();
        assert_eq!(o.settling(), Some(RECONNECT_BOUND));
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_counts_transport_errors_429_502_503_and_504_as_outages() {
        let outages = Arc::new(ApiOutages::default());
        let answer = |status: u16| {
            let layer = OutageLayer(outages.clone());
            layer.layer(tower::service_fn(move |_: ()| async move {
                let r = http::Response::builder().status(status).body(()).unwrap();
                Ok::<_, std::io::Error>(r)
            }))
        };
        for ok in [200, 201, 404, 409, 422, 500] {
            answer(ok).ready().await.unwrap().call(()).await.unwrap();
            assert_eq!(outages.settling(), None, "{ok}");
        }
        for away in [429, 502, 503, 504] {
            answer(away).ready().await.unwrap().call(()).await.unwrap();
            assert_eq!(outages.settling(), Some(RECONNECT_BOUND), "{away}");
            answer(200).ready().await.unwrap().call(()).await.unwrap();
            tokio::time::advance(RECONNECT_BOUND).await;
            assert_eq!(outages.settling(), None, "after {away}");
        }
        let mut refused = OutageLayer(outages.clone()).layer(tower::service_fn(|_: ()| async {
            Err::<http::Response<()>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))
        }));
        assert!(refused.ready().await.unwrap().call(()).await.is_err());
        assert_eq!(outages.settling(), Some(RECONNECT_BOUND));
    }
}
