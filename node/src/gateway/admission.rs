//! Caps on the connections one user and one remote address hold at once
//! (`max-connections-per-user`, `max-connections-per-address`).
//!
//! The upgrade asks for a [`Ticket`]; the connection holds it until it closes, and dropping it
//! gives the place back. A refused upgrade gets HTTP 429 before anything is allocated for it, so
//! neither one user with many sockets nor one host with many users can take a node's
//! connections for itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use chat_protocol::UserName;

/// Which cap an upgrade hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user holds `max-connections-per-user` connections already.
    User,
    /// The address holds `max-connections-per-address` connections already.
    Address,
}

/// Counts connections per user and per address against their caps.
#[derive(Debug)]
pub struct Admission {
    per_user: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    users: HashMap<UserName, usize>,
    addresses: HashMap<IpAddr, usize>,
}

/// A connection's place; dropping it gives the place back.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    user: UserName,
    address: IpAddr,
}

impl Admission {
    /// Caps of `per_user` connections per user and `per_address` per address.
    pub fn new(per_user: usize, per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            per_user,
            per_address,
            counts: Mutex::default(),
        })
    }

    /// A place for a connection of `user` from `address`, if both are under their caps.
    pub fn admit(self: &Arc<Self>, user: &UserName, address: IpAddr) -> Result<Ticket, Refusal> {
        let address = address.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.addresses.get(&address).copied().unwrap_or(0) >= self.per_address {
            return Err(Refusal::Address);
        }
        if counts.users.get(user).copied().unwrap_or(0) >= self.per_user {
            return Err(Refusal::User);
        }
        *counts.addresses.entry(address).or_default() += 1;
        *counts.users.entry(user.clone()).or_default() += 1;
        Ok(Ticket {
            admission: self.clone(),
            user: user.clone(),
            address,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        release(&mut counts.users, &self.user);
        release(&mut counts.addresses, &self.address);
    }
}

fn release<K: Eq + Hash>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserName {
        UserName::new(name).unwrap()
    }

    #[test]
    fn caps_users_and_addresses_and_gives_places_back() {
        let admission = Admission::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(&user("alice"), a).unwrap();
        let _second = admission.admit(&user("alice"), b).unwrap();
        assert_eq!(
            admission.admit(&user("alice"), b).unwrap_err(),
            Refusal::User
        );
        let _bob = admission.admit(&user("bob"), a).unwrap();
        let _carol = admission.admit(&user("carol"), a).unwrap();
        assert_eq!(
            admission.admit(&user("dave"), a).unwrap_err(),
            Refusal::Address
        );
        // An IPv4-mapped IPv6 address is the same host.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            admission.admit(&user("dave"), mapped).unwrap_err(),
            Refusal::Address
        );
        drop(first);
        let _alice = admission.admit(&user("alice"), a).unwrap();
        let counts = admission.counts.lock().unwrap();
        assert_eq!(counts.users[&user("alice")], 2);
        assert_eq!(counts.addresses[&a], 3);
        assert_eq!(counts.addresses.len(), 2, "no entry for the mapped form");
    }

    #[test]
    fn counts_vanish_when_the_last_ticket_goes() {
        let admission = Admission::new(5, 5);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let tickets: Vec<Ticket> = (0..5)
            .map(|i| admission.admit(&user(&format!("u{i}")), ip).unwrap())
            .collect();
        drop(tickets);
        let counts = admission.counts.lock().unwrap();
        assert!(counts.users.is_empty() && counts.addresses.is_empty());
    }
}
