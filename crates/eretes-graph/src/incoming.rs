//! The data server's connections: at most [`MAX_CONNECTIONS`] at once, and
//! each must send its first bytes within [`FIRST_BYTES_WITHIN`].
//!
//! Without a cap, every connection a peer opened held a descriptor and up
//! to [`super::rpc`]'s 32 streams of buffered messages for as long as it
//! lasted: enough of them ran the node out of descriptors or memory. A cap
//! alone would let silent connections (never a byte of HTTP/2's preface,
//! which hyper waits for without a deadline) fill it and shut real peers
//! out; hence the first-bytes deadline. Once a connection speaks HTTP/2,
//! its pings (`PING_EVERY`) close it if its peer stops answering.
//!
//! Legitimately, a node holds one connection from each peer that calls it
//! (the client side pools one per peer node), so the cap is about a
//! thousand peers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Connections the data server holds at once; one more is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// A new connection's first bytes must arrive within this, or it is
/// closed.
pub(crate) const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// How long accepting pauses after it failed (out of descriptors, say), so
/// that it never spins.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The connections `listener` accepts, `max` at most at once (one over is
/// closed, logged once per burst), each closed unless it sends a byte
/// within `first_bytes_within`. Never yields an error: tonic's server
/// stops at one, and a failed accept is only waited out.
pub(crate) fn capped(
    listener: TcpListener,
    max: usize,
    first_bytes_within: Duration,
) -> impl Stream<Item = io::Result<CappedConnection>> {
    let permits = Arc::new(Semaphore::new(max));
    futures::stream::unfold(
        (listener, permits, false),
        move |(listener, permits, mut at_cap)| async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        warn!(%error, "the graph data server cannot accept a connection");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if !at_cap {
                        at_cap = true;
                        warn!(
                            max,
                            "the graph data server's connection cap is reached; new connections \
                             are closed until some end"
                        );
                    }
                    continue;
                };
                at_cap = false;
                // Requests and answers are small messages each waited for:
                // not held back to be coalesced.
                let _ = stream.set_nodelay(true);
                let connection = CappedConnection {
                    stream,
                    _permit: permit,
                    first_bytes: Some(Box::pin(tokio::time::sleep(first_bytes_within))),
                };
                return Some((Ok(connection), (listener, permits, at_cap)));
            }
        },
    )
}

/// An accepted connection, holding its place under the cap until dropped.
pub(crate) struct CappedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for CappedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.first_bytes {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no bytes within the first-bytes deadline",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for CappedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for CappedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accept from a capped listener in the background; the accepted
    /// connections come out of the channel.
    async fn serve(
        max: usize,
        first_bytes_within: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<CappedConnection>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, connections) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let incoming = capped(listener, max, first_bytes_within);
            futures::pin_mut!(incoming);
            while let Some(connection) = incoming.next().await {
                if accepted.send(connection.unwrap()).is_err() {
                    return;
                }
            }
        });
        (address, connections)
    }

    /// Whether the server closed `client` (end of stream or a reset),
    /// waiting up to 10 s.
    async fn closed_by_the_server(client: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_until_one_ends() {
        let (address, mut connections) = serve(2, Duration::from_secs(60)).await;
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(address).await.unwrap());
            held.push(connections.recv().await.unwrap());
        }
        let mut over = TcpStream::connect(address).await.unwrap();
        assert!(closed_by_the_server(&mut over).await, "the third is closed");
        assert!(connections.try_recv().is_err(), "and not handed out");
        drop(held.pop());
        let mut after = TcpStream::connect(address).await.unwrap();
        let mut served = connections.recv().await.unwrap();
        after.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        served.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x", "one place freed, one more served");
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_one_that_speaks_is_not() {
        let within = Duration::from_millis(300);
        let (address, mut connections) = serve(4, within).await;
        let _silent_client = TcpStream::connect(address).await.unwrap();
        let mut silent = connections.recv().await.unwrap();
        let mut byte = [0u8; 1];
        let error = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
            .await
            .expect("the deadline ends the read")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        let mut speaking_client = TcpStream::connect(address).await.unwrap();
        let mut speaking = connections.recv().await.unwrap();
        speaking_client.write_all(b"a").await.unwrap();
        speaking.read_exact(&mut byte).await.unwrap();
        // Quiet for longer than the deadline after its first byte: kept.
        tokio::time::sleep(within * 2).await;
        speaking_client.write_all(b"b").await.unwrap();
        speaking.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"b");
    }
}
