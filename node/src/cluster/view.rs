//! A node's view of the cluster: who is a member, who is up, and where rooms and users live.
//!
//! The membership service publishes a new [`View`] on every change; everything that places
//! rooms or users reads the current one. Placement is the ring over the members that are up.

use chat_protocol::{NodeName, RoomId, UserName};
use serde::Serialize;

use crate::cluster::ring::Ring;

/// How this node sees a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Reachable: heartbeats answered and the node-to-node session is ready.
    Up,
    /// Known but not reachable (silent, partitioned, dead).
    Down,
}

/// One member as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The member's name.
    pub name: NodeName,
    /// Its node-to-node address (`host:port`), when known.
    pub addr: String,
    /// Up or down.
    pub status: Status,
    /// The URL browsers use to reach it, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// The node-to-node session to it (0 when down, and for this node). A new number means a
    /// new session: what was in flight on the previous one may be lost, so whoever waits on
    /// that member (a subscription, an invitation, a reply) starts again.
    #[serde(skip)]
    pub session: u64,
}

/// A snapshot of the membership, with the placement ring over the members that are up.
#[derive(Debug, Clone)]
pub struct View {
    /// This node.
    pub me: NodeName,
    /// Every known member, this node included, sorted by name.
    pub members: Vec<Member>,
    /// Whether this node may accept writes: it sees a majority of the known members (and the
    /// cluster has bootstrapped).
    pub quorum: bool,
    /// Grows with every change of the view.
    pub version: u64,
    ring: Ring,
}

impl View {
    /// Builds a view; the ring spans the members with status `Up`.
    pub fn new(me: NodeName, members: Vec<Member>, quorum: bool, version: u64) -> View {
        let mut members = members;
        members.sort_by(|a, b| a.name.cmp(&b.name));
        members.dedup_by(|a, b| a.name == b.name);
        let ring = Ring::new(
            members
                .iter()
                .filter(|m| m.status == Status::Up)
                .map(|m| &m.name),
        );
        View {
            me,
            members,
            quorum,
            version,
            ring,
        }
    }

    /// The view of a node running alone (single-node mode).
    pub fn single(me: NodeName, addr: String, public_url: Option<String>) -> View {
        let member = Member {
            name: me.clone(),
            addr,
            status: Status::Up,
            public_url,
            session: 0,
        };
        View::new(me, vec![member], true, 1)
    }

    /// The members that are up, this node included, sorted by name.
    pub fn up(&self) -> impl Iterator<Item = &NodeName> {
        self.ring.members().iter()
    }

    /// How many members are up.
    pub fn up_count(&self) -> usize {
        self.ring.members().len()
    }

    /// The session to `node` in this view (0 when down, and for this node).
    pub fn session(&self, node: &NodeName) -> u64 {
        self.members
            .binary_search_by(|m| m.name.cmp(node))
            .map_or(0, |i| self.members[i].session)
    }

    /// Whether `node` is up in `self` and was not up, or was up over another session, in
    /// `previous`: it may have missed what was sent to it.
    pub fn returned(&self, previous: &View, node: &NodeName) -> bool {
        self.is_up(node) && (!previous.is_up(node) || previous.session(node) != self.session(node))
    }

    /// Whether `node` is up in this view.
    pub fn is_up(&self, node: &NodeName) -> bool {
        self.ring.members().binary_search(node).is_ok()
    }

    /// The owner of `room`: the first node on the ring from the room's hash.
    pub fn owner(&self, room: &RoomId) -> Option<&NodeName> {
        self.ring.owner(&room_key(room))
    }

    /// The owner of `room` followed by its replicas: `replication_factor` nodes at most.
    pub fn placement(&self, room: &RoomId, replication_factor: usize) -> Vec<NodeName> {
        self.ring
            .preference(&room_key(room), replication_factor.max(1))
    }

    /// Where `room`'s log lives: its owner, then its replicas. The placement holds
    /// `replication_factor` nodes, but never fewer than a majority of the known members (so
    /// that any majority that claims the room hears from a node that stored every acknowledged
    /// message; see `rooms::log`), and never more than the members that are up.
    pub fn room_placement(&self, room: &RoomId, replication_factor: usize) -> Vec<NodeName> {
        let majority = self.members.len() / 2 + 1;
        self.placement(room, replication_factor.max(majority))
    }

    /// The node that keeps track of where `user` is connected.
    pub fn home(&self, user: &UserName) -> Option<&NodeName> {
        self.ring.owner(&user_key(user))
    }
}

/// The ring key of a room (rooms and users share the ring in separate namespaces).
fn room_key(room: &RoomId) -> String {
    format!("room:{room}")
}

/// The ring key of a user.
fn user_key(user: &UserName) -> String {
    format!("user:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, status: Status) -> Member {
        Member {
            name: NodeName::new(name).unwrap(),
            addr: format!("{name}:7000"),
            status,
            public_url: None,
            session: 1,
        }
    }

    #[test]
    fn placement_spans_only_members_that_are_up() {
        let me = NodeName::new("n1").unwrap();
        let view = View::new(
            me,
            vec![
                member("n3", Status::Down),
                member("n1", Status::Up),
                member("n2", Status::Up),
            ],
            true,
            7,
        );
        assert_eq!(view.up_count(), 2);
        assert!(!view.is_up(&NodeName::new("n3").unwrap()));
        for i in 0..200 {
            let room = RoomId::new(&format!("r{i}")).unwrap();
            let placement = view.placement(&room, 3);
            assert_eq!(placement.len(), 2);
            assert_eq!(Some(&placement[0]), view.owner(&room));
            assert!(placement.iter().all(|n| n.as_str() != "n3"));
        }
        assert_eq!(view.members[0].name.as_str(), "n1", "sorted by name");
    }

    #[test]
    fn room_placements_hold_at_least_a_majority_of_the_known_members() {
        let me = NodeName::new("n1").unwrap();
        let names = ["n1", "n2", "n3", "n4", "n5"];
        let sized = |known: usize, up: usize, rf: usize| {
            let members = names[..known]
                .iter()
                .enumerate()
                .map(|(i, n)| member(n, if i < up { Status::Up } else { Status::Down }))
                .collect();
            let view = View::new(me.clone(), members, true, 1);
            view.room_placement(&RoomId::new("lobby").unwrap(), rf)
                .len()
        };
        assert_eq!(sized(3, 3, 2), 2);
        assert_eq!(sized(4, 4, 2), 3);
        assert_eq!(sized(5, 5, 2), 3);
        assert_eq!(sized(5, 5, 4), 4);
        assert_eq!(
            sized(5, 3, 2),
            3,
            "a down member still counts towards the majority"
        );
        assert_eq!(sized(5, 2, 2), 2, "never more than the members up");
        assert_eq!(sized(1, 1, 2), 1);
    }

    #[test]
    fn a_single_node_owns_everything() {
        let me = NodeName::new("solo").unwrap();
        let view = View::single(me.clone(), "127.0.0.1:1".into(), None);
        let room = RoomId::new("lobby").unwrap();
        assert_eq!(view.owner(&room), Some(&me));
        assert_eq!(view.placement(&room, 2), vec![me.clone()]);
        assert_eq!(view.home(&UserName::new("alice").unwrap()), Some(&me));
    }
}
