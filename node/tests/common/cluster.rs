//! Multi-process clusters on loopback: every node of a test on its own `127.0.0.N` address.
//!
//! A test picks a `base` (distinct per test, so that tests can run in parallel in one binary);
//! node `i` (1-based) gets the address `127.0.0.{base + i}`, its HTTP port and cluster port on
//! that address, and its data directory under one temp dir. The cluster ports are reserved
//! (a listener held open) from planning until just before the node is launched, so that a node
//! launched later (see `a_node_started_before_its_seeds_joins_when_they_come`) still finds its
//! port free. Every node's seeds are the cluster addresses of all planned nodes. Waiting is by
//! polling with a deadline.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{NodeProcess, http_get};

/// The cookie every test cluster shares.
pub const COOKIE: &str = "test-cookie-of-the-suite";

/// How long a cluster may take to form (start-up of debug binaries on a loaded machine).
pub const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one HTTP exchange with a node while polling (a stopped node accepts TCP but never
/// answers).
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// A planned cluster of `chat-node` processes.
pub struct Cluster {
    nodes: Vec<Option<NodeProcess>>,
    /// Node names, `n1`, `n2`, …
    pub names: Vec<String>,
    /// Node addresses (`127.0.0.N`).
    pub ips: Vec<String>,
    /// Node-to-node addresses.
    pub cluster_addrs: Vec<SocketAddr>,
    reservations: Vec<Option<TcpListener>>,
    /// Extra flags per planned node (e.g. its TLS files).
    args: Vec<Vec<String>>,
    base: u8,
    temp: tempfile::TempDir,
}

impl Cluster {
    /// Plans `size` nodes on `127.0.0.{base + 1}` … without starting any.
    pub fn plan(base: u8, size: usize) -> Cluster {
        assert!(usize::from(base) + size < 255, "base {base} too high");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            names: Vec::new(),
            ips: Vec::new(),
            cluster_addrs: Vec::new(),
            reservations: Vec::new(),
            args: vec![Vec::new(); size],
            base,
            temp: tempfile::tempdir().expect("temp dir"),
        };
        for i in 1..=size {
            let ip = cluster.ip(i);
            let listener = TcpListener::bind((ip.as_str(), 0)).expect("reserve a cluster port");
            cluster
                .cluster_addrs
                .push(listener.local_addr().expect("addr"));
            cluster.reservations.push(Some(listener));
            cluster.names.push(format!("n{i}"));
            cluster.ips.push(ip);
            cluster.nodes.push(None);
        }
        cluster
    }

    /// Plans `size` nodes, launches them all and waits until they form one cluster.
    pub async fn start(base: u8, size: usize) -> Cluster {
        let mut cluster = Cluster::plan(base, size);
        for i in 1..=size {
            cluster.launch(i);
        }
        cluster.wait_formed().await;
        cluster
    }

    /// The address of node `i` (1-based); also usable for nodes beyond the planned ones.
    pub fn ip(&self, i: usize) -> String {
        format!("127.0.0.{}", usize::from(self.base) + i)
    }

    /// The `--seeds` value: every planned node's cluster address.
    pub fn seeds(&self) -> String {
        self.cluster_addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data directory of the node named `name`.
    pub fn data_dir(&self, name: &str) -> std::path::PathBuf {
        self.temp.path().join(name)
    }

    /// Gives planned node `i` (1-based) extra flags, from its next launch on.
    pub fn set_args(&mut self, i: usize, args: Vec<String>) {
        self.args[i - 1] = args;
    }

    /// Spawns planned node `i` (1-based) without waiting for it.
    pub fn launch(&mut self, i: usize) {
        assert!(self.nodes[i - 1].is_none(), "node {i} already launched");
        // Released before the spawn: the child must be able to bind it at once.
        drop(self.reservations[i - 1].take());
        let node = self.spawn_node(
            &self.names[i - 1],
            &self.ips[i - 1],
            self.cluster_addrs[i - 1],
            COOKIE,
            &self.args[i - 1],
        );
        self.nodes[i - 1] = Some(node);
    }

    /// Spawns a node that is not one of the planned members: named `name`, on address
    /// `ip(i)`, with the cluster's seeds but the given cookie. The caller owns it.
    pub fn spawn_outsider(&self, name: &str, i: usize, cookie: &str) -> NodeProcess {
        self.spawn_outsider_with(name, i, cookie, &[])
    }

    /// [`Cluster::spawn_outsider`] with extra flags.
    pub fn spawn_outsider_with(
        &self,
        name: &str,
        i: usize,
        cookie: &str,
        args: &[String],
    ) -> NodeProcess {
        let ip = self.ip(i);
        let cluster_addr = TcpListener::bind((ip.as_str(), 0))
            .and_then(|l| l.local_addr())
            .expect("a free cluster port");
        self.spawn_node(name, &ip, cluster_addr, cookie, args)
    }

    /// Spawns a node with the cluster's seeds. Only this harness binds ports on a test's
    /// addresses, so the one port the node's HTTP listener may collide with is its own cluster
    /// port, released just before: in that (rare) case it is spawned again.
    fn spawn_node(
        &self,
        name: &str,
        ip: &str,
        cluster_addr: SocketAddr,
        cookie: &str,
        extra: &[String],
    ) -> NodeProcess {
        let cluster_listen = cluster_addr.to_string();
        let seeds = self.seeds();
        let data_dir = self.data_dir(name);
        let mut args = vec![
            "--cluster-listen",
            &cluster_listen,
            "--seeds",
            &seeds,
            "--cookie",
            cookie,
        ];
        args.extend(extra.iter().map(String::as_str));
        loop {
            let node = NodeProcess::spawn_in(name, ip, &data_dir, &args);
            if node.http.port() != cluster_addr.port() {
                return node;
            }
        }
    }

    /// Node `i` (1-based); panics if it was not launched.
    pub fn node(&self, i: usize) -> &NodeProcess {
        self.nodes[i - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} not launched"))
    }

    /// Node `i` (1-based), mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut NodeProcess {
        self.nodes[i - 1]
            .as_mut()
            .unwrap_or_else(|| panic!("node {i} not launched"))
    }

    /// The HTTP address of node `i`.
    pub fn http(&self, i: usize) -> SocketAddr {
        self.node(i).http
    }

    /// The index (1-based) of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
            + 1
    }

    /// Every planned node's name.
    pub fn all_names(&self) -> BTreeSet<String> {
        self.names.iter().cloned().collect()
    }

    /// Waits until every planned node lists every planned node up and answers `/healthz` 200.
    pub async fn wait_formed(&self) -> Duration {
        let all: Vec<usize> = (1..=self.names.len()).collect();
        let expected = self.all_names();
        self.wait_healthy_views(&all, &expected, FORM_TIMEOUT).await
    }

    /// Waits until each of `observers` lists exactly `expected` as its up members and answers
    /// `/healthz` 200; the time it took. Panics with every observer's view after `timeout`.
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
                if up_members(addr).await.as_ref() != Some(expected)
                    || health_status(addr).await != Some(200)
                {
                    done = false;
                    break;
                }
            }
            if done {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!(
                    "nodes {observers:?} did not all see {expected:?} up and healthy within \
                     {timeout:?}:\n{}",
                    self.describe(observers).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls every `every` until each of `observers` has an up-member set satisfying `pred`;
    /// the time it took from `since`, or `None` after `timeout`.
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

    /// The `/cluster` answer of each of `observers`, for failure messages.
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

    /// The first room named `{prefix}-{k}` that node `observer` places on the node `owner`.
    pub async fn room_owned_by(&self, observer: usize, owner: &str, prefix: &str) -> String {
        for k in 0..1000 {
            let room = format!("{prefix}-{k}");
            let (o, _) = placement(self.http(observer), &room).await;
            if o == owner {
                return room;
            }
        }
        panic!("no room {prefix}-* is owned by {owner}");
    }
}

/// `GET path` with a bound on the whole exchange; `None` if it fails or takes too long.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    match tokio::time::timeout(HTTP_TIMEOUT, http_get(addr, path)).await {
        Ok(Ok(response)) => Some(response),
        _ => None,
    }
}

