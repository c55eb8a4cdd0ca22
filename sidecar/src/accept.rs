//! Accepting connections without spinning: an accept error (EMFILE when the process is out of
//! file descriptors, ENOBUFS) is usually transient and repeats at once if retried at once, so
//! the loop backs off (10 ms doubling to 1 s) instead of burning a core on log lines.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

pub struct Acceptor {
    listener: TcpListener,
    /// Which server, for the log.
    server: &'static str,
    pause: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener, server: &'static str) -> Self {
        Self {
            listener,
            server,
            pause: FIRST_PAUSE,
        }
    }

    /// The next connection. Cancel-safe: dropping it mid-pause loses nothing.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.pause = FIRST_PAUSE;
                    return accepted;
                }
                Err(e) => {
                    tracing::warn!(server = self.server, error = %e, pause = ?self.pause, "accept failed; backing off");
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(LONGEST_PAUSE);
                }
            }
        }
    }
}
