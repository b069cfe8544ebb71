//! Who is in a room: connections per user and per node, and the presence changes they cause.
//!
//! Pure bookkeeping for the room's owner. A user is present while at least one of their
//! connections, on any node, is joined; presence events fire on the first join and the last
//! leave. The nodes with at least one connection are the room's subscribers: each gets one
//! copy of every message.

use std::collections::HashMap;

use chat_protocol::peer::SessionId;
use chat_protocol::{NodeName, PresenceEvent, UserName};

/// The connections joined to one room.
///
/// Kept compact because every room holds one, and most rooms have few members: a room with one
/// member costs about 300 bytes here (ordered maps cost 1.7 KB, their first node alone holding
/// room for eleven entries).
#[derive(Debug, Default)]
pub struct Members {
    /// Each present user's number of joined connections (never 0).
    by_user: HashMap<UserName, u32>,
    /// Sorted by node, so that what is sent to each node goes out in a deterministic order;
    /// never an empty map.
    by_node: Vec<(NodeName, HashMap<SessionId, UserName>)>,
}

impl Members {
    /// Adds a connection; returns `Join` when it is the user's first in the room.
    pub fn join(
        &mut self,
        node: &NodeName,
        session: SessionId,
        user: &UserName,
    ) -> Option<PresenceEvent> {
        let at = match self.by_node.binary_search_by(|(n, _)| n.cmp(node)) {
            Ok(at) => at,
            Err(at) => {
                self.by_node.reserve_exact(1);
                self.by_node.insert(at, (node.clone(), HashMap::new()));
                at
            }
        };
        match self.by_node[at].1.insert(session, user.clone()) {
            Some(previous) if &previous == user => return None,
            // A session id reused for another user (cannot happen with unique ids): keep the
            // books consistent anyway.
            Some(previous) => {
                self.remove_from_user(&previous);
            }
            None => {}
        }
        let connections = self.by_user.entry(user.clone()).or_insert(0);
        *connections += 1;
        (*connections == 1).then_some(PresenceEvent::Join)
    }

    /// Removes a connection; returns the user when it was their last in the room.
    pub fn leave(&mut self, node: &NodeName, session: SessionId) -> Option<UserName> {
        let at = self.by_node.binary_search_by(|(n, _)| n.cmp(node)).ok()?;
        let sessions = &mut self.by_node[at].1;
        let user = sessions.remove(&session)?;
        if sessions.is_empty() {
            self.by_node.remove(at);
            if self.by_node.is_empty() {
                self.by_node = Vec::new();
            }
        }
        self.remove_from_user(&user).then_some(user)
    }

    /// The connections of `node` in the room.
    fn sessions(&self, node: &NodeName) -> Option<&HashMap<SessionId, UserName>> {
        let at = self.by_node.binary_search_by(|(n, _)| n.cmp(node)).ok()?;
        Some(&self.by_node[at].1)
    }

    /// Replaces every connection of `node` with `sessions` (after a move or a resync); returns
    /// the presence changes this caused.
    pub fn replace_node(
        &mut self,
        node: &NodeName,
        sessions: &[(SessionId, UserName)],
    ) -> Vec<(UserName, PresenceEvent)> {
        let mut changes = Vec::new();
        let wanted: HashMap<SessionId, &UserName> = sessions.iter().map(|(s, u)| (*s, u)).collect();
        let current: Vec<SessionId> = self
            .sessions(node)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for session in current {
            if !wanted.contains_key(&session)
                && let Some(user) = self.leave(node, session)
            {
                changes.push((user, PresenceEvent::Leave));
            }
        }
        for (session, user) in sessions {
            let known = self
                .sessions(node)
                .is_some_and(|m| m.get(session) == Some(user));
            if !known && self.join(node, *session, user).is_some() {
                changes.push((user.clone(), PresenceEvent::Join));
            }
        }
        changes
    }

    /// Removes every connection of `node` (it went down); returns the users who left entirely.
    pub fn drop_node(&mut self, node: &NodeName) -> Vec<UserName> {
        self.replace_node(node, &[])
            .into_iter()
            .map(|(user, _)| user)
            .collect()
    }

