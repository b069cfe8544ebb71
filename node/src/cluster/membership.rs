//! The Membership actor: heartbeats over UDP, and the cluster view built from them.
//!
//! It is the thin async shell around the pure [`Detector`]: it pings every member (and the
//! seeds, resolved again on every attempt) each heartbeat interval on the cluster port's UDP
//! side, answers pings, and feeds what arrives to the detector. From the detector and the state
//! of the node-to-node sessions ([`super::links`]) it builds the [`View`] and publishes it on
//! every change; it tells the links which peers to keep sessions with.
//!
//! Every datagram is stamped and sealed ([`datagram`]) with a key derived from the cluster
//! cookie (and CA): a process without them cannot be heard, so it can never become a member by
//! this path (the session path is guarded by TLS and ractor_cluster's cookie challenge), and a
//! captured datagram cannot be played again. Datagrams that fail the checks are counted and
//! dropped.
//!
//! A member is **up** in the view when its heartbeats are answered *and* its node-to-node
//! session is ready; the view's quorum flag is the detector's lease check over those.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::NodeName;
use chat_protocol::peer::{Heartbeat, MemberInfo};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::actors::{Tasks, forward};
use crate::clock::now_ms;
use crate::cluster::detector::{Detector, DetectorConfig};
use crate::cluster::view::{Member, Status, View};
use crate::metrics::Metrics;
use crate::net::Net;
use crate::net::datagram::Sealer;
use crate::net::links::LinksMessage;
use crate::store::{Store, Write, Writer};
/// The largest datagram read.
const MAX_DATAGRAM: usize = 64 << 10;
/// Seeds are pinged at most this often while they are not members yet.
const SEED_EVERY: Duration = Duration::from_millis(1000);
/// The store key of the persisted membership.
const MEMBERS_KEY: &str = "members";

/// The membership persisted across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KnownMembers {
    /// Members counted for the quorum.
    pub names: Vec<NodeName>,
    /// Whether the cluster has bootstrapped.
    pub bootstrapped: bool,
}

impl KnownMembers {
    /// Reads the persisted membership (empty on a first start).
    pub fn load(store: &Store) -> KnownMembers {
        match store.node_value::<KnownMembers>(MEMBERS_KEY) {
            Ok(Some(known)) => known,
            Ok(None) => KnownMembers::default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the persisted membership; starting afresh");
                KnownMembers::default()
            }
        }
    }
}

/// The Membership actor.
#[derive(Debug)]
pub struct Membership;

/// What the membership needs.
pub struct MembershipArgs {
    /// The node-to-node layer (for the state of sessions).
    pub net: Net,
    /// Where the view is published.
    pub views: watch::Sender<Arc<View>>,
    /// This node as members see it.
    pub me: MemberInfo,
    /// The bound UDP socket of the cluster port.
    pub socket: Arc<UdpSocket>,
    /// Seals the datagrams this node sends (and makes the opener of those it receives).
    pub sealer: Arc<Sealer>,
    /// Seed addresses (`host:port`).
    pub seeds: Vec<String>,
    /// Timing.
    pub config: DetectorConfig,
    /// For reading and persisting the known members.
    pub store: Store,
    /// For persisting the known members.
    pub writer: Writer,
    /// The links actor.
    pub links: ActorRef<LinksMessage>,
}

impl std::fmt::Debug for MembershipArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipArgs")
            .field("me", &self.me)
            .finish()
    }
}

/// Messages of the membership actor.
#[derive(Debug, RactorMessage)]
pub enum MembershipMessage {
    /// A datagram arrived.
    Heartbeat(SocketAddr, Heartbeat),
    /// Time to ping.
    Tick,
    /// A node-to-node session became ready or closed.
    LinksChanged,
    /// A seed address resolved to this socket address.
    SeedResolved(String, SocketAddr),
    /// The node is shutting down: tell every member, then answer.
    Leave(RpcReplyPort<()>),
}

/// A datagram to send: the address, the receiver's name when known (a seed's is not), the
/// heartbeat.
type Outgoing = (String, Option<NodeName>, Heartbeat);

