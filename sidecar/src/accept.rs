//! Accepting connections without spinning, and never more at once than a server can hold.
//!
//! An accept error (EMFILE when the process is out of file descriptors, ENOBUFS) is usually
//! transient and repeats at once if retried at once, so the loop pauses instead of burning a
//! core on log lines. A server at its connection limit stops serving new connections: they wait
//! (in the kernel's listen backlog) until one closes, rather than being accepted and cut, so a flood
//! of idle or slow connections delays new clients instead of failing them, and memory stays
//! bounded. One loop for every server of the sidecar and the operator; each picks its pauses
//! and its limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a new connection may take to start its first request (to send its whole head):
/// hyper's own default header timeout, and between nginx's 60 s `client_header_timeout` and
/// Node's 5 s `keepAliveTimeout`. A connection silent, or still sending its head, by then is
/// closed ([`FirstRequest`]); it has no request to lose.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection that has served a request may sit idle before the next one's head is
/// in (hyper's one timer for both). Longer than the clients in front of graceful keep an idle
/// connection (Go's 90 s, Prometheus' 5 min, Google Cloud's load balancers' 600 s): a server
/// that closes an idle connection first can cross a request already on the wire, which the
/// client then sees fail; a client that closes first loses nothing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(620);

/// How often a full server says so in its log while it stays full.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A server's connection limit, shared by its listeners (the sidecar's traffic threads).
#[derive(Clone)]
pub struct Slots {
    free: Arc<Semaphore>,
    max: usize,
}

impl Slots {
    pub fn new(max: usize) -> Self {
        Self {
            free: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
        }
    }
}

/// What a server allows each client: its share of the connection limit, the time to start a
/// first request, and the time idle between requests.
#[derive(Clone)]
pub struct Bounds {
    pub slots: Slots,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Whether a connection has started a request yet: a server marks it from its service and
/// closes the connection if [`FirstRequest::unused`] resolves first.
#[derive(Clone, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    pub fn seen(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn was_seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Resolves `limit` after `since` if no request has started by then; never otherwise.
    pub async fn unused(&self, since: Instant, limit: Duration) {
        tokio::time::sleep_until(since + limit).await;
        if self.was_seen() {
            std::future::pending::<()>().await;
        }
    }
}

/// One accepted connection; its slot frees when the connection's task drops it.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
}

/// The sidecar's pause after an accept error, on both its ports.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

pub struct Acceptor {
    listener: TcpListener,
    /// Which server, for the log.
    server: &'static str,
    /// The pause after a first error, doubled after each further one up to `longest`.
    first: Duration,
    longest: Duration,
    pause: Duration,
    slots: Slots,
    /// When the log last said the server was full.
    full_logged: Option<Instant>,
}

impl Acceptor {
    /// Pauses `first` after an error, doubling up to `longest` while errors repeat.
    pub fn new(
        listener: TcpListener,
        server: &'static str,
        first: Duration,
        longest: Duration,
        slots: Slots,
    ) -> Self {
        Self {
            listener,
            server,
            first,
            longest,
            pause: first,
            slots,
            full_logged: None,
        }
    }

    /// The same pause after every error: on the request path, where a long pause would keep
    /// clients waiting after the cause is gone.
    pub fn fixed(
        listener: TcpListener,
        server: &'static str,
        pause: Duration,
        slots: Slots,
    ) -> Self {
        Self::new(listener, server, pause, pause, slots)
    }

    /// 10 ms doubling to 1 s: for servers whose clients can wait (the operator's).
    pub fn backing_off(listener: TcpListener, server: &'static str, slots: Slots) -> Self {
        Self::new(
            listener,
            server,
            Duration::from_millis(10),
            Duration::from_secs(1),
            slots,
        )
    }

    /// The next connection, once a slot is free for it. The slot is taken after the accept, not
    /// before: a listener that took one ahead would keep it from the others sharing the limit
    /// (the kernel hashes each connection to one listener), so at most one connection per
    /// listener waits here for a slot, and the rest wait in the backlog. Cancel-safe before the
    /// accept; a connection accepted and still waiting for a slot is closed when dropped (only
    /// when the server stops).
    pub async fn accept(&mut self) -> Accepted {
        let (stream, peer) = loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.pause = self.first;
                    break accepted;
                }
                Err(e) => {
                    tracing::warn!(server = self.server, error = %e, pause = ?self.pause, "accept failed; backing off");
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(self.longest);
                }
            }
        };
        let slot = match self.slots.free.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if self
                    .full_logged
                    .is_none_or(|at| at.elapsed() >= FULL_LOG_EVERY)
                {
                    self.full_logged = Some(Instant::now());
                    tracing::warn!(
                        server = self.server,
                        max_connections = self.slots.max,
                        "connection limit reached; new connections wait until one closes"
                    );
                }
                let free = self.slots.free.clone();
                free.acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        Accepted { stream, peer, slot }
    }
}
