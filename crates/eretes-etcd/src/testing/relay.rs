//! A TCP relay on loopback that a test (or `eretes chaos`) can cut: the
//! network link between one client and one etcd member, made breakable.
//!
//! While cut, every relayed connection is closed and new ones are closed as
//! soon as they are accepted, as when a link fails; restored, connections
//! are relayed again. The client sees exactly what a partition shows it:
//! resets and refused streams, never a clean shutdown by etcd.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// One relay from a loopback port of its own to `target`.
pub struct Relay {
    address: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    /// Listen on a free loopback port and relay every connection to
    /// `target`. Must be called inside a tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (up, connections) = (up.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        // Out of file descriptors, say: pause instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // Checked and registered under the lock `cut` takes, so
                    // no connection slips through a cut.
                    let mut open = connections.lock().unwrap_or_else(|e| e.into_inner());
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    // Finished relays leave their handles behind; drop
                    // those so a long run's list stays as long as what is open.
                    open.retain(|handle| !handle.is_finished());
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    open.push(relay.abort_handle());
                }
            })
            .abort_handle()
        };
        Ok(Relay {
            address,
            up,
            connections,
            accept,
        })
    }

    /// The relay's own address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://` and the relay's address: what a client dials.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Close every relayed connection and refuse new ones.
    pub fn cut(&self) {
        let mut open = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        self.up.store(false, Ordering::SeqCst);
        for connection in open.drain(..) {
            connection.abort();
        }
    }

    /// Relay new connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Whether the relay is cut.
    pub fn is_cut(&self) -> bool {
        !self.up.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