    /// The nodes with at least one connection in the room, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeName> {
        self.by_node.iter().map(|(node, _)| node)
    }

    /// The users present, sorted, each once.
    pub fn users(&self) -> Vec<UserName> {
        let mut users: Vec<UserName> = self.by_user.keys().cloned().collect();
        users.sort_unstable();
        users
    }

    /// Whether nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    /// Counts one connection of `user` less; returns whether it was their last.
    fn remove_from_user(&mut self, user: &UserName) -> bool {
        let Some(connections) = self.by_user.get_mut(user) else {
            return false;
        };
        *connections -= 1;
        if *connections == 0 {
            self.by_user.remove(user);
            if self.by_user.is_empty() {
                self.by_user = HashMap::new();
            }
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn u(name: &str) -> UserName {
        UserName::new(name).unwrap()
    }

    fn nodes(m: &Members) -> Vec<NodeName> {
        m.nodes().cloned().collect()
    }

    #[test]
    fn presence_fires_on_first_join_and_last_leave_across_nodes() {
        let mut m = Members::default();
        assert_eq!(m.join(&n("a"), 1, &u("alice")), Some(PresenceEvent::Join));
        assert_eq!(m.join(&n("b"), 7, &u("alice")), None, "second connection");
        assert_eq!(m.join(&n("a"), 1, &u("alice")), None, "joining twice");
        assert_eq!(m.join(&n("b"), 8, &u("bob")), Some(PresenceEvent::Join));
        assert_eq!(m.users(), vec![u("alice"), u("bob")]);
        assert_eq!(m.leave(&n("a"), 1), None, "alice still on b");
        assert_eq!(m.leave(&n("a"), 1), None, "leaving twice");
        assert_eq!(m.leave(&n("b"), 7), Some(u("alice")));
        assert_eq!(m.users(), vec![u("bob")]);
        assert_eq!(nodes(&m), vec![n("b")]);
    }

    #[test]
    fn users_and_nodes_come_out_sorted_whatever_the_join_order() {
        let mut m = Members::default();
        m.join(&n("c"), 1, &u("carol"));
        m.join(&n("a"), 2, &u("bob"));
        m.join(&n("b"), 3, &u("alice"));
        m.join(&n("a"), 4, &u("alice"));
        assert_eq!(m.users(), vec![u("alice"), u("bob"), u("carol")]);
        assert_eq!(nodes(&m), vec![n("a"), n("b"), n("c")]);
        assert_eq!(m.leave(&n("b"), 3), None, "alice still on a");
        assert_eq!(nodes(&m), vec![n("a"), n("c")]);
    }

    #[test]
    fn a_session_id_reused_for_another_user_counts_for_the_new_user_only() {
        let mut m = Members::default();
        m.join(&n("a"), 1, &u("alice"));
        assert_eq!(m.join(&n("a"), 1, &u("bob")), Some(PresenceEvent::Join));
        assert_eq!(m.users(), vec![u("bob")]);
        assert_eq!(m.leave(&n("a"), 1), Some(u("bob")));
        assert!(m.is_empty());
        assert_eq!(nodes(&m), Vec::<NodeName>::new());
    }

    #[test]
    fn a_dead_node_takes_its_users_with_it() {
        let mut m = Members::default();
        m.join(&n("a"), 1, &u("alice"));
        m.join(&n("b"), 2, &u("alice"));
        m.join(&n("b"), 3, &u("bob"));
        assert_eq!(m.drop_node(&n("b")), vec![u("bob")]);
        assert_eq!(m.users(), vec![u("alice")]);
        assert_eq!(m.drop_node(&n("b")), Vec::<UserName>::new());
    }

    #[test]
    fn replacing_a_node_reports_the_difference() {
        let mut m = Members::default();
        m.join(&n("a"), 1, &u("alice"));
        m.join(&n("a"), 2, &u("bob"));
        let changes = m.replace_node(&n("a"), &[(2, u("bob")), (3, u("carol"))]);
        assert_eq!(
            changes,
            vec![
                (u("alice"), PresenceEvent::Leave),
                (u("carol"), PresenceEvent::Join)
            ]
        );
        assert!(
            m.replace_node(&n("a"), &[(2, u("bob")), (3, u("carol"))])
                .is_empty()
        );
        assert!(!m.is_empty());
    }
}
