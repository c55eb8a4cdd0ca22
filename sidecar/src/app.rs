//! The app's own endpoints the sidecar may call: its readiness path (folded into /readyz)
//! and its drain hook (called once when a drain starts, like endless's user hooks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::timeout;
use tracing::{info, warn};

use crate::drain::{Drain, Phase};

const APP_CALL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct App {
    client: Client<HttpConnector, Empty<Bytes>>,
    ready_uri: Option<Uri>,
    drain_url: Option<Uri>,
}

impl App {
    pub fn new(upstream: SocketAddr, ready_path: Option<&str>, drain_url: Option<Uri>) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(1)
            .build_http();
        let ready_uri = ready_path.map(|p| {
            format!("http://{upstream}{p}")
                .parse()
                .expect("validated path makes a URI")
        });
        Self {
            client,
            ready_uri,
            drain_url,
        }
    }

    /// True when no app readiness path is configured, or it answers 2xx in time.
    pub async fn ready(&self) -> bool {
        let Some(uri) = &self.ready_uri else {
            return true;
        };
        let req = Request::get(uri.clone())
            .body(Empty::new())
            .expect("valid request");
        matches!(timeout(APP_CALL_TIMEOUT, self.client.request(req)).await,
            Ok(Ok(resp)) if resp.status().is_success())
    }

    /// Waits for a drain to start, then POSTs the app's drain hook once.
    pub async fn drain_hook(self: Arc<Self>, drain: Arc<Drain>) {
        let Some(uri) = self.drain_url.clone() else {
            return;
        };
        let mut phase = drain.subscribe();
        crate::drain::reached(&mut phase, Phase::Deregistering).await;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .body(Empty::new())
            .expect("valid request");
        match timeout(APP_CALL_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                info!(%uri, status = %resp.status(), "app drain hook called")
            }
            Ok(Ok(resp)) => {
                warn!(%uri, status = %resp.status(), "app drain hook refused; draining anyway")
            }
            Ok(Err(e)) => warn!(%uri, error = %e, "app drain hook failed; draining anyway"),
            Err(_) => warn!(%uri, "app drain hook timed out; draining anyway"),
        }
    }
}
