//! Which connections a node's servers take: at most so many at once, and at
//! most so many from one peer, so that neither many clients nor one can
//! run a node out of descriptors or shut the others out.
//!
//! Used by the agent's HTTP API and by the graph layer's data server. A
//! peer is an IPv4 address, or an IPv6 /64 (one host usually holds a whole
//! /64, so counting single IPv6 addresses would not bound it); an
//! IPv4-mapped IPv6 address counts as its IPv4 address.
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
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps of one server.
pub struct ConnectionCaps {
    places: Arc<Semaphore>,
    peers: Arc<Mutex<Peers>>,
    max_per_peer: usize,
    /// Whether the last connection offered was refused, per cap: a
    /// refusal is worth a log line once per burst, not once per connection.
    refusing: Mutex<(bool, bool)>,
}

/// Connections held, by peer.
type Peers = HashMap<IpAddr, usize>;

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
        if let Some(count) = peers.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
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
            refusing: Mutex::new((false, false)),
        }
    }

    /// Take a connection from `peer`, or say which cap refuses it.
    pub fn admit(&self, peer: IpAddr) -> Result<Admitted, Refused> {
        let peer = peer_of(peer);
        let peer_place = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let count = peers.entry(peer).or_insert(0);
            if *count >= self.max_per_peer {
                None
            } else {
                *count += 1;
                Some(PeerPlace {
                    peers: self.peers.clone(),
                    peer,
                })
            }
        };
        let mut refusing = self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(peer_place) = peer_place else {
            let first_of_burst = !std::mem::replace(&mut refusing.1, true);
            return Err(Refused::Peer { first_of_burst });
        };
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            // `peer_place` is given back as it drops.
            let first_of_burst = !std::mem::replace(&mut refusing.0, true);
            return Err(Refused::Total { first_of_burst });
        };
        *refusing = (false, false);
        Ok(Admitted {
            _place: place,
            _peer: peer_place,
        })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// The peer an address counts as.
fn peer_of(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
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
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        assert_eq!(peer_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            peer_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        let caps = ConnectionCaps::new(10, 1);
        let _held = caps.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(caps.admit(ip("2001:db8:1:2::2")).is_err(), "same /64");
        assert!(caps.admit(ip("2001:db8:1:3::1")).is_ok(), "another /64");
    }
}
