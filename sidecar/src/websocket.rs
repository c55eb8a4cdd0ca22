//! WebSocket tunnels asked to leave with a close handshake instead of a cut (RFC 6455).
//!
//! A cut (the drain deadline closing the sockets) leaves the client with an abnormal closure
//! (1006) and no way to know which of its messages the app processed. So once the data planes
//! have let go of the pod, the sidecar closes each tunnel in this order:
//!
//! 1. At the next frame boundary of the client's stream it sends the app a Close (1001 Going
//!    Away), as a client would (masked). Client frames that come after it are not passed on:
//!    the app has been asked to close, and they reach no one.
//! 2. The app answers: it may finish what it was sending (the replies to the messages it got),
//!    then sends its own Close. Everything before that Close goes to the client; the Close
//!    itself is replaced by the sidecar's Close 1001 (whatever code the app chose), or sent
//!    anyway when the app has not answered within `APP_CLOSE_WAIT`.
//! 3. The client answers with its Close (or `CLIENT_CLOSE_WAIT` passes), and both sockets close.
//!
//! So every message the app received had its replies delivered before the client learnt of the
//! close, and every message the client sent after the app was asked reached no one: a client
//! that resends what got no reply before a 1001 loses nothing. Messages the app sends on its own
//! (not replies) after step 1 still reach the client until the app's Close.
//!
//! Only frame headers are read (2 to 14 bytes each, RFC 6455 section 5.2): no payload is
//! unmasked, decompressed or buffered. A WebSocket library would bring a handshake, random
//! masks and UTF-8 checks into every pod for what is forty lines of header layout.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

/// The close code for "the server is going away" (RFC 6455 section 7.4.1).
pub const GOING_AWAY: u16 = 1001;
/// How long the app may take to answer the sidecar's Close with its own.
pub const APP_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long the client may take to answer the Close it was sent.
pub const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(5);

const OP_CLOSE: u8 = 0x8;
const READ_CHUNK: usize = 16 * 1024;

/// Where the tunnel's close handshake is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Open,
    /// A Close from either side went through as is: the endpoints close it themselves.
    ClosingByEndpoints,
    /// The sidecar's Close went to the app.
    AppAsked,
    /// The sidecar's Close went to the client.
    ClientAsked,
    /// Nothing more to wait for.
    Done,
}

/// What came of a tunnel, for the metrics and the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leaving {
    /// The sidecar ran the close handshake (the tunnel was open when asked to leave).
    pub asked: bool,
    /// The app answered the Close within its wait.
    pub app_answered: bool,
    /// The client answered its Close within its wait.
    pub client_answered: bool,
    /// Client data frames that came after the app was asked, and so reached no one.
    pub client_frames_unsent: u64,
}

/// A Close from either endpoint went through while the tunnel was open: the endpoints finish
/// the handshake themselves, and the drain does not start its own.
fn closing_by_endpoints(stage: &watch::Sender<Stage>) {
    stage.send_if_modified(|s| {
        let open = *s == Stage::Open;
        if open {
            *s = Stage::ClosingByEndpoints;
        }
        open
    });
}

/// A frame header's layout: its length, the payload length, and the opcode. None until the
/// whole header is in `buf`.
fn header(buf: &[u8]) -> Option<(usize, u64, u8)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len_bytes, payload) = match b1 & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    let len = 2 + len_bytes + if masked { 4 } else { 0 };
    (buf.len() >= len).then_some((len, payload, b0 & 0x0f))
}

/// A Close frame with `code`; `masked` as a client must send it (the key needs no secrecy: the
/// payload is the sidecar's own two bytes, RFC 6455 section 10.3).
fn close_frame(code: u16, masked: bool) -> Vec<u8> {
    let payload = code.to_be_bytes();
    if !masked {
        return vec![0x80 | OP_CLOSE, 2, payload[0], payload[1]];
    }
    let key = (std::hash::RandomState::new().build_hasher().finish() as u32).to_be_bytes();
    vec![
        0x80 | OP_CLOSE,
        0x80 | 2,
        key[0],
        key[1],
        key[2],
        key[3],
        payload[0] ^ key[0],
        payload[1] ^ key[1],
    ]
}

