//! Multi-host test rigs: network namespaces joined by a bridge, with real `beemesh node`
//! processes in them, configured only by the host.toml files the rig writes.
//!
//! A [`Lab`] is a hub namespace holding the bridge `br0`, plus one namespace per [`Host`],
//! joined to the bridge by a veth pair (`eth0` inside the host, `pN` on the hub) and given an
//! address from 10.231.0.0/24. Nothing is created in the root namespace, so labs of test
//! processes running side by side (their names carry the pid) never collide, not even on
//! addresses. Dropping a [`Lab`] kills whatever still runs in its namespaces and deletes them,
//! also when a test panics; labs left behind by a test process that died without unwinding
//! (SIGKILL) are swept by the next [`Lab::new`].
//!
//! Needs root and `ip` (iproute2). Tests call [`available`] first: without them it fails the
//! test when `BEEMESH_REQUIRE_NETNS=1` (CI sets it) and prints a skip notice otherwise.
//!
//! Also here: [`Cli`] (the commands an operator runs: keys, tickets, signing, apply),
//! [`Credentials`] of a test mesh, [`HostToml`], [`NodeProcess`] (start, SIGKILL, restart,
//! logs), and [`MeshPeer`], an in-process `beemesh_mesh` peer inside a namespace: the test's
//! own hand on the wire.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beemesh_mesh::{MeshConfig, MeshEvent, MeshHandle, PeerId, Validation};
use tokio_util::sync::CancellationToken;

use super::api::{Api, POLL_INTERVAL};

/// Set to `1` to make a missing capability (root, `ip`) a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "BEEMESH_REQUIRE_NETNS";
/// Every namespace of every lab starts with this, followed by the pid of the test process.
const NS_PREFIX: &str = "bmt-";
/// The test range; only ever configured inside a lab's own namespaces.
const SUBNET: [u8; 3] = [10, 231, 0];
/// Host addresses are `SUBNET.(FIRST_HOST + index)`.
const FIRST_HOST: u8 = 11;
/// The mesh port every node listens on (each namespace has its own port space).
pub const MESH_PORT: u16 = 4001;
/// Announcement interval of the rig's nodes and peers. Not shorter: every copy of a gossip
/// message costs an Ed25519 verification, about 15 ms in an unoptimised (debug) build, and a
/// node receives each announcement from most of its neighbours, so six debug nodes announcing
/// every 500 ms keep two cores busy. Tests do not wait for announcements: a direct neighbour
/// is up as soon as the admission handshake completes.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(2);
/// Declares a silent peer down; generous, so that a loaded machine does not make peers flap.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Set to keep a rig's files (host configs, keys, node logs) also when the test passes.
pub const KEEP_ENV: &str = "BEEMESH_TEST_KEEP";

