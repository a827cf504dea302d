//! The data server's connections: at most [`MAX_CONNECTIONS`] at once, at
//! most [`MAX_CONNECTIONS_PER_PEER`] of them from one IP address
//! ([`eretes_runtime::admission`]), and each must send
//! HTTP/2's whole connection preface within [`PREFACE_WITHIN`].
//!
//! Without a cap, every connection a peer opened held a descriptor and up
//! to `rpc`'s 32 streams of buffered messages for as long as it lasted:
//! enough of them ran the node out of descriptors or memory. A cap alone
//! would let silent connections fill it and shut real peers out: hyper
//! waits for the preface without a deadline, and its pings, which close a
//! connection whose peer stops answering, start only once the preface is
//! in. Hence the preface deadline, counted in bytes: a connection that
//! sends one byte and stops is closed too.
//!
//! Legitimately, a node holds one connection from each peer node that
//! calls it (the client side pools one per peer node).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eretes_runtime::admission::{Admitted, ConnectionCaps, Refused};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Connections the data server holds at once; one more is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// Connections one peer may hold at once: a node holds one to each peer
/// node, and several nodes may share an address (one machine, or a NAT).
pub(crate) const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// A new connection's preface must arrive within this, or it is closed.
pub(crate) const PREFACE_WITHIN: Duration = Duration::from_secs(10);

/// The length of HTTP/2's connection preface, `PRI * HTTP/2.0…`.
const PREFACE_BYTES: usize = 24;

/// How long accepting pauses after it failed (out of descriptors, say), so
/// that it never spins.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The connections `listener` accepts that `caps` take (a refusal is
/// logged once per burst), each closed unless its first [`PREFACE_BYTES`]
/// arrive within `preface_within`. Never yields an error: a failed accept
/// is only waited out (tonic would go on too, but log it only at trace
/// level).
pub(crate) fn capped(
    listener: TcpListener,
    caps: ConnectionCaps,
    preface_within: Duration,
) -> impl Stream<Item = io::Result<CappedConnection>> {
    futures::stream::unfold((listener, caps), move |(listener, caps)| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A client that reset before its connection was accepted.
                Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(error) => {
                    warn!(%error, "the graph data server cannot accept a connection");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let places = match caps.admit(peer.ip()) {
                Ok(places) => places,
                Err(Refused::Total {
                    first_of_burst: true,
                }) => {
                    warn!(
                        max = MAX_CONNECTIONS,
                        "the graph data server's connection cap is reached; new connections \
                         are closed until some end"
                    );
                    continue;
                }
                Err(Refused::Peer {
                    first_of_burst: true,
                }) => {
                    warn!(
                        %peer,
                        max = MAX_CONNECTIONS_PER_PEER,
                        "a peer holds as many graph data connections as one may; its new ones \
                         are closed until some end"
                    );
                    continue;
                }
                Err(_) => continue,
            };
            // Requests and answers are small messages each waited for:
            // not held back to be coalesced.
            let _ = stream.set_nodelay(true);
            let connection = CappedConnection {
                stream,
                _places: places,
                preface: Some((PREFACE_BYTES, Box::pin(tokio::time::sleep(preface_within)))),
            };
            return Some((Ok(connection), (listener, caps)));
        }
    })
}

/// An accepted connection, holding its places under the caps until
/// dropped.
pub(crate) struct CappedConnection {
    stream: TcpStream,
    _places: Admitted,
    /// Bytes of the preface still to come, and by when; `None` once in.
    preface: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
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
        let Some((left, deadline)) = &mut this.preface else {
            return read;
        };
        match &read {
            Poll::Ready(Ok(())) => {
                *left = left.saturating_sub(buf.filled().len() - before);
                if *left == 0 {
                    this.preface = None;
                }
            }
            // Looked at only once the read found nothing: tokio's driver
            // learns of the socket's readiness and of the deadline in the
            // same turn, and the read is tried first, so a preface that
            // arrived before the deadline is read, however late.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the HTTP/2 preface did not arrive in time",
                )));
            }
            _ => {}
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
        caps: ConnectionCaps,
        preface_within: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<CappedConnection>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, connections) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let incoming = capped(listener, caps, preface_within);
            futures::pin_mut!(incoming);
            while let Some(connection) = incoming.next().await {
                if accepted.send(connection.unwrap()).is_err() {
                    return;
                }
            }
        });
        (address, connections)
    }

    /// A connection to `address` from loopback address 127.0.0.`host` (all
    /// of 127.0.0.0/8 is this machine's, so each is a peer of its own).
    async fn connect_from(host: u8, address: std::net::SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
            .unwrap();
        socket.connect(address).await.unwrap()
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

    /// Whether `byte` sent by `client` reaches `served`.
    async fn carries(client: &mut TcpStream, served: &mut CappedConnection, byte: u8) -> bool {
        client.write_all(&[byte]).await.unwrap();
        let mut read = [0u8; 1];
        served.read_exact(&mut read).await.is_ok() && read[0] == byte
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_until_one_ends() {
        let (address, mut connections) =
            serve(ConnectionCaps::new(2, 10), Duration::from_secs(60)).await;
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for host in [2, 3] {
            clients.push(connect_from(host, address).await);
            held.push(connections.recv().await.unwrap());
        }
        let mut over = connect_from(4, address).await;
        assert!(closed_by_the_server(&mut over).await, "the third is closed");
        assert!(connections.try_recv().is_err(), "and not handed out");
        drop(held.pop());
        let mut after = connect_from(4, address).await;
        let mut served = connections.recv().await.unwrap();
        assert!(
            carries(&mut after, &mut served, b'x').await,
            "one place freed, one more served"
        );
    }

    #[tokio::test]
    async fn one_peer_cannot_take_every_place() {
        let (address, mut connections) =
            serve(ConnectionCaps::new(10, 1), Duration::from_secs(60)).await;
        let _first = connect_from(2, address).await;
        let _held = connections.recv().await.unwrap();
        let mut second = connect_from(2, address).await;
        assert!(closed_by_the_server(&mut second).await);
        let mut other = connect_from(3, address).await;
        let mut served = connections.recv().await.unwrap();
        assert!(carries(&mut other, &mut served, b'y').await);
    }

    #[tokio::test]
    async fn a_connection_without_its_whole_preface_in_time_is_closed() {
        let within = Duration::from_secs(1);
        let (address, mut connections) = serve(ConnectionCaps::new(8, 8), within).await;
        let preface_timed_out = |connection: CappedConnection| async move {
            let mut connection = connection;
            let mut buffer = [0u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), connection.read(&mut buffer))
                    .await
                    .expect("the deadline ends the reads")
                {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(error) => return error.kind() == io::ErrorKind::TimedOut,
                }
            }
        };
        let _silent = connect_from(2, address).await;
        assert!(preface_timed_out(connections.recv().await.unwrap()).await);
        let mut one_byte = connect_from(3, address).await;
        one_byte.write_all(b"P").await.unwrap();
        assert!(
            preface_timed_out(connections.recv().await.unwrap()).await,
            "one byte of the preface is not the preface"
        );

        let mut speaking_client = connect_from(4, address).await;
        let mut speaking = connections.recv().await.unwrap();
        speaking_client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut preface = [0u8; PREFACE_BYTES];
        speaking.read_exact(&mut preface).await.unwrap();
        // Quiet for longer than the deadline after its preface: kept.
        tokio::time::sleep(within * 2).await;
        assert!(carries(&mut speaking_client, &mut speaking, b'b').await);
    }
}
