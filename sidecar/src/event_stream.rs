//! Server-sent event streams (`text/event-stream`) ended cleanly when the drain asks streams to
//! leave, instead of cut at its deadline: at the next event boundary (a blank line) the response
//! body ends, so the client gets the chunked terminator (HTTP/1.1) or END_STREAM (HTTP/2) after
//! a whole event. `EventSource` then reconnects with `Last-Event-ID`, through a data plane that
//! no longer routes here, and an app that honours the header resumes with nothing lost. An
//! event half sent when the stream ends is dropped, as the SSE parser drops an unterminated one.
//!
//! Only event streams: ending any other streamed body early would hand the client a truncated
//! download that looks complete.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Wraps an event stream's body: once `leave` resolves, it ends at the next event boundary.
pub struct Leaving<B> {
    inner: B,
    leave: Pin<Box<dyn Future<Output = ()> + Send>>,
    asked: bool,
    ended: bool,
    /// Where the bytes passed on stand, line by line.
    lines: Lines,
    /// Called once, when the stream ends because it was asked to.
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl<B> Leaving<B> {
    pub fn new(
        inner: B,
        leave: impl Future<Output = ()> + Send + 'static,
        on_end: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            inner,
            leave: Box::pin(leave),
            asked: false,
            ended: false,
            lines: Lines::BOUNDARY,
            on_end: Some(Box::new(on_end)),
        }
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

/// The line ends just passed: an event ends with a blank line, that is two line ends in a row,
/// each CRLF, LF or CR (the SSE spec). A CR counts at once; an LF right after it is its CRLF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lines {
    ends: u8,
    after_cr: bool,
}

impl Lines {
    /// Where a stream starts: between events.
    const BOUNDARY: Lines = Lines {
        ends: 2,
        after_cr: false,
    };

    fn step(&mut self, b: u8) {
        match b {
            b'\n' if self.after_cr => self.after_cr = false,
            b'\n' => self.ends = (self.ends + 1).min(2),
            b'\r' => {
                self.ends = (self.ends + 1).min(2);
                self.after_cr = true;
            }
            _ => {
                *self = Lines {
                    ends: 0,
                    after_cr: false,
                }
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.ends >= 2
    }

    fn pass(&mut self, data: &[u8]) {
        data.iter().for_each(|&b| self.step(b));
    }

    /// Passes `data` up to the end of its first event boundary, if any: the index just past it.
    fn first_boundary(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            let was = self.at_boundary();
            self.step(b);
            if !was && self.at_boundary() {
                return Some(i + 1);
            }
        }
        None
    }
}

impl<B> Body for Leaving<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.asked && self.leave.as_mut().poll(cx).is_ready() {
            self.asked = true;
        }
        if self.asked && self.lines.at_boundary() {
            self.end();
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let data = data.clone();
        if !self.asked {
            self.lines.pass(&data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match self.lines.first_boundary(&data) {
            Some(end) => {
                self.end();
                Poll::Ready(Some(Ok(Frame::data(data.slice(..end)))))
            }
            None => Poll::Ready(Some(Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Its end may come sooner than the app's.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn first(tail: &[u8], data: &[u8]) -> Option<usize> {
        let mut lines = Lines::BOUNDARY;
        lines.pass(b"x");
        lines.pass(tail);
        lines.first_boundary(data)
    }

    #[test]
    fn boundaries_with_every_line_end() {
        assert_eq!(first(b"", b"data: a\n\nnext"), Some(9));
        assert_eq!(first(b"", b"data: a\r\n\r\nnext"), Some(10));
        assert_eq!(first(b"", b"data: a\r\rnext"), Some(9));
        assert_eq!(first(b"", b"data: a\nid: 1\n"), None);
        assert_eq!(first(b"", b"data: a\r\nid: 1\r\n"), None);
        // Split across frames.
        assert_eq!(first(b"a\r\n", b"\r\nnext"), Some(1));
        assert_eq!(first(b"a\n", b"\nnext"), Some(1));
        // A new event begun after a boundary is not one.
        assert_eq!(first(b"a\n\nb", b"c"), None);
        let mut lines = Lines::BOUNDARY;
        assert!(lines.at_boundary());
        lines.pass(b"data: a\n\nda");
        assert!(!lines.at_boundary());
    }

    fn chunks(
        parts: &[&'static str],
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn asked_mid_event_it_ends_after_that_event() {
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        let (ask, asked) = tokio::sync::oneshot::channel::<()>();
        let mut body = Leaving::new(
            chunks(&[
                "id: 1\ndata: one\n\nid: 2\nda",
                "ta: two\n\nid: 3\ndata: three\n\n",
            ]),
            async {
                let _ = asked.await;
            },
            move || flag.store(true, std::sync::atomic::Ordering::Relaxed),
        );
        let head = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&head[..], b"id: 1\ndata: one\n\nid: 2\nda");
        ask.send(()).unwrap();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"ta: two\n\n");
        assert!(ended.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[tokio::test]
    async fn not_asked_it_passes_everything() {
        let body = Leaving::new(
            chunks(&["data: a\n\n", "data: b\n\n"]),
            std::future::pending(),
            || {},
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"data: a\n\ndata: b\n\n");
    }
}
