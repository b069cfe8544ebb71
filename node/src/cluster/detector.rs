//! Failure detection and the write lease, as a pure state machine over heartbeats and time.
//!
//! Every node pings every member each `interval` over UDP; a member is **alive** while its acks
//! keep coming, and declared **down** after `failure_timeout` without one. ractor_cluster has no
//! failure detection of its own (a frozen or cut-off peer's TCP session looks healthy for
//! minutes), so this is what the cluster's view is built on.
//!
//! The **lease**: an ack to a ping sent at `t` lets this node count that member as reachable
//! until `t + lease`. A node may accept writes only while it holds leases from a majority of the
//! known members (itself included). Because `lease + interval < failure_timeout`, a node cut off
//! from the majority stops accepting writes *before* the majority declares it down and moves its
//! rooms away: the two sides never write at the same time, even without synchronised clocks (only
//! clock *rates* must roughly agree). Acks carry the ping's nonce, so an ack that was delayed (or
//! replayed) cannot extend a lease: only pings this node sent recently count.
//!
//! **Known members** are every member ever seen minus those that left gracefully; the majority
//! is counted over them, so losing a member does not shrink the quorum (that would let two
//! halves of a partition both think they are the majority).
//!
//! **Bootstrap**: a node that has never been part of a cluster, and has seeds other than itself,
//! does not count as a quorum on its own until it has heard from another member, and not before
//! `bootstrap_expect` members are known: a cluster started as several nodes at once cannot begin
//! as several one-node clusters accepting writes separately.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use chat_protocol::NodeName;
use chat_protocol::peer::{Heartbeat, HeartbeatKind, MemberInfo};

use crate::store::Memory;

/// Pings remembered per member while waiting for their acks.
const OUTSTANDING_MAX: usize = 64;

/// Timing and bootstrap settings of the detector.
#[derive(Debug, Clone, Copy)]
pub struct DetectorConfig {
    /// Time between two pings to a member.
    pub interval: Duration,
    /// Silence after which a member is declared down.
    pub failure_timeout: Duration,
    /// Members that must be known before the first quorum.
    pub bootstrap_expect: usize,
}

impl DetectorConfig {
    /// How long an acked ping counts towards the quorum: the failure timeout minus two
    /// intervals (the other side's last ping may predate ours by one) and a safety margin.
    pub fn lease(&self) -> Duration {
        let margin = self.failure_timeout / 6;
        self.failure_timeout
            .saturating_sub(self.interval * 2)
            .saturating_sub(margin)
    }
}

/// What the detector knows of one member.
#[derive(Debug, Clone)]
struct Peer {
    info: MemberInfo,
    alive: bool,
    last_ack: Option<Instant>,
    lease_until: Option<Instant>,
    outstanding: VecDeque<(u64, Instant)>,
    left: bool,
    /// This node knew an earlier life of the member (told to it in acks: a member whose store
    /// is new learns from this that it lost its disk).
    earlier: bool,
}

impl Peer {
    fn new(info: MemberInfo, earlier: bool) -> Peer {
        Peer {
            info,
            alive: false,
            last_ack: None,
            lease_until: None,
            outstanding: VecDeque::new(),
            left: false,
            earlier,
        }
    }
}

/// What a heartbeat changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The answer to send back to the datagram's source, if any.
    pub reply: Option<Heartbeat>,
    /// The member set or a member's status changed.
    pub changed: bool,
    /// A member restarted (new incarnation): its old sessions are gone.
    pub restarted: Option<NodeName>,
    /// The datagram was our own (a seed that is this node).
    pub own: bool,
}

/// The failure detector of one node.
#[derive(Debug)]
pub struct Detector {
    me: MemberInfo,
    config: DetectorConfig,
    peers: BTreeMap<NodeName, Peer>,
    known: BTreeSet<NodeName>,
    bootstrapped: bool,
    heard_other: bool,
    next_nonce: u64,
    /// The members known from this node's store when it started (a previous life of ours).
    remembered: BTreeSet<NodeName>,
    memory: Memory,
    /// Members that answered without knowing an earlier life of this node.
    strangers: BTreeSet<NodeName>,
}

