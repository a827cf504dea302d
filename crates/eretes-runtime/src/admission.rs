//! Which connections a node's servers take: at most so many at once, and at
//! most so many from one peer, so that neither many clients nor one can
//! run a node out of descriptors or shut the others out.
//!
//! Used by the agent's HTTP API and by the graph layer's data server. A
//! peer is an IP address; an IPv4-mapped IPv6 address counts as its IPv4
//! address. (Not an IPv6 /64: in a cloud subnet or a pod network many
//! machines share one, and the graph server's peers are cluster nodes. A
//! host that holds many IPv6 addresses can open a cap's worth from each.)
//!
//! ```
//! use eretes_runtime::admission::{ConnectionCaps, Refused};
//!
//! let caps = ConnectionCaps::new(3, 2);
//! let peer = "192.0.2.7".parse().unwrap();
//! let first = caps.admit(peer).unwrap();
//! let _second = caps.admit(peer).unwrap();
//! assert!(matches!(caps.admit(peer), Err(Refused::Peer { .. })));
//! drop(first);
//! assert!(caps.admit(peer).is_ok(), "a place freed is a place to take");
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps of one server.
pub struct ConnectionCaps {
    places: Arc<Semaphore>,
    peers: Arc<Mutex<Peers>>,
    max_per_peer: usize,
    /// Whether the last connection offered was refused by the total cap:
    /// a refusal is worth a log line once per burst, not once per
    /// connection.
    refusing: Mutex<bool>,
}

/// Connections held, by peer (a peer holding none has no entry).
type Peers = HashMap<IpAddr, PeerEntry>;

/// One peer's connections.
#[derive(Default)]
struct PeerEntry {
    held: usize,
    /// Whether its last connection offered was refused by its cap.
    refusing: bool,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The server holds as many connections as it may.
    Total {
        /// True for the first refusal since a connection was last taken.
        first_of_burst: bool,
    },
    /// This peer holds as many as one may.
    Peer {
        /// True for the first refusal since a connection was last taken.
        first_of_burst: bool,
    },
}

/// A taken connection's places, given back when dropped.
pub struct Admitted {
    _place: OwnedSemaphorePermit,
    _peer: PeerPlace,
}

/// One connection's place in its peer's count.
struct PeerPlace {
    peers: Arc<Mutex<Peers>>,
    peer: IpAddr,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = peers.get_mut(&self.peer) {
            entry.held -= 1;
            if entry.held == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl ConnectionCaps {
    /// At most `max_total` connections at once, `max_per_peer` of them
    /// from one peer (each at least 1).
    pub fn new(max_total: usize, max_per_peer: usize) -> ConnectionCaps {
        ConnectionCaps {
            places: Arc::new(Semaphore::new(max_total.max(1))),
            peers: Arc::default(),
            max_per_peer: max_per_peer.max(1),
            refusing: Mutex::new(false),
        }
    }

    /// Take a connection from `peer`, or say which cap refuses it.
    pub fn admit(&self, peer: IpAddr) -> Result<Admitted, Refused> {
        let peer = peer.to_canonical();
        let peer_place = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let entry = peers.entry(peer).or_default();
            if entry.held >= self.max_per_peer {
                let first_of_burst = !std::mem::replace(&mut entry.refusing, true);
                return Err(Refused::Peer { first_of_burst });
            }
            entry.held += 1;
            entry.refusing = false;
            PeerPlace {
                peers: self.peers.clone(),
                peer,
            }
        };
        let mut refusing = self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            drop(peer_place);
            let first_of_burst = !std::mem::replace(&mut *refusing, true);
            return Err(Refused::Total { first_of_burst });
        };
        *refusing = false;
        Ok(Admitted {
            _place: place,
            _peer: peer_place,
        })
    }

    /// Connections held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|entry| entry.held)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_cap_refuses_in_its_turn_and_logs_once_per_burst() {
        let caps = ConnectionCaps::new(3, 2);
        let a1 = caps.admit(ip("10.0.0.1")).unwrap();
        let _a2 = caps.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            caps.admit(ip("10.0.0.1")).err(),
            Some(Refused::Peer {
                first_of_burst: true
            })
        );
        assert_eq!(
            caps.admit(ip("10.0.0.1")).err(),
            Some(Refused::Peer {
                first_of_burst: false
            })
        );
        let _b1 = caps.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            caps.admit(ip("10.0.0.3")).err(),
            Some(Refused::Total {
                first_of_burst: true
            })
        );
        assert_eq!(
            caps.admit(ip("10.0.0.3")).err(),
            Some(Refused::Total {
                first_of_burst: false
            })
        );
        assert_eq!(caps.held(), 3, "a refusal holds nothing");
        drop(a1);
        let _c1 = caps.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(caps.held(), 3);
        assert_eq!(
            caps.admit(ip("10.0.0.1")).err(),
            Some(Refused::Total {
                first_of_burst: true
            }),
            "a new burst after a taken connection"
        );
    }

    #[test]
    fn each_peer_is_logged_once_per_burst_of_its_own() {
        let caps = ConnectionCaps::new(10, 1);
        let _a = caps.admit(ip("10.0.0.1")).unwrap();
        let _b = caps.admit(ip("10.0.0.2")).unwrap();
        let first = Some(Refused::Peer {
            first_of_burst: true,
        });
        let again = Some(Refused::Peer {
            first_of_burst: false,
        });
        assert_eq!(caps.admit(ip("10.0.0.1")).err(), first);
        assert_eq!(caps.admit(ip("10.0.0.2")).err(), first, "another peer");
        assert_eq!(caps.admit(ip("10.0.0.1")).err(), again);
        let _c = caps.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(
            caps.admit(ip("10.0.0.1")).err(),
            again,
            "another peer's connection ends no burst of this one"
        );
    }

    #[test]
    fn a_peer_is_an_address_and_a_mapped_one_is_its_ipv4() {
        let caps = ConnectionCaps::new(10, 1);
        let _v4 = caps.admit(ip("192.0.2.7")).unwrap();
        assert!(caps.admit(ip("::ffff:192.0.2.7")).is_err(), "the same peer");
        let _v6 = caps.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(caps.admit(ip("2001:db8:1:2::1")).is_err());
        let other = caps.admit(ip("2001:db8:1:2::2"));
        assert!(
            other.is_ok(),
            "another address of the same /64 is another peer"
        );
        assert_eq!(caps.held(), 3);
    }
}