/// For a rig's `Drop`: keeps its directory when the test is failing (or [`KEEP_ENV`] is set)
/// and says where it is.
pub fn keep_files_on_failure(dir: &mut Option<tempfile::TempDir>, started: Instant) {
    let failed = std::thread::panicking();
    if (failed || std::env::var_os(KEEP_ENV).is_some())
        && let Some(dir) = dir.take()
    {
        eprintln!(
            "the test {} after {:.1?}; host configs, keys and node logs are kept in {}",
            if failed { "failed" } else { "passed" },
            started.elapsed(),
            dir.keep().display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Availability

/// Whether this machine can run namespace tests: `Err` with the reason when it cannot.
pub fn probe() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("network namespace tests need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(format!("`ip -V` failed with {}", out.status)),
        Err(e) => return Err(format!("`ip` (iproute2) is not available: {e}")),
    }
    // Root in a container may still lack the right to create namespaces.
    let ns = format!("{NS_PREFIX}{}-probe", std::process::id());
    ip(&["netns", "add", &ns]).map_err(|e| format!("cannot create a network namespace: {e}"))?;
    ip(&["netns", "del", &ns]).map(drop)
}

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Call first in a namespace test and return when it says `false`. Fails the test when the
/// machine cannot run it and `BEEMESH_REQUIRE_NETNS=1`; prints a skip notice otherwise.
#[track_caller]
pub fn available(test: &str) -> bool {
    match probe() {
        Ok(()) => true,
        Err(reason) if required() => {
            panic!("{test}: {REQUIRE_ENV}=1, but this machine cannot run it: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason} (set {REQUIRE_ENV}=1 to make this a failure)");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// Runs `ip ARGS`, returning its stdout or an error naming the command and its stderr.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, String> {
    let shown = || {
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", shown()))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Processes whose network namespace is `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn sigkill(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    // Never ourselves: our threads may visit a namespace, but the process lives outside.
    if pid > 0 && pid.unsigned_abs() != std::process::id() {
        let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Removes the namespaces of labs whose test process is gone (it was killed before its
/// `Drop` could run), and the processes left running in them.
fn sweep_stale_labs() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Only a rig's nodes (and what they started) run in a rig's namespaces.
        for p in pids_in(ns) {
            sigkill(p);
        }
        match ip(&["netns", "del", ns]) {
            Ok(_) => eprintln!("removed namespace {ns} left behind by test process {pid}"),
            Err(e) => eprintln!("cannot remove stale namespace {ns}: {e}"),
        }
    }
}

/// Network namespaces joined by one bridge. See the module documentation.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    hub: Option<String>,
    hosts: Vec<Host>,
    /// Blackhole routes of a partition: (namespace, destination).
    cuts: Vec<(String, String)>,
}

/// One namespace of a [`Lab`]: a host with one interface, `eth0`, on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name given by the test (`n1`, `outsider`...).
    pub name: String,
    /// The namespace: use with `ip netns exec` or `ip -n`.
    pub ns: String,
    pub addr: Ipv4Addr,
    hub: String,
    /// The hub's end of the veth pair (its switch port).
    port: String,
}

impl Lab {
    /// Creates the hub namespace and its bridge (after sweeping labs of dead test processes).
    pub fn new() -> Result<Self, String> {
        sweep_stale_labs();
        let prefix = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            LAB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Self {
            prefix,
            hub: None,
            hosts: Vec::new(),
            cuts: Vec::new(),
        };
        let hub = format!("{}-hub", lab.prefix);
        ip(&["netns", "add", &hub])?;
        lab.hub = Some(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// Adds a host namespace, plugged into the bridge, with the next address of the range.
    /// `name`: 1 to 12 lowercase letters and digits.
    pub fn add_host(&mut self, name: &str) -> Result<Host, String> {
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!("host name {name:?}: use 1 to 12 of [a-z0-9]"));
        }
        if self.hosts.iter().any(|h| h.name == name) {
            return Err(format!("host {name} exists already"));
        }
        let hub = self.hub.clone().ok_or("the lab has no hub")?;
        let index = self.hosts.len();
        let last = u8::try_from(index)
            .ok()
            .and_then(|i| FIRST_HOST.checked_add(i))
            .filter(|a| *a < 255)
            .ok_or("the lab's /24 is full")?;
        let [a, b, c] = SUBNET;
        let host = Host {
            name: name.to_owned(),
            ns: format!("{}-{name}", self.prefix),
            addr: Ipv4Addr::new(a, b, c, last),
            hub: hub.clone(),
            port: format!("p{index}"),
        };
        ip(&["netns", "add", &host.ns])?;
        self.hosts.push(host.clone());
        let cidr = format!("{}/24", host.addr);
        ip(&[
            "-n", &hub, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ])?;
        ip(&["-n", &hub, "link", "set", &host.port, "master", "br0", "up"])?;
        ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        Ok(host)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Splits the lab: hosts in different `groups` can no longer reach each other (a blackhole
    /// route to every address of the other groups, in each host), while hosts of one group
    /// still can. Established connections across the cut stall like on a broken link.
    pub fn partition(&mut self, groups: &[&[&Host]]) -> Result<(), String> {
        for (gi, group) in groups.iter().enumerate() {
            for (gj, other) in groups.iter().enumerate() {
                if gi == gj {
                    continue;
                }
                for a in group.iter() {
                    for b in other.iter() {
                        let dst = format!("{}/32", b.addr);
                        ip(&["-n", &a.ns, "route", "add", "blackhole", &dst])?;
                        self.cuts.push((a.ns.clone(), dst));
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every cut made by [`Lab::partition`].
    pub fn heal(&mut self) -> Result<(), String> {
        while let Some((ns, dst)) = self.cuts.pop() {
            ip(&["-n", &ns, "route", "del", "blackhole", &dst])?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let all: Vec<String> = self
            .hosts
            .iter()
            .map(|h| h.ns.clone())
            .chain(self.hub.clone())
            .collect();
        for ns in &all {
            for pid in pids_in(ns) {
                sigkill(pid);
            }
        }
        for ns in &all {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

impl Host {
    /// Takes the host's switch port down: the host keeps its address but reaches nobody (a
    /// partition).
    pub fn disconnect(&self) -> Result<(), String> {
        ip(&["-n", &self.hub, "link", "set", &self.port, "down"]).map(drop)
    }

    /// Brings the switch port back up.
    pub fn reconnect(&self) -> Result<(), String> {
        ip(&["-n", &self.hub, "link", "set", &self.port, "up"]).map(drop)
    }

    /// Processes running in this host's namespace (a node and what it started).
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.ns)
    }

    /// SIGKILLs every process in the namespace: the host loses power, its workloads with it.
    pub fn kill_everything(&self) {
        for pid in self.pids() {
            sigkill(pid);
        }
    }

    /// Processes in this host's namespace whose command line is exactly `argv`.
    pub fn processes_running(&self, argv: &[&str]) -> Vec<i32> {
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        self.pids()
            .into_iter()
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
            .collect()
    }

    /// The TCP mesh address of a node on this host, with `/p2p/<peer>` when given.
    pub fn mesh_addr(&self, peer: Option<&PeerId>) -> String {
        match peer {
            Some(p) => format!("/ip4/{}/tcp/{MESH_PORT}/p2p/{p}", self.addr),
            None => format!("/ip4/{}/tcp/{MESH_PORT}", self.addr),
        }
    }

    /// Moves the calling thread into this host's network namespace (sockets it opens and
    /// threads it starts afterwards live there).
    pub fn enter(&self) -> Result<(), String> {
        let path = format!("/run/netns/{}", self.ns);
        let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let expected = file
            .metadata()
            .map_err(|e| format!("cannot stat {path}: {e}"))?
            .ino();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns({path}): {e}"))?;
        let now = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| format!("cannot stat this thread's namespace: {e}"))?
            .ino();
        if now != expected {
            return Err(format!(
                "setns({path}) returned, but the thread is in namespace {now}, not {expected}"
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's commands

/// The `beemesh` binary, run as an operator would run it.
#[derive(Debug, Clone)]
pub struct Cli {
    bin: PathBuf,
}

impl Cli {
    /// `bin`: in an integration test, `env!("CARGO_BIN_EXE_beemesh")`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        for var in ["BEEMESH_API", "BEEMESH_TOKEN", "BEEMESH_CONFIG"] {
            c.env_remove(var);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs `beemesh ARGS`: its stdout, or an error with the command, exit status and stderr.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, String> {
        let shown = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| format!("cannot run beemesh {shown}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`beemesh {shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8(out.stdout).map_err(|_| format!("`beemesh {shown}`: stdout is not UTF-8"))
    }

    fn run_json<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<serde_json::Value, String> {
        let out = self.run(args)?;
        serde_json::from_str(&out).map_err(|e| format!("not JSON ({e}): {out}"))
    }

    /// `beemesh key gen --out FILE`: the public key (`ed25519:...`).
    pub fn key_gen(&self, out: &Path) -> Result<String, String> {
        let v = self.run_json(&[
            OsStr::new("key"),
            OsStr::new("gen"),
            OsStr::new("-o"),
            OsStr::new("json"),
            OsStr::new("--out"),
            out.as_os_str(),
        ])?;
        v["public_key"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no public_key in {v}"))
    }

    /// `beemesh ticket issue`: the JSON summary (`fleet`, `peer`, `expires`...).
    pub fn ticket_issue(
        &self,
        key: &Path,
        out: &Path,
        peer: Option<&str>,
        expires: Option<&str>,
    ) -> Result<serde_json::Value, String> {
        let mut args = vec![
            OsStr::new("ticket"),
            OsStr::new("issue"),
            OsStr::new("-o"),
            OsStr::new("json"),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ];
        if let Some(p) = peer {
            args.extend([OsStr::new("--peer"), OsStr::new(p)]);
        }
        if let Some(e) = expires {
            args.extend([OsStr::new("--expires"), OsStr::new(e)]);
        }
        self.run_json(&args)
    }

    /// `beemesh sign MANIFEST --key KEY --out OUT`.
    pub fn sign(&self, manifest: &Path, key: &Path, out: &Path) -> Result<(), String> {
        self.run(&[
            OsStr::new("sign"),
            manifest.as_os_str(),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ])
        .map(drop)
    }

    /// `beemesh apply SIGNED --api SOCKET -o json`: the node's answer.
    pub fn apply(&self, api: &Api, signed: &Path) -> Result<serde_json::Value, String> {
        self.run_json(&[
            OsStr::new("apply"),
            signed.as_os_str(),
            OsStr::new("--api"),
            api.socket().as_os_str(),
            OsStr::new("-o"),
            OsStr::new("json"),
        ])
    }
}

/// The keys and fleet ticket of a test mesh, made with the CLI.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Signs workloads (`[trust] signers`).
    pub operator_key: PathBuf,
    pub operator: String,
    /// Signs tickets (`[trust] admission`).
    pub admission_key: PathBuf,
    pub admission: String,
    /// A fleet ticket of `admission`, without expiry; its ticket secret key is beside it
    /// (`fleet.ticket.key`, where `beemesh ticket issue` writes it and the nodes look for it).
    pub fleet_ticket: PathBuf,
}

impl Credentials {
    pub fn create(cli: &Cli, dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let operator_key = dir.join("operator.key");
        let admission_key = dir.join("admission.key");
        let fleet_ticket = dir.join("fleet.ticket");
        let operator = cli.key_gen(&operator_key)?;
        let admission = cli.key_gen(&admission_key)?;
        let issued = cli.ticket_issue(&admission_key, &fleet_ticket, None, None)?;
        let key_file = beemesh_manifest::ticket::default_key_path(&fleet_ticket);
        if issued["key_file"].as_str() != Some(&*key_file.to_string_lossy()) {
            return Err(format!(
                "ticket issue wrote no ticket key at {}: {issued}",
                key_file.display()
            ));
        }
        Ok(Self {
            operator_key,
            operator,
            admission_key,
            admission,
            fleet_ticket,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Host configs and node processes

/// A host.toml for a test node: TCP and QUIC on [`MESH_PORT`], no mDNS, the rig's timings,
/// Landlock off.
#[derive(Debug, Clone)]
pub struct HostToml {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub announce_interval: String,
    pub peer_timeout: String,
    pub domain: String,
    pub signers: Vec<String>,
    pub admission: String,
    pub ticket: PathBuf,
    pub api_socket: PathBuf,
    /// `[node] labels` (`rig = "netns"` by default).
    pub labels: std::collections::BTreeMap<String, String>,
    /// `[resources] reserve`, as TOML values (`cpu`, `memory`); the node's defaults when `None`.
    pub reserve: Option<(String, String)>,
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

impl HostToml {
    /// A node on `host` named after it, with its files under `dir`.
    pub fn new(host: &Host, dir: &Path, creds: &Credentials) -> Self {
        Self {
            name: host.name.clone(),
            data_dir: dir.join("data"),
            listen: vec![
                format!("/ip4/{}/tcp/{MESH_PORT}", host.addr),
                format!("/ip4/{}/udp/{MESH_PORT}/quic-v1", host.addr),
            ],
            bootstrap: Vec::new(),
            announce_interval: format!("{}ms", ANNOUNCE_INTERVAL.as_millis()),
            peer_timeout: format!("{}ms", PEER_TIMEOUT.as_millis()),
            domain: "netns.test".into(),
            signers: vec![creds.operator.clone()],
            admission: creds.admission.clone(),
            ticket: creds.fleet_ticket.clone(),
            // A directory of its own: the daemon writes there, never beside its config.
            api_socket: dir.join("run/api.sock"),
            labels: [("rig".to_owned(), "netns".to_owned())].into(),
            reserve: None,
        }
    }

    pub fn render(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{} = {}", toml_str(k), toml_str(v)))
            .collect();
        let resources = match &self.reserve {
            Some((cpu, memory)) => format!(
                "[resources]\nreserve = {{ cpu = {}, memory = {} }}\n\n",
                toml_str(cpu),
                toml_str(memory)
            ),
            None => String::new(),
        };
        format!(
            "# Written by the netns test rig.\n\
             [node]\nname = {}\ndata_dir = {}\nlabels = {{ {} }}\n\n\
             [mesh]\nlisten = {}\nbootstrap = {}\nmdns = false\nannounce_interval = {}\npeer_timeout = {}\n\n\
             [trust]\ndomain = {}\nsigners = {}\nthreshold = 1\nadmission = {}\nticket = {}\n\n\
             [runtime]\ndriver = \"process\"\n\n\
             {}\
             [api]\nsocket = {}\n\n\
             [sandbox]\nlandlock = \"off\"\n",
            toml_str(&self.name),
            toml_path(&self.data_dir),
            labels.join(", "),
            toml_list(&self.listen),
            toml_list(&self.bootstrap),
            toml_str(&self.announce_interval),
            toml_str(&self.peer_timeout),
            toml_str(&self.domain),
            toml_list(&self.signers),
            toml_str(&self.admission),
            toml_path(&self.ticket),
            resources,
            toml_path(&self.api_socket),
        )
    }
}

/// Creates (or loads) the node identity in `data_dir`, as `beemesh node` would at its first
/// start, so that its PeerId is known before it runs (for `/p2p/` bootstrap addresses).
/// Plans a node on each of `hosts`: its host.toml under `root/<host name>`, its identity made
/// ahead (so that every node can bootstrap from every other by PeerId), and `bootstrap` filled
/// with all of them. Returns (config, peer id) in the order of `hosts`.
pub fn plan_nodes(
    hosts: &[Host],
    root: &Path,
    creds: &Credentials,
) -> Result<Vec<(HostToml, String)>, String> {
    let mut planned = Vec::with_capacity(hosts.len());
    for h in hosts {
        let cfg = HostToml::new(h, &root.join(&h.name), creds);
        let id = node_identity(&cfg.data_dir)?;
        planned.push((cfg, id));
    }
    let bootstrap: Vec<String> = planned
        .iter()
        .zip(hosts)
        .map(|((_, id), h)| h.mesh_addr(Some(id)))
        .collect();
    Ok(planned
        .into_iter()
        .map(|(mut cfg, id)| {
            cfg.bootstrap = bootstrap.clone();
            (cfg, id.to_base58())
        })
        .collect())
}

pub fn node_identity(data_dir: &Path) -> Result<PeerId, String> {
    beemesh_mesh::load_or_create_identity(data_dir)
        .map(|k| k.public().to_peer_id())
        .map_err(|e| format!("node identity in {}: {e}", data_dir.display()))
}

/// Drops terminal escape sequences (colours) from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The nodes' log filter: `info`, or `BEEMESH_TEST_NODE_LOG` (e.g.
/// `info,beemesh_mesh=debug`) when set. The tests look for `info` and `warn` lines.
pub fn node_log_filter() -> String {
    std::env::var("BEEMESH_TEST_NODE_LOG").unwrap_or_else(|_| "info".to_owned())
}

/// One `beemesh node` process in a namespace, its stderr appended to a log file across
/// restarts. Dropping it kills the process (and prints the log's tail when a test fails).
#[derive(Debug)]
pub struct NodeProcess {
    name: String,
    ns: String,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    api: Api,
    child: Option<Child>,
    starts: u32,
    /// `BEEMESH_LOG` of the node; [`node_log_filter`] when `None`.
    log_filter: Option<String>,
}

impl NodeProcess {
    /// Writes `config` to `dir/host.toml`; the process starts with [`NodeProcess::start`].
    pub fn new(cli: &Cli, host: &Host, dir: &Path, config: &HostToml) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("host.toml");
        std::fs::write(&path, config.render())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        // The API socket path must fit a sockaddr_un.
        if config.api_socket.as_os_str().len() > 100 {
            return Err(format!(
                "{}: the socket path is too long for a unix socket; use a shorter TMPDIR",
                config.api_socket.display()
            ));
        }
        Ok(Self {
            name: config.name.clone(),
            ns: host.ns.clone(),
            bin: cli.bin().to_owned(),
            config: path,
            log: dir.join("node.log"),
            api: Api::new(&config.api_socket),
            child: None,
            starts: 0,
            log_filter: None,
        })
    }

    /// The node's log filter (`BEEMESH_LOG`) from its next start on.
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = Some(filter.to_owned());
    }

    /// Sends `signal` to the running node (SIGSTOP freezes it like a hung host, SIGCONT
    /// thaws it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("node {} is not running", self.name))?;
        let pid = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .map_err(|e| format!("cannot send {signal} to node {}: {e}", self.name))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn api(&self) -> &Api {
        &self.api
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts `ip netns exec NS beemesh node --config host.toml` (ip execs into beemesh, so
    /// the child is the node itself).
    pub fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err(format!("node {} is already running", self.name));
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        writeln!(
            log,
            "==== test rig: start {} of node {} in {} ====",
            self.starts, self.name, self.ns
        )
        .map_err(|e| format!("cannot write {}: {e}", self.log.display()))?;
        let stdout = log
            .try_clone()
            .map_err(|e| format!("cannot duplicate {}: {e}", self.log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .arg("node")
            .arg("--config")
            .arg(&self.config)
            .env_remove("BEEMESH_API")
            .env_remove("BEEMESH_CONFIG")
            .env_remove("RUST_LOG")
            .env(
                "BEEMESH_LOG",
                self.log_filter.clone().unwrap_or_else(node_log_filter),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The exit status when the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the API answers `/v1/status`, failing early when the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.is_none() {
                return Err(format!("node {} is not started", self.name));
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "node {} exited ({status}) before its API answered; its log ends with:\n{}",
                    self.name,
                    self.log_tail(30)
                ));
            }
            match self.api.status() {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "node {}: the API did not answer within {timeout:?} ({e}); its log ends with:\n{}",
                        self.name,
                        self.log_tail(30)
                    ));
                }
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// SIGKILL, then reap. The API socket file stays behind, as after a crash.
    pub fn kill(&mut self) -> Result<(), String> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| format!("node {} is not running", self.name))?;
        child
            .kill()
            .and_then(|()| child.wait().map(drop))
            .map_err(|e| format!("cannot kill node {}: {e}", self.name))
    }

    /// The whole log, without colours.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Log lines that contain every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of node {} ({}) ----\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(25)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-process mesh peers

/// A mesh configuration for an in-process peer on `host`: TCP on [`MESH_PORT`], the rig's
/// timings, `bootstrap` dialed at start. `ticket`: the ticket file's bytes (empty: none);
/// `ticket_key`: a fleet ticket's secret key.
pub fn mesh_config(
    host: &Host,
    keypair: beemesh_mesh::Keypair,
    admission: &str,
    ticket: Vec<u8>,
    ticket_key: Option<beemesh_manifest::SecretKey>,
    bootstrap: &[String],
) -> Result<MeshConfig, String> {
    let admission = admission
        .parse()
        .map_err(|e| format!("admission key {admission:?}: {e}"))?;
    let mut cfg = MeshConfig::new(keypair, admission, ticket, ticket_key);
    let parse = |a: &String| a.parse().map_err(|e| format!("mesh address {a:?}: {e}"));
    cfg.listen = vec![parse(&host.mesh_addr(None))?];
    cfg.bootstrap = bootstrap.iter().map(parse).collect::<Result<_, _>>()?;
    cfg.announce_interval = ANNOUNCE_INTERVAL;
    cfg.peer_timeout = PEER_TIMEOUT;
    Ok(cfg)
}

/// A `beemesh_mesh` peer running in-process, inside a host's namespace: a thread that entered
/// the namespace runs the mesh on its own runtime; the test talks to it through the
/// [`MeshHandle`] (whose futures only pass messages, so any runtime can drive them). Gossip it
/// receives is ignored; scheduler requests (`/beemesh/sched/...`) are answered empty and kept
/// for [`MeshPeer::take_requests`] (a malicious node's view of the protocol), other requests
/// are refused; the other events are recorded as text.
pub struct MeshPeer {
    name: String,
    mesh: MeshHandle,
    events: Arc<Mutex<Vec<String>>>,
    requests: Arc<Mutex<Vec<Received>>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for MeshPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshPeer")
            .field("name", &self.name)
            .field("peer_id", &self.mesh.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// A request an in-process peer received: (from, protocol, body).
pub type Received = (PeerId, String, Vec<u8>);
/// Requests an in-process peer keeps until taken.
const MAX_RECEIVED: usize = 10_000;

impl MeshPeer {
    pub fn start(name: &str, host: &Host, config: MeshConfig) -> Result<Self, String> {
        let shutdown = CancellationToken::new();
        let events = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<Result<MeshHandle, String>>();
        let host = host.clone();
        let (stop, seen, asked) = (shutdown.clone(), events.clone(), requests.clone());
        let thread = std::thread::Builder::new()
            .name(format!("mesh-peer-{name}"))
            .spawn(move || {
                let rt = host.enter().and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot build a runtime: {e}"))
                });
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(serve(config, stop, seen, asked, tx));
            })
            .map_err(|e| format!("cannot start the thread of mesh peer {name}: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build a runtime: {e}"))?;
        let mesh = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(mesh)) => mesh,
            Ok(Err(e)) => return Err(format!("mesh peer {name}: {e}")),
            Err(e) => return Err(format!("mesh peer {name} did not start: {e}")),
        };
        Ok(Self {
            name: name.to_owned(),
            mesh,
            events,
            requests,
            shutdown,
            thread: Some(thread),
            rt,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.mesh.local_peer_id()
    }

    pub fn mesh(&self) -> &MeshHandle {
        &self.mesh
    }

    /// Runs a future (typically a [`MeshHandle`] call) to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The scheduler requests received since the last call, oldest first.
    pub fn take_requests(&self) -> Vec<Received> {
        std::mem::take(&mut *self.requests.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What happened to this peer so far (`PeerUp ...`, `RefusedByPeer ...`), oldest first.
    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn serve(
    config: MeshConfig,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<String>>>,
    asked: Arc<Mutex<Vec<Received>>>,
    tx: std::sync::mpsc::Sender<Result<MeshHandle, String>>,
) {
    let (mesh, mut events) = match beemesh_mesh::spawn(config, stop.clone()).await {
        Ok(m) => m,
        Err(e) => {
            let _ = tx.send(Err(format!("cannot start the mesh: {e}")));
            return;
        }
    };
    let _ = tx.send(Ok(mesh.clone()));
    let record = |line: String| seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = events.recv() => e,
        };
        match event {
            None => break,
            Some(MeshEvent::Gossip {
                message_id,
                propagation_source,
                ..
            }) => {
                let _ = mesh
                    .validate(message_id, propagation_source, Validation::Ignore)
                    .await;
            }
            Some(MeshEvent::Request {
                peer,
                protocol,
                data,
                reply,
            }) if protocol.starts_with("/beemesh/sched/") => {
                let mut asked = asked.lock().unwrap_or_else(|p| p.into_inner());
                if asked.len() < MAX_RECEIVED {
                    asked.push((peer, protocol, data));
                }
                reply.respond(Vec::new());
            }
            Some(MeshEvent::Request { reply, .. }) => reply.refuse("a test peer answers nothing"),
            Some(MeshEvent::PeerUp { peer, .. }) => record(format!("PeerUp {peer}")),
            Some(MeshEvent::PeerDown { peer }) => record(format!("PeerDown {peer}")),
            Some(MeshEvent::PeerRejected { peer, reason }) => {
                record(format!("PeerRejected {peer}: {reason}"))
            }
            Some(MeshEvent::RefusedByPeer { peer, reason }) => {
                record(format!("RefusedByPeer {peer}: {reason}"))
            }
            Some(MeshEvent::MembershipFull { peer }) => record(format!("MembershipFull {peer}")),
            Some(MeshEvent::PeerUpdated { .. } | MeshEvent::Listening { .. }) => {}
        }
    }
    mesh.stopped().await;
}

impl Drop for MeshPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("the thread of mesh peer {} panicked", self.name);
        }
    }
}