impl Detector {
    /// A detector for `me`, with the members known from a previous life.
    pub fn new(
        me: MemberInfo,
        config: DetectorConfig,
        known: impl IntoIterator<Item = NodeName>,
        bootstrapped: bool,
    ) -> Detector {
        let mut known: BTreeSet<NodeName> = known.into_iter().collect();
        let mut remembered = known.clone();
        remembered.remove(&me.name);
        known.insert(me.name.clone());
        Detector {
            next_nonce: me.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            me,
            config,
            peers: BTreeMap::new(),
            known,
            bootstrapped,
            heard_other: false,
            remembered,
            memory: Memory::Intact,
            strangers: BTreeSet::new(),
        }
    }

    /// Starts from what this node's store remembers of its past: with a store created empty
    /// ([`Memory::Unknown`]) the detector finds out from the members' answers whether the node
    /// is new (nobody knew it) or lost its disk (somebody knew an earlier life of it).
    pub fn with_memory(mut self, memory: Memory) -> Detector {
        self.memory = memory;
        self.resolve_memory();
        self
    }

    /// What this node's store remembers of its past, as found out so far.
    pub fn memory(&self) -> Memory {
        self.memory
    }

    fn resolve_memory(&mut self) {
        // New when a majority of the other known members (and enough to bootstrap) answered
        // without knowing us, or when there is nobody to ask (a lone node); one that knew us
        // settles it the other way (in `observe`).
        let others = self.known.len() - 1;
        let alone = others == 0 && self.config.bootstrap_expect <= 1;
        if self.memory == Memory::Unknown
            && (alone
                || (self.strangers.len() * 2 > others
                    && self.strangers.len() + 1 >= self.config.bootstrap_expect))
        {
            self.memory = Memory::Intact;
        }
    }

    /// This node.
    pub fn me(&self) -> &MemberInfo {
        &self.me
    }

    /// The members counted for the quorum (this node included).
    pub fn known(&self) -> &BTreeSet<NodeName> {
        &self.known
    }

    /// Whether the cluster has bootstrapped (persisted by the caller).
    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// The heartbeat announcing this node's departure.
    pub fn leave(&self) -> Heartbeat {
        self.heartbeat(HeartbeatKind::Leave)
    }

    fn heartbeat(&self, kind: HeartbeatKind) -> Heartbeat {
        Heartbeat {
            from: self.me.clone(),
            kind,
            members: self
                .peers
                .values()
                .filter(|p| !p.left)
                .map(|p| p.info.clone())
                .collect(),
            departed: self
                .peers
                .values()
                .filter(|p| p.left)
                .map(|p| p.info.clone())
                .collect(),
        }
    }