/// One direction's stream, cut at frame boundaries.
#[derive(Default)]
struct Frames {
    /// Bytes read and not yet passed on or dropped.
    buf: BytesMut,
    /// Of the current frame (its header already taken), the payload bytes still to come.
    left: u64,
    /// The current frame's opcode.
    op: u8,
}

/// A run of one frame's bytes, and whether the frame ends with it.
struct Run {
    bytes: BytesMut,
    op: u8,
    starts: bool,
    ends: bool,
}

impl Frames {
    /// The next run of bytes of one frame, if any can be told yet.
    fn next_run(&mut self) -> Option<Run> {
        if self.left == 0 {
            let (len, payload, op) = header(&self.buf)?;
            self.op = op;
            let take = (len as u64 + payload).min(self.buf.len() as u64) as usize;
            self.left = len as u64 + payload - take as u64;
            return Some(Run {
                bytes: self.buf.split_to(take),
                op,
                starts: true,
                ends: self.left == 0,
            });
        }
        if self.buf.is_empty() {
            return None;
        }
        let take = self.left.min(self.buf.len() as u64) as usize;
        self.left -= take as u64;
        Some(Run {
            bytes: self.buf.split_to(take),
            op: self.op,
            starts: false,
            ends: self.left == 0,
        })
    }
}

/// Copies frames both ways until both sides end, and once `leave` resolves runs the close
/// handshake above. Cut at once only by dropping it (the drain's deadline).
pub async fn tunnel<C, A>(client: C, app: A, leave: impl Future<Output = ()>) -> Leaving
where
    C: AsyncRead + AsyncWrite,
    A: AsyncRead + AsyncWrite,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut app_rx, mut app_tx) = tokio::io::split(app);
    let stage = watch::Sender::new(Stage::Open);
    let client_closed = watch::Sender::new(false);
    let mut leaving = Leaving::default();
    let upstream = client_to_app(
        &mut client_rx,
        &mut app_tx,
        &stage,
        &client_closed,
        leave,
        &mut leaving.client_frames_unsent,
    );
    let downstream = app_to_client(&mut app_rx, &mut client_tx, &stage, &client_closed);
    // An error on either side ends both.
    if let Ok((asked, app_answered)) = tokio::try_join!(upstream, downstream) {
        leaving.asked = asked;
        leaving.app_answered = app_answered;
    }
    leaving.client_answered = leaving.asked && *client_closed.borrow();
    leaving
}

/// The client's frames to the app; after the app is asked to close, to no one. True: the app
/// was asked.
async fn client_to_app<R, W>(
    rx: &mut R,
    tx: &mut W,
    stage: &watch::Sender<Stage>,
    client_closed: &watch::Sender<bool>,
    leave: impl Future<Output = ()>,
    unsent: &mut u64,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut leave = std::pin::pin!(leave);
    let mut asked_to_leave = false;
    let mut asked = false;
    let mut done = stage.subscribe();
    loop {
        if asked_to_leave && frames.left == 0 && *stage.borrow() == Stage::Open {
            tx.write_all(&close_frame(GOING_AWAY, true)).await?;
            tx.flush().await?;
            stage.send_replace(Stage::AppAsked);
            asked = true;
        }
        let read = tokio::select! {
            () = &mut leave, if !asked_to_leave => {
                asked_to_leave = true;
                continue;
            }
            _ = done.wait_for(|s| *s == Stage::Done) => return Ok(asked),
            read = { frames.buf.reserve(READ_CHUNK); rx.read_buf(&mut frames.buf) } => read?,
        };
        if read == 0 {
            // The client is gone: so is the app's reader, as a proxy passes a half-close on.
            if !asked {
                tx.shutdown().await?;
            }
            return Ok(asked);
        }
        while let Some(run) = frames.next_run() {
            if !asked {
                tx.write_all(&run.bytes).await?;
                if run.ends && run.op == OP_CLOSE {
                    closing_by_endpoints(stage);
                }
            } else if run.ends && run.op == OP_CLOSE {
                // The client's Close, in answer to the sidecar's or its own: it sends no more.
                client_closed.send_replace(true);
                return Ok(asked);
            } else if run.ends && run.op & 0x8 == 0 {
                *unsent += 1;
            }
            if asked_to_leave && run.ends && *stage.borrow() == Stage::Open {
                tx.write_all(&close_frame(GOING_AWAY, true)).await?;
                stage.send_replace(Stage::AppAsked);
                asked = true;
            }
        }
        tx.flush().await?;
    }
}

