//! Who is in a room: connections per user and per node, and the presence changes they cause.
//!
//! Pure bookkeeping for the room's owner. A user is present while at least one of their
//! connections, on any node, is joined; presence events fire on the first join and the last
//! leave. The nodes with at least one connection are the room's subscribers: each gets one
//! copy of every message.

use std::collections::{BTreeMap, HashMap, HashSet};

use chat_protocol::peer::SessionId;
use chat_protocol::{NodeName, PresenceEvent, UserName};

/// The connections joined to one room.
#[derive(Debug, Default)]
pub struct Members {
    by_user: BTreeMap<UserName, HashSet<(NodeName, SessionId)>>,
    /// Ordered by node, so that what is sent to each node goes out in a deterministic order.
    by_node: BTreeMap<NodeName, HashMap<SessionId, UserName>>,
}

impl Members {
    /// Adds a connection; returns `Join` when it is the user's first in the room.
    pub fn join(
        &mut self,
        node: &NodeName,
        session: SessionId,
        user: &UserName,
    ) -> Option<PresenceEvent> {
        let sessions = self.by_node.entry(node.clone()).or_default();
        if let Some(previous) = sessions.insert(session, user.clone())
            && &previous != user
        {
            // A session id reused for another user (cannot happen with unique ids): keep the
            // books consistent anyway.
            self.remove_from_user(&previous, node, session);
        }
        let connections = self.by_user.entry(user.clone()).or_default();
        let first = connections.is_empty();
        connections.insert((node.clone(), session));
        first.then_some(PresenceEvent::Join)
    }

    /// Removes a connection; returns the user when it was their last in the room.
    pub fn leave(&mut self, node: &NodeName, session: SessionId) -> Option<UserName> {
        let sessions = self.by_node.get_mut(node)?;
        let user = sessions.remove(&session)?;
        if sessions.is_empty() {
            self.by_node.remove(node);
        }
        self.remove_from_user(&user, node, session).then_some(user)
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
            .by_node
            .get(node)
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
                .by_node
                .get(node)
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

    /// The nodes with at least one connection in the room.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeName> {
        self.by_node.keys()
    }

    /// The users present, sorted, each once.
    pub fn users(&self) -> Vec<UserName> {
        self.by_user.keys().cloned().collect()
    }

    /// Whether nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    fn remove_from_user(&mut self, user: &UserName, node: &NodeName, session: SessionId) -> bool {
        let Some(connections) = self.by_user.get_mut(user) else {
            return false;
        };
        connections.remove(&(node.clone(), session));
        if connections.is_empty() {
            self.by_user.remove(user);
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
        let nodes: Vec<_> = m.nodes().cloned().collect();
        assert_eq!(nodes, vec![n("b")]);
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