/// The `/healthz` status code, `None` if the node does not answer.
pub async fn health_status(addr: SocketAddr) -> Option<u16> {
    get(addr, "/healthz").await.map(|(status, _)| status)
}

/// The `/cluster` answer, `None` if the node does not answer.
pub async fn cluster_view(addr: SocketAddr) -> Option<Value> {
    let (status, body) = get(addr, "/cluster").await?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// Polls every `every` until each node at `addrs` has an up-member set satisfying `pred`; the
/// time it took from `since`, or `None` after `timeout` (from `since`).
pub async fn wait_views_at(
    addrs: &[SocketAddr],
    pred: impl Fn(&BTreeSet<String>) -> bool,
    since: Instant,
    every: Duration,
    timeout: Duration,
) -> Option<Duration> {
    loop {
        let mut done = true;
        for &addr in addrs {
            match up_members(addr).await {
                Some(up) if pred(&up) => {}
                _ => {
                    done = false;
                    break;
                }
            }
        }
        if done {
            return Some(since.elapsed());
        }
        if since.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// The names a node lists with status `up`, `None` if it does not answer.
pub async fn up_members(addr: SocketAddr) -> Option<BTreeSet<String>> {
    let view = cluster_view(addr).await?;
    Some(
        view["members"]
            .as_array()?
            .iter()
            .filter(|m| m["status"] == "up")
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// A node's placement of `room`: its owner and replicas.
pub async fn placement(addr: SocketAddr, room: &str) -> (String, Vec<String>) {
    let (status, body) = get(addr, &format!("/cluster/rooms/{room}"))
        .await
        .unwrap_or_else(|| panic!("/cluster/rooms/{room} on {addr} did not answer"));
    assert_eq!(status, 200, "/cluster/rooms/{room}: {body}");
    let value: Value = serde_json::from_str(&body).expect("placement JSON");
    assert_eq!(value["room"], room.to_owned(), "{value}");
    let owner = value["owner"]
        .as_str()
        .unwrap_or_else(|| panic!("no owner: {value}"))
        .to_owned();
    let replicas = value["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas: {value}"))
        .iter()
        .map(|r| r.as_str().expect("replica name").to_owned())
        .collect();
    (owner, replicas)
}

/// A metric of the node at `addr` (`None` when absent, e.g. a counter never incremented).
pub async fn metric_value(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, body) = get(addr, "/metrics")
        .await
        .unwrap_or_else(|| panic!("/metrics on {addr} did not answer"));
    assert_eq!(status, 200, "/metrics: {body}");
    super::metric(&body, series)
}