    /// Pings for every member (not the seeds): their address and the datagram.
    pub fn pings(&mut self, now: Instant) -> Vec<(String, Heartbeat)> {
        let names: Vec<NodeName> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.left)
            .map(|(n, _)| n.clone())
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let nonce = self.nonce();
            let heartbeat = self.heartbeat(HeartbeatKind::Ping { nonce });
            if let Some(peer) = self.peers.get_mut(&name) {
                peer.outstanding.push_back((nonce, now));
                if peer.outstanding.len() > OUTSTANDING_MAX {
                    peer.outstanding.pop_front();
                }
                out.push((peer.info.addr.clone(), heartbeat));
            }
        }
        out
    }

    /// A ping for a seed address that is not a known member yet (its answer introduces it).
    pub fn seed_ping(&mut self) -> Heartbeat {
        let nonce = self.nonce();
        self.heartbeat(HeartbeatKind::Ping { nonce })
    }

    fn nonce(&mut self) -> u64 {
        // A xorshift sequence seeded per incarnation: unpredictable enough to tell our own pings
        // apart, not a secret (datagrams are authenticated by the cookie, not by nonces).
        let mut x = self.next_nonce;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.next_nonce = x;
        x
    }

    /// Takes in an authenticated heartbeat received at `now`.
    pub fn observe(&mut self, heartbeat: Heartbeat, now: Instant) -> Observed {
        let mut observed = Observed::default();
        let from = heartbeat.from;
        if from.name == self.me.name {
            observed.own = true;
            return observed;
        }
        self.heard_other = true;
        for member in heartbeat.departed {
            observed.changed |= self.departed(member);
        }
        for member in heartbeat.members {
            if member.name != self.me.name && !self.peers.contains_key(&member.name) {
                self.known.insert(member.name.clone());
                let earlier = self.remembered.contains(&member.name);
                self.peers
                    .insert(member.name.clone(), Peer::new(member, earlier));
                observed.changed = true;
            }
        }
        let remembered = self.remembered.contains(&from.name);
        let peer = self
            .peers
            .entry(from.name.clone())
            .or_insert_with(|| Peer::new(from.clone(), remembered));
        if from.incarnation < peer.info.incarnation {
            // A datagram from the member's previous life, delayed.
            return observed;
        }
        if from.incarnation > peer.info.incarnation {
            if peer.alive || peer.left {
                observed.restarted = Some(from.name.clone());
            }
            *peer = Peer::new(from.clone(), true);
            observed.changed = true;
        } else if peer.left {
            // A datagram it sent before it left, delayed past its leave: it must not bring it
            // back (a member that comes back does so with a new incarnation).
            return observed;
        } else if peer.info != from {
            peer.info = from.clone();
            observed.changed = true;
        }
        if !self.known.contains(&from.name) && !matches!(heartbeat.kind, HeartbeatKind::Leave) {
            self.known.insert(from.name.clone());
            observed.changed = true;
        }
        match heartbeat.kind {
            HeartbeatKind::Ping { nonce } => {
                observed.reply = Some(Heartbeat {
                    from: self.me.clone(),
                    kind: HeartbeatKind::Ack {
                        nonce,
                        knew_you: peer.earlier,
                    },
                    members: Vec::new(),
                    departed: Vec::new(),
                });
            }
            HeartbeatKind::Ack { nonce, knew_you } => {
                if self.memory == Memory::Unknown {
                    if knew_you {
                        self.memory = Memory::Lost;
                    } else {
                        self.strangers.insert(from.name.clone());
                    }
                    observed.changed = true;
                }
                if let Some(i) = peer.outstanding.iter().position(|(n, _)| *n == nonce) {
                    let sent = peer.outstanding[i].1;
                    peer.outstanding.drain(..=i);
                    peer.last_ack = Some(now);
                    let until = sent + self.config.lease();
                    if peer.lease_until.is_none_or(|t| until > t) {
                        peer.lease_until = Some(until);
                    }
                    if !peer.alive {
                        peer.alive = true;
                        observed.changed = true;
                    }
                }
            }
            HeartbeatKind::Leave => {
                peer.left = true;
                peer.lease_until = None;
                peer.outstanding.clear();
                if peer.alive {
                    peer.alive = false;
                }
                self.known.remove(&from.name);
                observed.changed = true;
            }
        }
        if !self.bootstrapped
            && self.known.len() >= self.config.bootstrap_expect
            && self.alive_count() + 1 > self.known.len() / 2
        {
            self.bootstrapped = true;
            observed.changed = true;
        }
        self.resolve_memory();
        observed
    }

    /// Another member saw `member` leave gracefully: unless it came back since (a newer
    /// incarnation), it no longer counts; true if anything changed.
    fn departed(&mut self, member: MemberInfo) -> bool {
        if member.name == self.me.name {
            return false;
        }
        match self.peers.get_mut(&member.name) {
            Some(peer) if peer.left || peer.info.incarnation > member.incarnation => false,
            Some(peer) => {
                peer.left = true;
                peer.alive = false;
                peer.lease_until = None;
                peer.outstanding.clear();
                self.known.remove(&member.name);
                true
            }
            None => {
                // Known from a previous life only (or not at all): it left meanwhile.
                self.known.remove(&member.name);
                let earlier = self.remembered.contains(&member.name);
                let mut peer = Peer::new(member.clone(), earlier);
                peer.left = true;
                self.peers.insert(member.name, peer);
                true
            }
        }
    }

    /// Declares members down whose acks stopped; true if anything changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for peer in self.peers.values_mut() {
            if peer.alive
                && peer
                    .last_ack
                    .is_none_or(|t| now.duration_since(t) > self.config.failure_timeout)
            {
                peer.alive = false;
                changed = true;
            }
        }
        if !self.bootstrapped && self.can_bootstrap_alone() {
            self.bootstrapped = true;
            changed = true;
        }
        changed
    }

    fn can_bootstrap_alone(&self) -> bool {
        // A node with no other member to wait for (no seeds but itself) forms a cluster alone.
        self.peers.is_empty() && self.known.len() == 1 && self.config.bootstrap_expect <= 1
    }

    /// Marks that this node has seeds other than itself: it must hear from one before its first
    /// quorum (see the module doc).
    pub fn expect_peers(&mut self) {
        if !self.bootstrapped && self.config.bootstrap_expect < 2 {
            self.config.bootstrap_expect = 2;
        }
    }

    fn alive_count(&self) -> usize {
        self.peers.values().filter(|p| p.alive && !p.left).count()
    }

    /// Members (not this node) that are alive, with their addresses.
    pub fn alive(&self) -> impl Iterator<Item = &MemberInfo> {
        self.peers
            .values()
            .filter(|p| p.alive && !p.left)
            .map(|p| &p.info)
    }

    /// Every member this node knows of and has not seen leave (not this node).
    pub fn members(&self) -> impl Iterator<Item = (&MemberInfo, bool)> {
        self.peers
            .values()
            .filter(|p| !p.left)
            .map(|p| (&p.info, p.alive))
    }

    /// Whether this node may accept writes at `now`: it holds, for at least one more interval,
    /// leases from a majority of the known members, counting only members for which `linked`
    /// holds (a usable node-to-node session).
    pub fn quorum(&self, now: Instant, linked: impl Fn(&NodeName) -> bool) -> bool {
        if !self.bootstrapped {
            return false;
        }
        let horizon = now + self.config.interval;
        let holding = self
            .peers
            .iter()
            .filter(|(name, p)| {
                p.alive
                    && !p.left
                    && self.known.contains(*name)
                    && p.lease_until.is_some_and(|t| t > horizon)
                    && linked(name)
            })
            .count();
        holding + 1 > self.known.len() / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_millis(3000);

    fn node_name(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn info(name: &str, incarnation: u64) -> MemberInfo {
        MemberInfo {
            name: NodeName::new(name).unwrap(),
            incarnation,
            addr: format!("{name}:7000"),
            public_url: None,
        }
    }

    fn config() -> DetectorConfig {
        DetectorConfig {
            interval: INTERVAL,
            failure_timeout: TIMEOUT,
            bootstrap_expect: 1,
        }
    }

    fn ping_from(name: &str, incarnation: u64) -> Heartbeat {
        Heartbeat {
            from: info(name, incarnation),
            kind: HeartbeatKind::Ping { nonce: 1 },
            members: Vec::new(),
            departed: Vec::new(),
        }
    }

    /// Pings every member at `now` and lets each answer at `now + rtt`.
    fn round(d: &mut Detector, answering: &[(&str, u64)], now: Instant, rtt: Duration) {
        for (addr, hb) in d.pings(now) {
            let HeartbeatKind::Ping { nonce } = hb.kind else {
                panic!()
            };
            let name = addr.split(':').next().unwrap();
            if let Some((_, inc)) = answering.iter().find(|(n, _)| *n == name) {
                let ack = Heartbeat {
                    from: info(name, *inc),
                    kind: HeartbeatKind::Ack {
                        nonce,
                        knew_you: false,
                    },
                    members: Vec::new(),
                    departed: Vec::new(),
                };
                d.observe(ack, now + rtt);
            }
        }
    }

    fn three_node(now: Instant) -> Detector {
        let mut d = Detector::new(info("a", 1), config(), [], false);
        d.observe(ping_from("b", 1), now);
        d.observe(ping_from("c", 1), now);
        round(&mut d, &[("b", 1), ("c", 1)], now, Duration::from_millis(1));
        d
    }

    #[test]
    fn members_are_learned_and_become_alive_on_acks() {
        let now = Instant::now();
        let d = three_node(now);
        let alive: Vec<_> = d.alive().map(|m| m.name.as_str().to_owned()).collect();
        assert_eq!(alive, ["b", "c"]);
        assert_eq!(d.known().len(), 3);
        assert!(d.bootstrapped());
        assert!(d.quorum(now, |_| true));
        assert!(!d.quorum(now, |_| false), "no links, no quorum");
    }

    #[test]
    fn a_silent_member_is_declared_down_after_the_failure_timeout() {
        let start = Instant::now();
        let mut d = three_node(start);
        let mut now = start;
        while now < start + TIMEOUT {
            now += INTERVAL;
            round(&mut d, &[("b", 1)], now, Duration::from_millis(1));
            d.tick(now);
        }
        assert!(d.alive().any(|m| m.name.as_str() == "c"), "not yet");
        now += INTERVAL;
        round(&mut d, &[("b", 1)], now, Duration::from_millis(1));
        assert!(d.tick(now));
        let alive: Vec<_> = d.alive().map(|m| m.name.as_str().to_owned()).collect();
        assert_eq!(alive, ["b"]);
        assert!(d.quorum(now, |_| true), "a and b are a majority of three");
    }

    #[test]
    fn a_cut_off_node_loses_its_lease_before_the_others_declare_it_down() {
        let start = Instant::now();
        let mut d = three_node(start);
        // From `start` on, nobody answers this node (it is cut off).
        let mut now = start;
        let mut lost_quorum_at = None;
        while now < start + TIMEOUT * 2 {
            now += INTERVAL;
            round(&mut d, &[], now, Duration::ZERO);
            d.tick(now);
            if lost_quorum_at.is_none() && !d.quorum(now, |_| true) {
                lost_quorum_at = Some(now);
            }
        }
        let lost = lost_quorum_at.expect("quorum lost").duration_since(start);
        // The others saw this node's last ack at `start` at the latest: they declare it down
        // after `start + TIMEOUT` at the earliest. Writes stop strictly before.
        assert!(lost < TIMEOUT - INTERVAL, "quorum lost after {lost:?}");
    }

    #[test]
    fn delayed_acks_do_not_extend_the_lease() {
        let start = Instant::now();
        let mut d = three_node(start);
        // Pings go out but answers arrive 5 s late (a frozen peer thawing): no fresh lease.
        let pings = d.pings(start + Duration::from_millis(100));
        let late = start + Duration::from_secs(5);
        for (addr, hb) in pings {
            let HeartbeatKind::Ping { nonce } = hb.kind else {
                panic!()
            };
            let name = addr.split(':').next().unwrap();
            d.observe(
                Heartbeat {
                    from: info(name, 1),
                    kind: HeartbeatKind::Ack {
                        nonce,
                        knew_you: false,
                    },
                    members: Vec::new(),
                    departed: Vec::new(),
                },
                late,
            );
        }
        assert!(!d.quorum(late, |_| true));
    }

    #[test]
    fn a_restart_is_seen_as_a_new_life() {
        let now = Instant::now();
        let mut d = three_node(now);
        let observed = d.observe(ping_from("b", 2), now);
        assert_eq!(observed.restarted, Some(NodeName::new("b").unwrap()));
        assert!(
            !d.alive().any(|m| m.name.as_str() == "b"),
            "down until it answers"
        );
        // Datagrams of the old life are ignored.
        let stale = d.observe(ping_from("b", 1), now);
        assert_eq!(stale, Observed::default());
    }

    #[test]
    fn a_graceful_leave_shrinks_the_known_members() {
        let now = Instant::now();
        let mut d = three_node(now);
        let leave = Heartbeat {
            from: info("c", 1),
            kind: HeartbeatKind::Leave,
            members: Vec::new(),
            departed: Vec::new(),
        };
        assert!(d.observe(leave, now).changed);
        assert_eq!(d.known().len(), 2);
        // Gossip from a member that has not heard of the leave does not bring it back.
        let gossip = Heartbeat {
            from: info("b", 1),
            kind: HeartbeatKind::Ping { nonce: 9 },
            members: vec![info("c", 1)],
            departed: Vec::new(),
        };
        d.observe(gossip, now);
        assert_eq!(d.known().len(), 2);
        // A ping `c` sent before it left, delayed past its leave, does not bring it back.
        let late = d.observe(ping_from("c", 1), now);
        assert_eq!(late, Observed::default());
        assert_eq!(d.known().len(), 2);
        // A restarted `c` (new incarnation) is a member again.
        d.observe(ping_from("c", 2), now);
        assert_eq!(d.known().len(), 3);
    }

    #[test]
    fn a_node_that_missed_a_leave_learns_it_from_the_others() {
        let now = Instant::now();
        // `a` restarted and knows b, c only by name from its store; c left meanwhile.
        let mut d = Detector::new(
            info("a", 2),
            config(),
            [NodeName::new("b").unwrap(), NodeName::new("c").unwrap()],
            true,
        );
        assert_eq!(d.known().len(), 3);
        let mut from_b = ping_from("b", 1);
        from_b.departed = vec![info("c", 4)];
        assert!(d.observe(from_b.clone(), now).changed);
        assert_eq!(d.known().len(), 2, "c no longer counts for the majority");
        assert!(!d.members().any(|(m, _)| m.name.as_str() == "c"));
        // The same gossip again changes nothing; a c that came back later is a member again.
        assert!(!d.observe(from_b, now).changed || d.known().len() == 2);
        d.observe(ping_from("c", 5), now);
        assert_eq!(d.known().len(), 3);
        // An older departure of a member seen since in a newer life is ignored.
        let mut stale = ping_from("b", 1);
        stale.departed = vec![info("c", 4)];
        d.observe(stale, now);
        assert_eq!(d.known().len(), 3);
    }

    #[test]
    fn a_node_waiting_for_its_seeds_has_no_quorum_alone() {
        let now = Instant::now();
        let mut d = Detector::new(info("a", 1), config(), [], false);
        d.expect_peers();
        d.tick(now);
        assert!(!d.quorum(now, |_| true));
        // Alone without seeds, a node is a cluster of one.
        let mut solo = Detector::new(info("s", 1), config(), [], false);
        solo.tick(now);
        assert!(solo.quorum(now, |_| true));
    }

    #[test]
    fn bootstrap_expect_waits_for_enough_members() {
        let now = Instant::now();
        let mut d = Detector::new(
            info("a", 1),
            DetectorConfig {
                bootstrap_expect: 3,
                ..config()
            },
            [],
            false,
        );
        d.observe(ping_from("b", 1), now);
        round(&mut d, &[("b", 1)], now, Duration::from_millis(1));
        assert!(!d.quorum(now, |_| true), "two of three expected");
        d.observe(ping_from("c", 1), now);
        round(&mut d, &[("b", 1), ("c", 1)], now, Duration::from_millis(1));
        assert!(d.quorum(now, |_| true));
    }

    #[test]
    fn a_known_member_that_is_down_still_counts_for_the_majority() {
        let now = Instant::now();
        let mut d = Detector::new(
            info("a", 1),
            config(),
            [NodeName::new("b").unwrap(), NodeName::new("c").unwrap()],
            true,
        );
        d.tick(now);
        assert!(
            !d.quorum(now, |_| true),
            "one of three after a whole-cluster restart"
        );
    }

    /// What `answering`'s ack says to `d`'s ping.
    fn ack_from(d: &mut Detector, name: &str, knew_you: bool, now: Instant) {
        for (addr, hb) in d.pings(now) {
            let HeartbeatKind::Ping { nonce } = hb.kind else {
                panic!()
            };
            if addr.split(':').next() == Some(name) {
                let ack = Heartbeat {
                    from: info(name, 1),
                    kind: HeartbeatKind::Ack { nonce, knew_you },
                    members: Vec::new(),
                    departed: Vec::new(),
                };
                d.observe(ack, now);
            }
        }
    }

    #[test]
    fn a_new_store_learns_from_the_peers_whether_the_node_lost_its_disk() {
        let now = Instant::now();
        // The peers' side: an ack says whether the pinger's earlier life was known.
        let mut b = Detector::new(info("b", 1), config(), [node_name("a")], true);
        let reply = b.observe(ping_from("a", 2), now).reply.unwrap();
        assert!(matches!(
            reply.kind,
            HeartbeatKind::Ack { knew_you: true, .. }
        ));
        let mut c = Detector::new(info("c", 1), config(), [], false);
        let reply = c.observe(ping_from("a", 2), now).reply.unwrap();
        assert!(matches!(
            reply.kind,
            HeartbeatKind::Ack {
                knew_you: false,
                ..
            }
        ));

        // One peer that knew it settles it: the disk was lost.
        let seeded = |memory| {
            let mut d = Detector::new(info("a", 2), config(), [], false);
            d.expect_peers();
            let mut d = d.with_memory(memory);
            d.observe(ping_from("b", 1), now);
            d.observe(ping_from("c", 1), now);
            d
        };
        let mut d = seeded(Memory::Unknown);
        assert_eq!(d.memory(), Memory::Unknown);
        ack_from(&mut d, "c", false, now);
        assert_eq!(
            d.memory(),
            Memory::Unknown,
            "one stranger of two is not a majority"
        );
        ack_from(&mut d, "b", true, now);
        assert_eq!(d.memory(), Memory::Lost);
        ack_from(&mut d, "c", false, now);
        assert_eq!(d.memory(), Memory::Lost, "lost stays lost");

        // A majority that never knew it: a new node.
        let mut d = seeded(Memory::Unknown);
        ack_from(&mut d, "b", false, now);
        ack_from(&mut d, "c", false, now);
        assert_eq!(d.memory(), Memory::Intact);

        // An intact store is not put in doubt by anyone.
        let mut d = seeded(Memory::Intact);
        ack_from(&mut d, "b", true, now);
        assert_eq!(d.memory(), Memory::Intact);
    }

    #[test]
    fn own_datagrams_are_recognised() {
        let now = Instant::now();
        let mut d = Detector::new(info("a", 1), config(), [], false);
        let own = d.seed_ping();
        assert!(d.observe(own, now).own);
    }
}
