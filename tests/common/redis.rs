//! Real Redis for tests: `redis-server` processes on free ports, started and stopped by the
//! harness, and a real 3-master Redis Cluster built with `redis-cli --cluster create`.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on its own port and directory.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    cluster: bool,
    /// `cluster-node-timeout` of a cluster node, in milliseconds.
    node_timeout_ms: u32,
    /// Serves TLS only (no plain port), with the certificates in `dir`.
    tls: bool,
}

/// A port that is free now (and, for a cluster node, whose bus port, port + 10000, is free
/// too). Another program can still take it before the server binds it: [`RedisServer::spawn`]
/// retries on a fresh port when that happens.
fn free_port(cluster: bool) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !cluster || port.checked_add(10_000).is_some_and(|bus| TcpListener::bind(("127.0.0.1", bus)).is_ok()) {
            return port;
        }
    }
}

/// Attempts at starting a server on a fresh port before a test gives up.
const SPAWN_ATTEMPTS: usize = 5;

fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    redis_cli_with(port, &[], args)
}

fn redis_cli_with(port: u16, connect: &[&str], args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(connect)
        .args(args)
        .output()
        .map_err(|e| format!("redis-cli: {e} (install redis-tools)"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !text.starts_with("ERR") { Ok(text) } else { Err(text) }
}

impl RedisServer {
    pub fn start() -> Self {
        Self::spawn(false, 0)
    }

    /// A server that speaks TLS only, with a certificate for 127.0.0.1 signed by a CA of its
    /// own ([`RedisServer::ca_file`]); clients need not present certificates.
    pub fn start_tls() -> Self {
        let mut failures = Vec::new();
        for _ in 0..SPAWN_ATTEMPTS {
            let port = free_port(false);
            let mut server =
                Self { port, dir: Self::dir_for(port), child: None, cluster: false, node_timeout_ms: 0, tls: true };
            std::fs::create_dir_all(&server.dir).unwrap();
            write_certificates(&server.dir);
            match server.launch() {
                Ok(()) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server with TLS did not start: {failures:?}");
    }

    /// The PEM file of the CA that signed a [`RedisServer::start_tls`] server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn dir_for(port: u16) -> PathBuf {
        std::env::temp_dir().join(format!("pushnode-redis-{}-{port}", std::process::id()))
    }

    /// On a port the test chose (no retry elsewhere).
    pub fn start_on(port: u16) -> Self {
        Self::try_spawn(port, false, 0).unwrap_or_else(|e| panic!("{e}"))
    }

    /// On a fresh port, retried on another one if the server could not start (its port or, for
    /// a cluster node, its bus port was taken meanwhile).
    fn spawn(cluster: bool, node_timeout_ms: u32) -> Self {
        let mut failures = Vec::new();
        for _ in 0..SPAWN_ATTEMPTS {
            match Self::try_spawn(free_port(cluster), cluster, node_timeout_ms) {
                Ok(server) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start: {failures:?}");
    }

    fn try_spawn(port: u16, cluster: bool, node_timeout_ms: u32) -> Result<Self, String> {
        let dir = Self::dir_for(port);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self { port, dir, child: None, cluster, node_timeout_ms, tls: false };
        server.launch()?;
        Ok(server)
    }

    /// Starts the process and waits until *it* answers: a PING answered by another server that
    /// holds the port (ours then exits with "address in use") does not count.
    fn launch(&mut self) -> Result<(), String> {
        let mut command = Command::new("redis-server");
        if self.tls {
            let file = |name: &str| self.dir.join(name).display().to_string();
            command
                .args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"])
                .args(["--tls-cert-file", &file("server.pem"), "--tls-key-file", &file("server.key")])
                .args(["--tls-ca-cert-file", &file("ca.pem")]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            // DEBUG SLEEP stalls a server with its connections open (tests of the probe).
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &self.node_timeout_ms.to_string(),
            ]);
        }
        let child = command.spawn().expect("cannot start redis-server (install redis-server)");
        let pid = format!("process_id:{}", child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("redis-server on port {} exited at start: {status}", self.port));
            }
            if self.cli(&["INFO", "server"]).is_ok_and(|info| info.lines().any(|l| l.trim() == pid)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("redis-server on port {} never answered", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        if self.tls {
            let ca = self.ca_file().display().to_string();
            redis_cli_with(self.port, &["--tls", "--cacert", &ca], args)
        } else {
            redis_cli(self.port, args)
        }
    }

    /// Kills the server (SIGKILL: as abrupt as a crash).
    /// Freezes the server for `seconds` (DEBUG SLEEP, in the background): its connections stay
    /// open but nothing is read, answered or delivered.
    pub fn stall(&self, seconds: f64) -> Child {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "DEBUG", "SLEEP", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli")
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and, in a cluster, with the same node identity).
    pub fn restart(&mut self) {
        self.kill();
        self.launch().unwrap_or_else(|e| panic!("{e}"));
    }

    /// `PUBSUB NUMSUB channel` (or SHARDNUMSUB on a cluster node).
    pub fn numsub(&self, channel: &str) -> u64 {
        let sub = if self.cluster { "SHARDNUMSUB" } else { "NUMSUB" };
        let out = self.cli(&["PUBSUB", sub, channel]).unwrap();
        out.lines().nth(1).unwrap_or("0").trim().parse().unwrap_or(0)
    }

    /// How many times `command` ran, from `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]).unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    pub fn wait_until(&self, mut check: impl FnMut(&Self) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check(self) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh CA (`ca.pem`) and a certificate it signed for 127.0.0.1 and localhost
/// (`server.pem`, `server.key`), written into `dir`.
fn write_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "pushnode test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// A slot being moved between masters ([`RedisCluster::start_move`]).
pub struct SlotMove {
    slot: String,
    pub from: u16,
    pub to: u16,
    to_id: String,
}

/// A 3-master Redis Cluster, without replicas or with one per master.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    /// Replicas as created; after a failover one of them may be a master (see `master_for`).
    pub replicas: Vec<RedisServer>,
}

impl RedisCluster {
    /// Without replicas, and with a 5 s `cluster-node-timeout`, so that a master stalled for a
    /// test (a few seconds of DEBUG SLEEP) is never marked failed by the others.
    pub fn start() -> Self {
        Self::create(0, 5000)
    }

    /// Three masters with one replica each: a killed master fails over to its replica after the
    /// 2 s `cluster-node-timeout` (about 5 s in all, see README).
    pub fn with_replicas() -> Self {
        Self::create(1, 2000)
    }

    fn create(replicas_per_master: usize, node_timeout_ms: u32) -> Self {
        let servers: Vec<RedisServer> =
            (0..3 * (1 + replicas_per_master)).map(|_| RedisServer::spawn(true, node_timeout_ms)).collect();
        let addresses: Vec<String> = servers.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas_per_master.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        for s in &servers {
            s.wait_until(
                |s| s.cli(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok")),
                "cluster never reached state ok",
            );
        }
        let (masters, replicas): (Vec<_>, Vec<_>) =
            servers.into_iter().partition(|s| s.cli(&["ROLE"]).unwrap().starts_with("master"));
        for r in &replicas {
            r.wait_until(
                |s| s.cli(&["INFO", "replication"]).is_ok_and(|i| i.contains("master_link_status:up")),
                "replica never synced",
            );
        }
        Self { masters, replicas }
    }

    pub fn nodes(&self) -> Vec<String> {
        self.masters.iter().chain(&self.replicas).map(RedisServer::url).collect()
    }

    fn servers_mut(&mut self) -> impl Iterator<Item = &mut RedisServer> {
        self.masters.iter_mut().chain(self.replicas.iter_mut())
    }

    /// The master serving `key`'s slot (as a live server sees it).
    pub fn master_for(&mut self, key: &str) -> &mut RedisServer {
        let asked = self.masters.iter().chain(&self.replicas).find(|s| s.cli(&["PING"]).is_ok()).unwrap();
        let slot: u64 = asked.cli(&["CLUSTER", "KEYSLOT", key]).unwrap().parse().unwrap();
        let slots = asked.cli(&["CLUSTER", "SLOTS"]).unwrap();
        // Lines: start, end, ip, port, id, ... repeated per range.
        let lines: Vec<&str> = slots.lines().map(str::trim).collect();
        let mut port = None;
        for window in lines.windows(4) {
            if let (Ok(start), Ok(end)) = (window[0].parse::<u64>(), window[1].parse::<u64>())
                && window[2] == "127.0.0.1"
                && (start..=end).contains(&slot)
            {
                port = window[3].parse::<u16>().ok();
                break;
            }
        }
        let port = port.expect("slot owner not found");
        self.servers_mut().find(|m| m.port == port).unwrap()
    }

    pub fn by_port(&self, port: u16) -> &RedisServer {
        self.masters.iter().chain(&self.replicas).find(|m| m.port == port).unwrap()
    }

    /// Starts moving `key`'s slot to another master, as `redis-cli --cluster reshard` does: the
    /// target imports it, the source migrates its keys, the target takes ownership. The source
    /// keeps serving the slot's subscribers until it learns of the move, by gossip or by
    /// [`RedisCluster::finish_move`].
    pub fn start_move(&mut self, key: &str) -> SlotMove {
        let slot = self.masters[0].cli(&["CLUSTER", "KEYSLOT", key]).unwrap();
        let from = self.master_for(key).port;
        let to = self.masters.iter().map(|m| m.port).find(|p| *p != from).unwrap();
        let (source, target) = (self.by_port(from), self.by_port(to));
        let from_id = source.cli(&["CLUSTER", "MYID"]).unwrap();
        let to_id = target.cli(&["CLUSTER", "MYID"]).unwrap();
        target.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).unwrap();
        source.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).unwrap();
        let port = to.to_string();
        loop {
            let keys = source.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]).unwrap();
            let keys: Vec<&str> = keys.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            source.cli(&args).unwrap();
        }
        target.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).unwrap();
        SlotMove { slot, from, to, to_id }
    }

    /// Tells every other master the slot's new owner; the source drops the slot's sharded
    /// subscriptions (each subscriber gets an SUNSUBSCRIBE push).
    pub fn finish_move(&self, moved: &SlotMove) {
        for master in self.masters.iter().filter(|m| m.port != moved.to) {
            master.cli(&["CLUSTER", "SETSLOT", &moved.slot, "NODE", &moved.to_id]).unwrap();
        }
    }

    /// Total subscribers of a sharded channel over all masters.
    pub fn shard_numsub(&self, channel: &str) -> u64 {
        self.masters.iter().map(|m| m.numsub(channel)).sum()
    }

    pub fn calls(&self, command: &str) -> u64 {
        self.masters.iter().map(|m| m.calls(command)).sum()
    }
}
