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
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a client may take to send a request's head, and how long an HTTP/1.1 connection
/// may sit idle between requests (hyper starts one timer for both). hyper's own default, and
/// between nginx's 60 s `client_header_timeout` and Node's 5 s `keepAliveTimeout`; every server
/// of the sidecar and the operator uses it, and the sidecar gives a connection that has sent no
/// request by then (still choosing its protocol, or HTTP/2 without a stream) a graceful close.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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

/// What a server allows each client: its share of the connection limit, and the time to send
/// a request's head (or to come back with the next one).
#[derive(Clone)]
pub struct Bounds {
    pub slots: Slots,
    pub header_read_timeout: Duration,
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
