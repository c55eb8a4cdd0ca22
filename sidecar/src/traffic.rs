//! The traffic address: accepts connections (HTTP/1.1 and HTTP/2 prior knowledge on one port)
//! until the drain is done, and closes each one gracefully once quiesce starts.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::Version;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::debug;

use crate::accept::{ACCEPT_PAUSE, Accepted, Acceptor, Bounds};
use crate::defaults;
use crate::drain::{self, Calm, ConnectionGuard, Drain, Phase};
use crate::metrics::Protocol;
use crate::proxy::{Downstream, GaugeGuard, Proxy};

/// One traffic thread: its own single-threaded event loop and listening socket, until the
/// drain is done.
pub fn shard(
    listener: std::net::TcpListener,
    bounds: Bounds,
    proxy: Arc<Proxy>,
    drain: Arc<Drain>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Without this thread the others still serve; the log says why it is missing.
            tracing::error!(error = %e, "cannot start a traffic thread");
            return;
        }
    };
    rt.block_on(async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => serve(listener, bounds, proxy, drain).await,
            Err(e) => tracing::error!(error = %e, "cannot register a traffic listener"),
        }
    });
}

pub async fn serve(listener: TcpListener, bounds: Bounds, proxy: Arc<Proxy>, drain: Arc<Drain>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.idle_timeout)
        .keep_alive(true);
    // A client that vanished without a FIN (a node gone, a NAT entry dropped) is found by a
    // ping left unanswered, instead of holding its slot for ever; HTTP/2 requires the answer.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(defaults::H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(defaults::H2_KEEP_ALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let mut phase = drain.subscribe();
    let mut listener = Acceptor::fixed(listener, "traffic", ACCEPT_PAUSE, bounds.slots);
    loop {
        tokio::select! {
            Accepted { stream, peer, slot } = listener.accept() => {
                // Counted as open from the accept on, so the drain never ends between an
                // accept and its task's start.
                let open = drain.connection();
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, peer, (open, slot), proxy.clone(), drain.clone(), builder.clone(), bounds.header_read_timeout));
            }
            // New connections are served all through the drain, until it is done.
            _ = drain::reached(&mut phase, Phase::Done) => break,
        }
    }
}

/// How long a connection closed for starting no request may take to go before it is dropped.
const UNUSED_DROP_AFTER: Duration = Duration::from_secs(1);

/// What one client connection has shown so far.
struct ConnState {
    peer: IpAddr,
    seen_request: AtomicBool,
    http2: AtomicBool,
    accepted: Instant,
    /// When the last request started, in ms since `accepted`.
    last_request_ms: AtomicU64,
    /// Counts the connection under its protocol once the first request tells which.
    open: Mutex<GaugeGuard>,
}

impl ConnState {
    fn on_request(&self, version: Version, drain: &Drain) {
        let ms = self.accepted.elapsed().as_millis() as u64;
        self.last_request_ms.fetch_max(ms, Ordering::Relaxed);
        if self.seen_request.load(Ordering::Relaxed)
            || self.seen_request.swap(true, Ordering::Relaxed)
        {
            drain.arrivals.request(false);
            return;
        }
        drain.arrivals.request(true);
        drain.sources.connection(self.peer);
        let protocol = if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
            Protocol::http2
        } else {
            Protocol::http1
        };
        *self.open.lock().expect("not poisoned") = GaugeGuard::new(drain.metrics.open(protocol));
    }

    /// When this connection will have been without a new request for `QUIESCE_IDLE_GRACE`.
    fn idle_deadline(&self) -> Instant {
        let last = Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed));
        self.accepted + last + defaults::QUIESCE_IDLE_GRACE
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _open: (ConnectionGuard, OwnedSemaphorePermit),
    proxy: Arc<Proxy>,
    drain: Arc<Drain>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    header_read_timeout: Duration,
) {
    let state = Arc::new(ConnState {
        peer: peer.ip(),
        seen_request: AtomicBool::new(false),
        http2: AtomicBool::new(false),
        accepted: Instant::now(),
        last_request_ms: AtomicU64::new(0),
        open: Mutex::new(GaugeGuard::new(drain.metrics.open(Protocol::pending))),
    });
    let (down, mut driven) = Downstream::new(peer);
    let down = Arc::new(down);
    let service = {
        let (state, drain) = (state.clone(), drain.clone());
        service_fn(move |req| {
            state.on_request(req.version(), &drain);
            let (proxy, down) = (proxy.clone(), down.clone());
            async move { Ok::<_, Infallible>(proxy.handle(req, &down).await) }
        })
    };
    // Upstream connections of this client connection, driven here, in the same task.
    let mut upstreams = FuturesUnordered::new();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);

    let mut phase = drain.subscribe();
    let mut calm = drain.calm();
    let quiesce = async {
        // From here every HTTP/1.1 response says `Connection: close` (see Proxy::handle): a
        // client that still reaches this pod comes back on a new connection, which its data
        // plane routes afresh.
        drain::reached(&mut phase, Phase::Quiescing).await;
        loop {
            if state.http2.load(Ordering::Relaxed) {
                // GOAWAY once new connections stopped coming: the client's reconnection then
                // goes elsewhere instead of back here.
                let _ = calm.wait_for(|c| *c >= Calm::NoNewConnections).await;
                return;
            }
            // HTTP/1.1 has no such signal: an idle connection is closed only once no traffic
            // has come for the quiet window and it has itself been idle a moment, since
            // closing it sooner could cross a request already on the wire.
            let _ = calm.wait_for(|c| *c == Calm::Quiet).await;
            let deadline = state.idle_deadline();
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    };
    tokio::pin!(quiesce);
    let mut force = drain.forced();
    // Built once: this loop runs on every wake-up of the connection.
    let forced = drain::forced(&mut force);
    tokio::pin!(forced);
    let mut closing = false;
    // A connection that has started no request by then (silent, still choosing its protocol or
    // sending its first head, or HTTP/2 without a stream) is closed: gracefully (GOAWAY, or a
    // cancelled protocol detection), then, a head still trickling in a second later, dropped.
    // hyper's own timer is the idle one, far longer, and does not cover the bytes before the
    // protocol is known.
    let unused = sleep_until(state.accepted + header_read_timeout);
    tokio::pin!(unused);
    let mut dropping = None;
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, %peer, "connection ended with an error");
                }
                break;
            }
            _ = &mut unused, if dropping.is_none() && !state.seen_request.load(Ordering::Relaxed) => {
                debug!(%peer, "no request within the header read timeout; closing");
                if !closing {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                dropping = Some(Box::pin(sleep(UNUSED_DROP_AFTER)));
            }
            _ = async { dropping.as_mut().expect("guarded").await }, if dropping.is_some() => {
                if !state.seen_request.load(Ordering::Relaxed) {
                    break;
                }
                dropping = None;
            }
            // HTTP/1.1: keep-alive off, the connection closes after any response in flight;
            // HTTP/2: GOAWAY.
            _ = &mut quiesce, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            Some(upstream) = driven.recv() => upstreams.push(upstream),
            Some(()) = upstreams.next(), if !upstreams.is_empty() => {}
            _ = &mut forced => break,
        }
    }
}
