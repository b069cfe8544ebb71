//! Clusters of `chat-node` processes in network namespaces, for partition and chaos tests.
//!
//! Loopback cannot be partitioned, so each node of a [`NetCluster`] runs in a namespace of its
//! own, with its own address on a private `/24`:
//!
//! ```text
//!   root namespace (test process, clients)        switch namespace        node namespaces
//!   veth <tag>h  10.213.S.254  ─────────────────── host ┐
//!                                                      br0 ── n1 ─────────── eth0 10.213.S.1
//!                                                       │ ─── n2 ─────────── eth0 10.213.S.2
//!                                                       └ ─── n3 ─────────── eth0 10.213.S.3
//! ```
//!
//! The bridge lives in a namespace of its own because Docker sets the root namespace's `FORWARD`
//! policy to `DROP`; traffic between the test process and a node is local traffic of the root
//! namespace (`OUTPUT` / `INPUT`), never forwarded there. `S` is chosen per test (distinct per
//! test, so tests can run in parallel); namespace names carry the test process's pid and a
//! counter, interface names in the root namespace too (they are global to it).
//!
//! Node `i` (1-based) is `n{i}`: HTTP on `10.213.S.i:8080`, cluster port `10.213.S.i:7000`,
//! seeds = every node's cluster address, the cookie of [`super::cluster::COOKIE`], data
//! directories under one temp dir (they survive a restart of the node).
//!
//! **Cuts.** [`NetCluster::cut`] drops the traffic between two nodes with an `INPUT` rule in
//! *each* of their namespaces (`-s <other> -j DROP`): datagrams and segments leave and vanish,
//! like on a broken link. (A `DROP` in `OUTPUT` would instead fail the sender's `sendto` and
//! `connect` at once with `EPERM`, which no real partition does.) The root namespace's address is
//! never dropped, so clients still reach a cut-off node and can watch it refuse writes.
//! [`NetCluster::disconnect`] takes the node's port of the bridge down instead: a full black
//! hole, clients included.
//!
//! **Cleanup.** Everything created is removed when the [`NetCluster`] is dropped, also when the
//! test panics: the node processes first (by pid, see [`NodeProcess`]), then the namespaces
//! (which takes their veths with them) and the root namespace's veth. Namespaces left behind by
//! a test process that died without unwinding (SIGKILL) are removed by the next run.
//!
//! **Skip.** Without root, or where `ip netns` does not work, [`NetCluster::start`] reports the
//! test skipped ([`super::skip`]: printed and counted by `tests/run`; a failure on CI, which
//! has root) and returns `None`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cluster::{COOKIE, FORM_TIMEOUT, cluster_view, health_status, placement, wait_views_at};
use super::{Client, NodeProcess};

/// Every node's HTTP / WebSocket port (each node has its own address).
pub const HTTP_PORT: u16 = 8080;
/// Every node's cluster port.
pub const CLUSTER_PORT: u16 = 7000;
/// Time between the launches of two nodes by [`NetCluster::start`] (the heartbeat interval is
/// 200 ms: nodes tick 70 ms and 140 ms apart).
pub const LAUNCH_STAGGER: Duration = Duration::from_millis(70);
/// Why the tests cannot run here.
const NEEDS: &str = "needs root and ip netns";
/// Namespaces of this harness are named `chatnet-<pid>-<k>-…`.
const NS_PREFIX: &str = "chatnet-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command; its stderr (and status) when it fails.
fn run(args: &[&str]) -> Result<(), String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs a command that must succeed.
fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|id| id == "0"))
        })
        .unwrap_or(false)
}

/// Removes the namespaces of test processes that no longer exist (killed without unwinding).
fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// The namespaces and links of one cluster; removed on drop.
struct Net {
    switch: String,
    nodes: Vec<String>,
    host_veth: String,
    created: Vec<String>,
    host_created: bool,
}

