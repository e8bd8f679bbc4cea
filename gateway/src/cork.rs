//! One TCP send for a WebSocket upgrade and the client's first frame.
//!
//! A client's `101 Switching Protocols` goes out as soon as its token is accepted, its
//! welcome only once it is registered in ZooKeeper, a round trip later: two sends, and on
//! loopback the receiver's TCP input and wake-up run inside each. [`Corked`] holds the `101`
//! back and writes it together with whatever comes next on the connection (the welcome, or a
//! close frame when the client cannot be served), in one `writev`: the client still learns
//! nothing before it is registered, and a connect costs one send less at both ends (as
//! uWebSockets' `cork` does for the upgrade and the messages sent in its open handler).
//!
//! Nothing else is held: any other response (a 401, `/metrics`, the dashboard's files) and
//! everything after the first frame pass straight through. Shutting the connection down writes
//! a held `101` first. A held `101` is dropped only with a connection that never wrote again,
//! and every upgraded client writes at once (its welcome or a close).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The start of the response held back.
const SWITCHING: &[u8] = b"HTTP/1.1 101 ";

/// A connection that holds an upgrade's `101` until its first frame (see the module docs).
#[derive(Debug)]
pub(crate) struct Corked<T> {
    inner: T,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Nothing written yet: the first write decides.
    Watching,
    /// A `101` held back, sent with the next write.
    Held(Vec<u8>),
    /// Everything passes through.
    Open,
}

impl<T> Corked<T> {
    pub(crate) fn new(inner: T) -> Self {
        Corked {
            inner,
            state: State::Watching,
        }
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes what is held, with `bufs` after it in the same `writev` when they fit. Ready
    /// with how much of `bufs` went too, once nothing is held any more.
    fn poll_held(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let State::Held(held) = &mut self.state else {
                return Poll::Ready(Ok(0));
            };
            let mut slices = Vec::with_capacity(1 + bufs.len());
            slices.push(IoSlice::new(held));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if written >= held.len() {
                let of_bufs = written - held.len();
                self.state = State::Open;
                return Poll::Ready(Ok(of_bufs));
            }
            held.drain(..written);
        }
    }
}

/// The total length of `bufs`.
fn total(bufs: &[IoSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Open => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            State::Watching => {
                let first = bufs.iter().find(|b| !b.is_empty());
                if first.is_some_and(|b| b.starts_with(SWITCHING)) {
                    let mut held = Vec::with_capacity(total(bufs));
                    bufs.iter().for_each(|b| held.extend_from_slice(b));
                    this.state = State::Held(held);
                    Poll::Ready(Ok(total(bufs)))
                } else {
                    if first.is_some() {
                        this.state = State::Open;
                    }
                    Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
                }
            }
            State::Held(_) => {
                let of_bufs = ready!(this.poll_held(cx, bufs))?;
                if of_bufs > 0 || total(bufs) == 0 {
                    return Poll::Ready(Ok(of_bufs));
                }
                // Only the held bytes went: `bufs` as any write, now that nothing is held.
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// A held `101` stays held: the upgrade's flush must not send it on its own.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_held(cx, &[]))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const UPGRADE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";

    fn pair() -> (Corked<DuplexStream>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(4096);
        (Corked::new(ours), theirs)
    }

    /// What the other end can read right now.
    fn readable(theirs: &mut DuplexStream) -> Vec<u8> {
        let mut got = vec![0; 4096];
        match theirs.read(&mut got).now_or_never() {
            Some(Ok(n)) => got.truncate(n),
            _ => got.clear(),
        }
        got
    }

    #[tokio::test]
    async fn an_upgrade_goes_out_with_the_first_frame_after_it_in_one_write() {
        let (mut ours, mut theirs) = pair();
        ours.write_all(UPGRADE).await.unwrap();
        ours.flush().await.unwrap();
        assert!(readable(&mut theirs).is_empty(), "the 101 went out alone");

        let frame = b"\x81\x05hello";
        ours.write_all(frame).await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(readable(&mut theirs), [UPGRADE, &frame[..]].concat());

        // Then everything passes through.
        ours.write_all(b"\x81\x02hi").await.unwrap();
        assert_eq!(readable(&mut theirs), b"\x81\x02hi");
    }

    #[tokio::test]
    async fn other_responses_pass_straight_through() {
        let (mut ours, mut theirs) = pair();
        let unauthorized = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        ours.write_all(unauthorized).await.unwrap();
        assert_eq!(readable(&mut theirs), unauthorized);
        // A 101 later on the same connection is not held either: only a first response is.
        ours.write_all(UPGRADE).await.unwrap();
        assert_eq!(readable(&mut theirs), UPGRADE);
    }

    #[tokio::test]
    async fn shutting_down_sends_a_held_upgrade() {
        let (mut ours, mut theirs) = pair();
        ours.write_all(UPGRADE).await.unwrap();
        ours.shutdown().await.unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, UPGRADE);
    }

    #[tokio::test]
    async fn a_held_upgrade_that_goes_out_in_pieces_is_all_sent_before_the_frame() {
        // Room for 16 bytes at a time: the held response takes several writes.
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut ours = Corked::new(ours);
        let frame = b"\x81\x05hello";
        let writer = tokio::spawn(async move {
            ours.write_all(UPGRADE).await.unwrap();
            ours.write_all(frame).await.unwrap();
            ours.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, [UPGRADE, &frame[..]].concat());
    }
}