/// The app's frames to the client, until the app's Close (or its wait) turns into the sidecar's
/// Close 1001; then the client's answer is awaited. True: the app answered the Close.
async fn app_to_client<R, W>(
    rx: &mut R,
    tx: &mut W,
    stage: &watch::Sender<Stage>,
    client_closed: &watch::Sender<bool>,
) -> std::io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut asked = stage.subscribe();
    let mut app_deadline: Option<Instant> = None;
    // Whether the frame under way is passed on; decided at its first byte, as the stage may
    // change while it streams.
    let mut passing = true;
    let app_answered = loop {
        if app_deadline.is_none() && *stage.borrow() == Stage::AppAsked {
            app_deadline = Some(Instant::now() + APP_CLOSE_WAIT);
        }
        let waited_out = app_deadline.is_some_and(|at| Instant::now() >= at);
        if waited_out && frames.left == 0 {
            break false;
        }
        let read = tokio::select! {
            _ = asked.wait_for(|s| *s == Stage::AppAsked), if app_deadline.is_none() => continue,
            () = sleep_until(app_deadline.unwrap_or_else(Instant::now)), if app_deadline.is_some() && !waited_out => continue,
            read = { frames.buf.reserve(READ_CHUNK); rx.read_buf(&mut frames.buf) } => read?,
        };
        if read == 0 {
            if app_deadline.is_none() {
                // The app is gone before any handshake of ours: pass the half-close on.
                tx.shutdown().await?;
                stage.send_replace(Stage::Done);
                return Ok(false);
            }
            // Asked, and gone without its Close: the client is told all the same.
            break false;
        }
        let mut answered = false;
        while let Some(run) = frames.next_run() {
            if run.starts {
                let asked_now = *stage.borrow() >= Stage::AppAsked;
                passing = !(asked_now && run.op == OP_CLOSE);
            }
            if passing {
                tx.write_all(&run.bytes).await?;
            }
            if run.ends && run.op == OP_CLOSE {
                if !passing {
                    // The app's answer, replaced by the sidecar's Close 1001 below.
                    answered = true;
                    break;
                }
                closing_by_endpoints(stage);
            }
        }
        tx.flush().await?;
        if answered {
            break true;
        }
    };
    tx.write_all(&close_frame(GOING_AWAY, false)).await?;
    tx.flush().await?;
    stage.send_replace(Stage::ClientAsked);
    let mut closed = client_closed.subscribe();
    let _ = tokio::time::timeout(CLIENT_CLOSE_WAIT, closed.wait_for(|c| *c)).await;
    stage.send_replace(Stage::Done);
    tx.shutdown().await?;
    Ok(app_answered)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    /// A frame with `op` and `payload`, masked (a client's) or not (a server's).
    fn frame(op: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | op];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => f.push(mask_bit | n as u8),
            n @ 126..=0xffff => {
                f.push(mask_bit | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [1, 2, 3, 4];
            f.extend(key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend(payload);
        }
        f
    }

    /// Reads exactly one frame from `io`: (opcode, payload unmasked).
    async fn read_frame(io: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut buf = vec![0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        loop {
            if let Some((len, payload, op)) = header(&buf) {
                let mut rest = vec![0u8; len + payload as usize - buf.len()];
                io.read_exact(&mut rest).await.unwrap();
                buf.extend(rest);
                let mut body = buf[len..].to_vec();
                if buf[1] & 0x80 != 0 {
                    let key = &buf[len - 4..len];
                    body.iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b ^= key[i % 4]);
                }
                return (op, body);
            }
            let mut more = [0u8; 1];
            io.read_exact(&mut more).await.unwrap();
            buf.push(more[0]);
        }
    }

    const TEXT: u8 = 0x1;

    #[test]
    fn headers_of_every_length_form_are_read_only_when_whole() {
        for (payload, masked) in [(5, false), (200, true), (70_000, false)] {
            let f = frame(TEXT, &vec![b'x'; payload], masked);
            let (len, got, op) = header(&f).unwrap();
            assert_eq!((got, op), (payload as u64, TEXT));
            assert_eq!(len + payload, f.len());
            assert_eq!(header(&f[..len - 1]), None);
        }
        assert_eq!(
            header(&close_frame(GOING_AWAY, true)).unwrap(),
            (6, 2, OP_CLOSE)
        );
    }

    struct Ends {
        client: DuplexStream,
        app: DuplexStream,
        leave: Option<tokio::sync::oneshot::Sender<()>>,
        tunnel: tokio::task::JoinHandle<Leaving>,
    }

    fn start() -> Ends {
        let (client, client_side) = duplex(1 << 20);
        let (app, app_side) = duplex(1 << 20);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tunnel = tokio::spawn(tunnel(client_side, app_side, async move {
            let _ = rx.await;
        }));
        Ends {
            client,
            app,
            leave: Some(tx),
            tunnel,
        }
    }

    #[tokio::test]
    async fn frames_pass_unchanged_both_ways_while_open() {
        let mut e = start();
        let big = vec![7u8; 100_000];
        e.client.write_all(&frame(TEXT, &big, true)).await.unwrap();
        assert_eq!(read_frame(&mut e.app).await, (TEXT, big.clone()));
        e.app.write_all(&frame(0x2, b"bin", false)).await.unwrap();
        assert_eq!(read_frame(&mut e.client).await, (0x2, b"bin".to_vec()));
        // A client's own close goes through as is, and the tunnel ends when both sides do.
        e.client
            .write_all(&frame(OP_CLOSE, &1000u16.to_be_bytes(), true))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut e.app).await.0, OP_CLOSE);
        e.app.shutdown().await.unwrap();
        drop(e.client);
        let leaving = e.tunnel.await.unwrap();
        assert!(!leaving.asked);
    }

    /// A client message half sent when the drain asks: it reaches the app whole, then the
    /// app's Close; what the client sends after reaches no one; the app's reply to the whole
    /// message reaches the client before the client's Close 1001, whatever code the app used.
    #[tokio::test]
    async fn asked_to_leave_the_app_closes_first_then_the_client_with_1001() {
        let mut e = start();
        let message = frame(TEXT, b"in flight", true);
        e.client.write_all(&message[..8]).await.unwrap();
        tokio::task::yield_now().await;
        e.leave.take().unwrap().send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        e.client.write_all(&message[8..]).await.unwrap();
        assert_eq!(read_frame(&mut e.app).await, (TEXT, b"in flight".to_vec()));
        let (op, code) = read_frame(&mut e.app).await;
        assert_eq!((op, code), (OP_CLOSE, GOING_AWAY.to_be_bytes().to_vec()));

        e.client
            .write_all(&frame(TEXT, b"too late", true))
            .await
            .unwrap();
        e.app
            .write_all(&frame(TEXT, b"reply: in flight", false))
            .await
            .unwrap();
        e.app
            .write_all(&frame(OP_CLOSE, &1000u16.to_be_bytes(), false))
            .await
            .unwrap();
        assert_eq!(
            read_frame(&mut e.client).await,
            (TEXT, b"reply: in flight".to_vec())
        );
        let (op, code) = read_frame(&mut e.client).await;
        assert_eq!((op, code), (OP_CLOSE, GOING_AWAY.to_be_bytes().to_vec()));
        e.client
            .write_all(&frame(OP_CLOSE, &GOING_AWAY.to_be_bytes(), true))
            .await
            .unwrap();
        let leaving = tokio::time::timeout(Duration::from_secs(1), e.tunnel)
            .await
            .expect("the tunnel ends once the client answers")
            .unwrap();
        assert_eq!(
            leaving,
            Leaving {
                asked: true,
                app_answered: true,
                client_answered: true,
                client_frames_unsent: 1,
            }
        );
        // Nothing after the app's Close reached the app.
        let mut rest = Vec::new();
        e.app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_that_never_answers_still_gets_its_client_a_1001() {
        let mut e = start();
        e.leave.take().unwrap().send(()).unwrap();
        assert_eq!(read_frame(&mut e.app).await.0, OP_CLOSE);
        let (op, code) = read_frame(&mut e.client).await;
        assert_eq!((op, code), (OP_CLOSE, GOING_AWAY.to_be_bytes().to_vec()));
        // Nor does the client: the tunnel ends after its wait.
        let leaving = e.tunnel.await.unwrap();
        assert_eq!(
            (leaving.asked, leaving.app_answered, leaving.client_answered),
            (true, false, false)
        );
    }
}