impl Net {
    fn create(subnet: u8, size: usize) -> Result<Net, String> {
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("{NS_PREFIX}{pid}-{k}");
        let mut net = Net {
            switch: format!("{base}-sw"),
            nodes: (1..=size).map(|i| format!("{base}-n{i}")).collect(),
            // Root-namespace names are global and at most 15 bytes: `cn` + pid and counter in hex.
            host_veth: format!("cn{pid:x}x{k:x}"),
            created: Vec::new(),
            host_created: false,
        };
        let sw = net.switch.clone();
        run(&["ip", "netns", "add", &sw])?;
        net.created.push(sw.clone());
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for (i, ns) in net.nodes.clone().iter().enumerate() {
            let port = format!("n{}", i + 1);
            let ip = format!("10.213.{subnet}.{}/24", i + 1);
            run(&["ip", "netns", "add", ns])?;
            net.created.push(ns.clone());
            run(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "up"])?;
            run(&["ip", "-n", ns, "addr", "add", &ip, "dev", "eth0"])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let host = net.host_veth.clone();
        run(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &sw,
        ])?;
        net.host_created = true;
        run(&["ip", "-n", &sw, "link", "set", "host", "master", "br0"])?;
        run(&["ip", "-n", &sw, "link", "set", "host", "up"])?;
        let host_ip = format!("10.213.{subnet}.254/24");
        run(&["ip", "addr", "add", &host_ip, "dev", &host])?;
        run(&["ip", "link", "set", &host, "up"])?;
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if self.host_created {
            // Usually gone already with its peer; removed explicitly in case it is not.
            let _ = run(&["ip", "link", "del", &self.host_veth]);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A cluster of `chat-node` processes, each in its own network namespace.
pub struct NetCluster {
    // Declared first, so dropped first: the processes die before their namespaces are removed.
    nodes: Vec<Option<NodeProcess>>,
    /// Node names, `n1`, `n2`, …
    pub names: Vec<String>,
    /// Node addresses (`10.213.S.i`).
    pub ips: Vec<String>,
    subnet: u8,
    cuts: BTreeSet<(usize, usize)>,
    net: Net,
    temp: tempfile::TempDir,
}

impl NetCluster {
    /// Creates the namespaces of `size` nodes on `10.213.{subnet}.0/24`, starts every node and
    /// waits until they form one cluster; `None` (after reporting the test skipped) when namespaces
    /// cannot be made here.
    ///
    /// The nodes are launched [`LAUNCH_STAGGER`] apart, so that their heartbeat ticks are out of
    /// phase as in any real deployment: nodes launched in the same millisecond tick together,
    /// detect failures at the same tick and see each other come back at the same moment, which
    /// hides every race between two nodes' views.
    pub async fn start(subnet: u8, size: usize) -> Option<NetCluster> {
        let mut cluster = NetCluster::plan(subnet, size)?;
        for i in 1..=size {
            if i > 1 {
                tokio::time::sleep(LAUNCH_STAGGER).await;
            }
            cluster.launch(i);
        }
        cluster.wait_formed().await;
        Some(cluster)
    }

    /// Creates the namespaces without starting any node; `None` (after reporting the test skipped)
    /// when namespaces cannot be made here.
    pub fn plan(subnet: u8, size: usize) -> Option<NetCluster> {
        assert!((1..=250).contains(&size), "size {size}");
        if !is_root() {
            super::skip(&format!("{NEEDS}: not root"));
            return None;
        }
        if let Err(e) = run(&["ip", "netns", "list"]) {
            super::skip(&format!("{NEEDS}: {e}"));
            return None;
        }
        remove_stale();
        let subnet_cidr = format!("10.213.{subnet}.0/24");
        let routes = Command::new("ip")
            .args([
                "-4",
                "route",
                "show",
                "to",
                "match",
                &format!("10.213.{subnet}.1"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(
            !routes.contains(&subnet_cidr),
            "{subnet_cidr} is already routed here ({routes:?}): pick another subnet for this test"
        );
        let net = match Net::create(subnet, size) {
            Ok(net) => net,
            Err(e) => {
                super::skip(&format!("{NEEDS}: {e}"));
                return None;
            }
        };
        Some(NetCluster {
            nodes: (0..size).map(|_| None).collect(),
            names: (1..=size).map(|i| format!("n{i}")).collect(),
            ips: (1..=size).map(|i| format!("10.213.{subnet}.{i}")).collect(),
            subnet,
            cuts: BTreeSet::new(),
            net,
            temp: tempfile::tempdir().expect("temp dir"),
        })
    }

    /// How many nodes are planned.
    pub fn size(&self) -> usize {
        self.names.len()
    }

    /// The address of node `i` (1-based).
    pub fn ip(&self, i: usize) -> &str {
        &self.ips[i - 1]
    }

    /// The root namespace's address on the cluster's subnet (where clients come from).
    pub fn host_ip(&self) -> String {
        format!("10.213.{}.254", self.subnet)
    }

    /// The HTTP / WebSocket address of node `i`.
    pub fn http(&self, i: usize) -> SocketAddr {
        format!("{}:{HTTP_PORT}", self.ip(i)).parse().expect("addr")
    }

    /// Every node's HTTP address, in order.
    pub fn https(&self) -> Vec<SocketAddr> {
        (1..=self.size()).map(|i| self.http(i)).collect()
    }

    /// The cluster address of node `i`.
    pub fn cluster_addr(&self, i: usize) -> String {
        format!("{}:{CLUSTER_PORT}", self.ip(i))
    }

    /// The namespace of node `i`.
    pub fn netns(&self, i: usize) -> &str {
        &self.net.nodes[i - 1]
    }

    /// The `--seeds` value: every node's cluster address.
    pub fn seeds(&self) -> String {
        (1..=self.size())
            .map(|i| self.cluster_addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index (1-based) of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
            + 1
    }

    /// Every node's name.
    pub fn all_names(&self) -> BTreeSet<String> {
        self.names.iter().cloned().collect()
    }

    /// Every node's name but those of `except`.
    pub fn names_except(&self, except: &[usize]) -> BTreeSet<String> {
        (1..=self.size())
            .filter(|i| !except.contains(i))
            .map(|i| self.names[i - 1].clone())
            .collect()
    }

    // ---- processes ----

    /// Spawns node `i` (1-based) in its namespace without waiting for it.
    pub fn launch(&mut self, i: usize) {
        assert!(self.nodes[i - 1].is_none(), "node {i} already launched");
        let listen = self.cluster_addr(i);
        let seeds = self.seeds();
        let data_dir = self.temp.path().join(&self.names[i - 1]);
        let node = NodeProcess::spawn_in_netns(
            &self.names[i - 1],
            &self.net.nodes[i - 1],
            self.http(i),
            &data_dir,
            &[
                "--cluster-listen",
                &listen,
                "--seeds",
                &seeds,
                "--cookie",
                COOKIE,
            ],
        );
        self.nodes[i - 1] = Some(node);
    }

    /// Node `i`'s process; panics if it was not launched.
    pub fn node(&self, i: usize) -> &NodeProcess {
        self.nodes[i - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} not launched"))
    }

    /// Node `i`'s process, mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut NodeProcess {
        self.nodes[i - 1]
            .as_mut()
            .unwrap_or_else(|| panic!("node {i} not launched"))
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        self.node(i).log_text()
    }

    /// SIGKILLs node `i` (it keeps its data directory for [`NetCluster::restart`]).
    pub fn kill(&mut self, i: usize) {
        self.node_mut(i).kill();
    }

    /// SIGSTOPs node `i` (a frozen process: its sockets stay open, nothing answers).
    pub fn stop(&self, i: usize) {
        self.node(i).signal("STOP");
    }

    /// SIGCONTs node `i`.
    pub fn cont(&self, i: usize) {
        self.node(i).signal("CONT");
    }

    /// Starts node `i` again (killing it first if it runs) with its data; does not wait.
    pub fn restart(&mut self, i: usize) {
        self.node_mut(i).relaunch();
    }

    // ---- network faults ----

    /// Drops every packet between nodes `a` and `b`, both ways (an `INPUT` rule in each one's
    /// namespace). Cutting a pair twice is a no-op.
    pub fn cut(&mut self, a: usize, b: usize) {
        let pair = (a.min(b), a.max(b));
        assert!(pair.0 != pair.1 && pair.1 <= self.size(), "cut {a} {b}");
        if !self.cuts.insert(pair) {
            return;
        }
        self.rule("-A", a, b);
        self.rule("-A", b, a);
    }

    /// Lets the traffic between `a` and `b` through again.
    pub fn uncut(&mut self, a: usize, b: usize) {
        let pair = (a.min(b), a.max(b));
        if !self.cuts.remove(&pair) {
            return;
        }
        self.rule("-D", a, b);
        self.rule("-D", b, a);
    }

    fn rule(&self, action: &str, at: usize, from: usize) {
        must(&[
            "ip",
            "netns",
            "exec",
            self.netns(at),
            "iptables",
            "-w",
            action,
            "INPUT",
            "-s",
            self.ip(from),
            "-j",
            "DROP",
        ]);
    }

    /// Cuts node `i` from every other node; clients (the root namespace) still reach it.
    pub fn isolate(&mut self, i: usize) {
        for j in 1..=self.size() {
            if j != i {
                self.cut(i, j);
            }
        }
    }

    /// Undoes every cut involving node `i`.
    pub fn heal(&mut self, i: usize) {
        let pairs: Vec<(usize, usize)> = self
            .cuts
            .iter()
            .copied()
            .filter(|&(a, b)| a == i || b == i)
            .collect();
        for (a, b) in pairs {
            self.uncut(a, b);
        }
    }

    /// Cuts every node of `a` from every node of `b` (nodes in neither keep seeing both).
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cut(x, y);
            }
        }
    }

    /// Undoes every cut.
    pub fn heal_all(&mut self) {
        let pairs: Vec<(usize, usize)> = self.cuts.iter().copied().collect();
        for (a, b) in pairs {
            self.uncut(a, b);
        }
    }

    /// The pairs currently cut.
    pub fn cuts(&self) -> &BTreeSet<(usize, usize)> {
        &self.cuts
    }

    /// Takes node `i`'s port of the bridge down: nothing reaches it, clients included.
    pub fn disconnect(&self, i: usize) {
        must(&[
            "ip",
            "-n",
            &self.net.switch,
            "link",
            "set",
            &format!("n{i}"),
            "down",
        ]);
    }

    /// Brings node `i`'s port of the bridge back up.
    pub fn reconnect(&self, i: usize) {
        must(&[
            "ip",
            "-n",
            &self.net.switch,
            "link",
            "set",
            &format!("n{i}"),
            "up",
        ]);
    }

    // ---- observing ----

    /// Waits until every node lists every node up and answers `/healthz` 200.
    pub async fn wait_formed(&self) -> Duration {
        let all: Vec<usize> = (1..=self.size()).collect();
        self.wait_healthy_views(&all, &self.all_names(), FORM_TIMEOUT)
            .await
    }

    /// Waits until each of `observers` lists exactly `expected` as its up members, says it has
    /// the quorum and answers `/healthz` 200; the time it took. Panics with every observer's
    /// view after `timeout`.
    pub async fn wait_healthy_views(
        &self,
        observers: &[usize],
        expected: &BTreeSet<String>,
        timeout: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let mut done = true;
            for &i in observers {
                let addr = self.http(i);
                let view = cluster_view(addr).await;
                let ok = view
                    .as_ref()
                    .is_some_and(|v| v["quorum"] == true && up_in(v).as_ref() == Some(expected))
                    && health_status(addr).await == Some(200);
                if !ok {
                    done = false;
                    break;
                }
            }
            if done {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!(
                    "nodes {observers:?} did not all see {expected:?} up with a quorum within \
                     {timeout:?}:\n{}",
                    self.describe(observers).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls every `every` until each of `observers` has an up-member set satisfying `pred`;
    /// the time it took from `since`, or `None` after `timeout` (from `since`).
    pub async fn wait_views(
        &self,
        observers: &[usize],
        pred: impl Fn(&BTreeSet<String>) -> bool,
        since: Instant,
        every: Duration,
        timeout: Duration,
    ) -> Option<Duration> {
        let addrs: Vec<SocketAddr> = observers.iter().map(|&i| self.http(i)).collect();
        wait_views_at(&addrs, pred, since, every, timeout).await
    }

    /// Node `i`'s quorum flag (`/cluster`), `None` if it does not answer.
    pub async fn quorum(&self, i: usize) -> Option<bool> {
        cluster_view(self.http(i)).await?["quorum"].as_bool()
    }

    /// The `/cluster` answer and `/healthz` status of each of `observers`, for messages.
    pub async fn describe(&self, observers: &[usize]) -> String {
        let mut out = String::new();
        for &i in observers {
            let addr = self.http(i);
            let view = cluster_view(addr).await;
            let health = health_status(addr).await;
            out.push_str(&format!(
                "  {} ({addr}): healthz {health:?}, /cluster {}\n",
                self.names[i - 1],
                view.map_or_else(|| "unreachable".to_owned(), |v| v.to_string())
            ));
        }
        out
    }

    /// The first room `{prefix}-{k}` that every node places with `owner` as owner and, when
    /// given, `replica` as its (first) replica; panics if the nodes disagree.
    pub async fn room_placed(&self, owner: &str, replica: Option<&str>, prefix: &str) -> String {
        for k in 0..1000 {
            let room = format!("{prefix}-{k}");
            let (o, replicas) = placement(self.http(1), &room).await;
            if o == owner && replica.is_none_or(|r| replicas.first().map(String::as_str) == Some(r))
            {
                for i in 2..=self.size() {
                    assert_eq!(
                        placement(self.http(i), &room).await,
                        (o.clone(), replicas.clone()),
                        "n1 and n{i} disagree on the placement of {room}"
                    );
                }
                return room;
            }
        }
        panic!("no room {prefix}-* is placed on {owner} (replica {replica:?})");
    }

    /// The whole history of `room` as node `i` serves it (paged by 500), retrying on
    /// `unavailable` for up to `timeout`.
    pub async fn history(&self, i: usize, room: &str, timeout: Duration) -> Vec<Value> {
        let mut client = Client::connect(self.http(i), "historian").await;
        let messages = full_history(&mut client, room, timeout).await;
        client.close().await;
        messages
    }
}

/// The names `/cluster` lists as up.
fn up_in(view: &Value) -> Option<BTreeSet<String>> {
    Some(
        view["members"]
            .as_array()?
            .iter()
            .filter(|m| m["status"] == "up")
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// The whole history of `room` through `client` (pages of 500, oldest first), retrying on
/// `unavailable` for up to `timeout`.
pub async fn full_history(client: &mut Client, room: &str, timeout: Duration) -> Vec<Value> {
    let start = Instant::now();
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut request = json!({"type": "history", "room": room, "limit": 500});
        if let Some(before) = before {
            request["before"] = json!(before);
        }
        let reply = client.request(request).await;
        match reply["type"].as_str() {
            Some("history") => {
                let page = reply["messages"]
                    .as_array()
                    .unwrap_or_else(|| panic!("history without messages: {reply}"))
                    .clone();
                let first = page.first().and_then(|m| m["seq"].as_u64());
                let full = page.len() == 500;
                pages.push(page);
                match first {
                    Some(first) if full && first > 1 => before = Some(first),
                    _ => break,
                }
            }
            Some("error") if reply["code"] == "unavailable" => {
                assert!(
                    start.elapsed() < timeout,
                    "history of {room} unavailable for {timeout:?}; last reply {reply}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("history of {room}: unexpected reply {reply}"),
        }
    }
    pages.into_iter().rev().flatten().collect()
}