/// The membership's state.
pub struct MembershipState {
    args: MembershipArgs,
    detector: Detector,
    version: u64,
    last_view: Option<(Vec<Member>, bool)>,
    persisted: (BTreeSet<NodeName>, bool),
    seed_sent: Option<Instant>,
    /// Where datagrams of our own came from (seeds that are this node).
    own_addrs: HashSet<SocketAddr>,
    seed_addrs: HashMap<String, SocketAddr>,
    /// The datagram receiver and the forwarder of link changes.
    _tasks: Tasks,
    leaving: bool,
    /// Silent because the store cannot write (see [`MembershipState::withdrawn`]).
    withdrawn: bool,
}

impl Actor for Membership {
    type Msg = MembershipMessage;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMessage>,
        args: MembershipArgs,
    ) -> Result<MembershipState, ActorProcessingErr> {
        let known = KnownMembers::load(&args.store);
        let mut detector = Detector::new(
            args.me.clone(),
            args.config,
            known.names.iter().cloned(),
            known.bootstrapped,
        );
        if !args.seeds.is_empty() {
            detector.expect_peers();
        }
        let detector = detector.with_memory(args.store.memory());
        let mut tasks = Tasks::default();
        tasks.add(forward(args.net.links_changed(), myself.clone(), |_| {
            MembershipMessage::LinksChanged
        }));
        let socket = args.socket.clone();
        let me = myself.clone();
        let mut opener = args.sealer.opener(&args.me.name);
        let metrics = args.net.metrics().clone();
        // Seals are checked here, before anything is queued for the actor: a flood of datagrams
        // without the cookie costs one HMAC each and never grows the actor's (unbounded) mailbox.
        let receiver = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let mut last_bad_log: Option<Instant> = None;
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) => match opener.open(&buf[..n], now_ms()) {
                        Ok(heartbeat) => {
                            if me
                                .cast(MembershipMessage::Heartbeat(from, heartbeat))
                                .is_err()
                            {
                                break;
                            }
                        }
                        Err(e) => bad_datagram(&metrics, &mut last_bad_log, from, &e.to_string()),
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "udp receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        tasks.add(receiver.abort_handle());
        myself.send_interval(args.config.interval, || MembershipMessage::Tick);
        let persisted = (detector.known().clone(), detector.bootstrapped());
        tracing::info!(node = %args.me.name, incarnation = args.me.incarnation, known = ?persisted.0, seeds = ?args.seeds, "membership started");
        Ok(MembershipState {
            detector,
            version: 1,
            last_view: None,
            persisted,
            seed_sent: None,
            own_addrs: HashSet::new(),
            seed_addrs: HashMap::new(),
            _tasks: tasks,
            leaving: false,
            withdrawn: false,
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<MembershipMessage>,
        message: MembershipMessage,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MembershipMessage::Heartbeat(from, heartbeat) => state.heartbeat(from, heartbeat),
            MembershipMessage::Tick => state.tick(&myself),
            MembershipMessage::LinksChanged => state.publish(),
            MembershipMessage::SeedResolved(seed, addr) => {
                state.seed_addrs.insert(seed, addr);
                state.check_self_seeds();
            }
            MembershipMessage::Leave(reply) => {
                state.leaving = true;
                let leave = state.detector.leave();
                let targets: Vec<Outgoing> = state
                    .detector
                    .members()
                    .map(|(m, _)| (m.addr.clone(), Some(m.name.clone()), leave.clone()))
                    .collect();
                state.send_all(&myself, targets);
                // Give the datagrams a moment to leave the socket before the process exits.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

impl MembershipState {
    fn heartbeat(&mut self, from: SocketAddr, heartbeat: Heartbeat) {
        if self.withdrawn() {
            return;
        }
        let sender = heartbeat.from.name.clone();
        let observed = self.detector.observe(heartbeat, Instant::now());
        if observed.own {
            self.own_addrs.insert(from);
            self.check_self_seeds();
            return;
        }
        if let Some(reply) = observed.reply {
            self.send_to(from, &sender, &reply);
        }
        if let Some(name) = observed.restarted {
            tracing::info!(peer = %name, "peer restarted");
            let _ = self.args.links.cast(LinksMessage::Restarted(name));
        }
        if observed.changed {
            self.publish();
        }
    }

    fn check_self_seeds(&mut self) {
        // Seeds that all turn out to be this node: it is the first node of its cluster.
        if !self.args.seeds.is_empty()
            && self.args.seeds.iter().all(|s| {
                self.seed_addrs
                    .get(s)
                    .is_some_and(|a| self.own_addrs.contains(a))
            })
            && self.detector.members().next().is_none()
        {
            self.detector = Detector::new(
                self.args.me.clone(),
                self.args.config,
                self.detector.known().iter().cloned(),
                self.detector.bootstrapped(),
            )
            .with_memory(self.detector.memory());
            self.args.seeds.clear();
        }
    }

    /// Whether this node keeps out of the cluster because its store cannot write (disk full,
    /// I/O errors): it neither pings nor answers, so its peers declare it down within the
    /// failure timeout and take over its rooms (from their replicas), exactly as for a node cut
    /// off; once the store writes again, it answers again and rejoins as a thawed node does.
    fn withdrawn(&mut self) -> bool {
        let withdrawn = !self.args.store.writable();
        if withdrawn != self.withdrawn {
            self.withdrawn = withdrawn;
            if withdrawn {
                tracing::warn!(
                    "store cannot write: silent towards the cluster, so that peers take this node's rooms"
                );
            } else {
                tracing::info!("store writes again: rejoining the cluster");
            }
        }
        withdrawn
    }

    fn tick(&mut self, myself: &ActorRef<MembershipMessage>) {
        if self.leaving {
            return;
        }
        let now = Instant::now();
        let names: HashMap<String, NodeName> = self
            .detector
            .members()
            .map(|(m, _)| (m.addr.clone(), m.name.clone()))
            .collect();
        let mut sends: Vec<Outgoing> = self
            .detector
            .pings(now)
            .into_iter()
            .map(|(addr, ping)| {
                let name = names.get(&addr).cloned();
                (addr, name, ping)
            })
            .collect();
        if self
            .seed_sent
            .is_none_or(|t| now.duration_since(t) >= SEED_EVERY)
        {
            // Seeds are pinged forever: a node that started before its seeds, or lost them in
            // a partition, finds its way back by itself.
            self.seed_sent = Some(now);
            for seed in self.args.seeds.clone() {
                let ping = self.detector.seed_ping();
                sends.push((seed, None, ping));
            }
        }
        if self.withdrawn() {
            sends.clear();
        }
        self.send_all(myself, sends);
        if self.detector.tick(now) {
            self.publish();
        } else {
            // The quorum depends on leases expiring with time: re-evaluate every tick.
            self.sync_memory();
            self.publish_if_changed();
        }
    }

    fn send_to(&self, to: SocketAddr, name: &NodeName, heartbeat: &Heartbeat) {
        match self.args.sealer.seal(heartbeat, Some(name), now_ms()) {
            Ok(datagram) => {
                let _ = self.args.socket.try_send_to(&datagram, to);
            }
            Err(e) => tracing::error!(error = %e, "heartbeat not encodable"),
        }
    }

    /// Resolves the addresses (host names are looked up again each time) and sends, off the
    /// actor: a slow resolver must not delay heartbeats being answered.
    fn send_all(&self, myself: &ActorRef<MembershipMessage>, sends: Vec<Outgoing>) {
        let sealer = self.args.sealer.clone();
        let socket = self.args.socket.clone();
        let seeds: HashSet<String> = self.args.seeds.iter().cloned().collect();
        let mut batch = Vec::with_capacity(sends.len());
        for (addr, name, heartbeat) in sends {
            match sealer.seal(&heartbeat, name.as_ref(), now_ms()) {
                Ok(datagram) => batch.push((addr, datagram)),
                Err(e) => tracing::error!(error = %e, "heartbeat not encodable"),
            }
        }
        let me = myself.clone();
        tokio::spawn(async move {
            for (addr, datagram) in batch {
                let resolved = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::lookup_host(addr.clone()),
                )
                .await;
                match resolved {
                    Ok(Ok(mut addrs)) => {
                        if let Some(to) = addrs.next() {
                            let _ = socket.send_to(&datagram, to).await;
                            if seeds.contains(&addr) {
                                let _ = me.cast(MembershipMessage::SeedResolved(addr, to));
                            }
                        }
                    }
                    _ => tracing::debug!(%addr, "cannot resolve member address"),
                }
            }
        });
    }

    fn build_view(&self) -> (Vec<Member>, bool) {
        let net = &self.args.net;
        view_of(
            &self.detector,
            &self.args.me,
            |name| net.link_session(name),
            Instant::now(),
        )
    }

    fn publish_if_changed(&mut self) {
        let view = self.build_view();
        if self.last_view.as_ref() != Some(&view) {
            self.publish_view(view);
        }
    }

    /// Records what the members' answers told about this node's store (new node, or lost
    /// disk): the log keeper reads it for every promise.
    fn sync_memory(&self) {
        let memory = self.detector.memory();
        if memory != self.args.store.memory() {
            match self.args.store.set_memory(memory) {
                Ok(()) => tracing::warn!(?memory, "found out what this node's new store means"),
                Err(e) => tracing::error!(error = %e, "recording the store's memory failed"),
            }
        }
    }

    fn publish(&mut self) {
        self.sync_memory();
        // Tell the links which peers to hold sessions with (every alive member).
        let desired = self
            .detector
            .alive()
            .map(|m| (m.name.clone(), m.addr.clone()))
            .collect();
        let _ = self.args.links.cast(LinksMessage::Desired(desired));
        self.persist();
        self.publish_if_changed();
    }

    fn publish_view(&mut self, (members, quorum): (Vec<Member>, bool)) {
        self.version += 1;
        let up: Vec<&str> = members
            .iter()
            .filter(|m| m.status == Status::Up)
            .map(|m| m.name.as_str())
            .collect();
        tracing::info!(version = self.version, up = ?up, known = self.detector.known().len(), quorum, "cluster view changed");
        let view = View::new(
            self.args.me.name.clone(),
            members.clone(),
            quorum,
            self.version,
        );
        self.last_view = Some((members, quorum));
        let metrics = self.args.net.metrics();
        metrics.members.set(view.up_count() as i64);
        metrics.quorum.set(i64::from(view.quorum));
        self.args.views.send_replace(Arc::new(view));
    }

    fn persist(&mut self) {
        let current = (self.detector.known().clone(), self.detector.bootstrapped());
        if current == self.persisted {
            return;
        }
        let value = KnownMembers {
            names: current.0.iter().cloned().collect(),
            bootstrapped: current.1,
        };
        match Write::node(MEMBERS_KEY, &value) {
            Ok(write) => self.args.writer.submit(
                write,
                Box::new(|result| {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "persisting the membership failed");
                    }
                }),
            ),
            Err(e) => tracing::error!(error = %e, "membership not encodable"),
        }
        self.persisted = current;
    }
}

/// The members of the view and its quorum flag at `now`, from the detector and the state of the
/// node-to-node sessions: a member is up when its heartbeats are answered and `session` names
/// its ready session; known members not heard from in this life are down.
pub fn view_of(
    detector: &Detector,
    me: &MemberInfo,
    session: impl Fn(&NodeName) -> Option<u64>,
    now: Instant,
) -> (Vec<Member>, bool) {
    let mut members = vec![Member {
        name: me.name.clone(),
        addr: me.addr.clone(),
        status: Status::Up,
        public_url: me.public_url.clone(),
        session: 0,
    }];
    for (info, alive) in detector.members() {
        let session = session(&info.name).filter(|_| alive);
        members.push(Member {
            name: info.name.clone(),
            addr: info.addr.clone(),
            status: if session.is_some() {
                Status::Up
            } else {
                Status::Down
            },
            public_url: info.public_url.clone(),
            session: session.unwrap_or(0),
        });
    }
    // Known members never seen in this life (after a restart) are down until they answer.
    for name in detector.known() {
        if !members.iter().any(|m| &m.name == name) {
            members.push(Member {
                name: name.clone(),
                addr: String::new(),
                status: Status::Down,
                public_url: None,
                session: 0,
            });
        }
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let quorum = detector.quorum(now, |name| session(name).is_some());
    (members, quorum)
}

/// Counts a refused datagram, and logs one every 5 s at most (a flood must not flood the log).
fn bad_datagram(metrics: &Metrics, last_log: &mut Option<Instant>, from: SocketAddr, why: &str) {
    Metrics::count(&metrics.peer_dropped, "bad_datagram");
    let now = Instant::now();
    if last_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5)) {
        *last_log = Some(now);
        tracing::warn!(%from, why, "heartbeat datagram refused");
    }
}
