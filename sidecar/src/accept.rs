//! Accepting connections without spinning: an accept error (EMFILE when the process is out of
//! file descriptors, ENOBUFS) is usually transient and repeats at once if retried at once, so
//! the loop pauses instead of burning a core on log lines. One loop for every server of the
//! sidecar and the operator; each picks its pauses.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

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
}

impl Acceptor {
    /// Pauses `first` after an error, doubling up to `longest` while errors repeat.
    pub fn new(
        listener: TcpListener,
        server: &'static str,
        first: Duration,
        longest: Duration,
    ) -> Self {
        Self {
            listener,
            server,
            first,
            longest,
            pause: first,
        }
    }

    /// The same pause after every error: on the request path, where a long pause would keep
    /// clients waiting after the cause is gone.
    pub fn fixed(listener: TcpListener, server: &'static str, pause: Duration) -> Self {
        Self::new(listener, server, pause, pause)
    }

    /// 10 ms doubling to 1 s: for servers whose clients can wait (the operator's).
    pub fn backing_off(listener: TcpListener, server: &'static str) -> Self {
        Self::new(
            listener,
            server,
            Duration::from_millis(10),
            Duration::from_secs(1),
        )
    }

    /// The next connection. Cancel-safe: dropping it mid-pause loses nothing.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.pause = self.first;
                    return accepted;
                }
                Err(e) => {
                    tracing::warn!(server = self.server, error = %e, pause = ?self.pause, "accept failed; backing off");
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(self.longest);
                }
            }
        }
    }
}
