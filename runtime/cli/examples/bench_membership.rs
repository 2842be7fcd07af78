//! Membership benchmark: BeeMesh (`beemesh node`) and HashiCorp Serf side by side.
//!
//! For each cluster size N, both systems run N members on loopback (distinct ports), and the
//! benchmark measures, over several rounds:
//!
//! - **join**: a new member is started (joining through the first member); the time from its
//!   spawn until every one of the N members lists it;
//! - **failure**: that member is killed with SIGKILL; the time until no member lists it as alive
//!   any more;
//! - **idle**: resident memory (`VmRSS`) and CPU of the members while the cluster idles.
//!
//! BeeMesh members are polled with `GET /v1/peers` on their API sockets, Serf agents with the
//! `members` command of their RPC (the protocol behind `serf members -rpc-addr=...`), both at
//! the same interval. Failure detection is dominated by each system's timing settings, which
//! are printed with the figures: BeeMesh `announce_interval`/`peer_timeout` (from host.toml),
//! Serf's `-profile` (memberlist's probe interval, probe timeout and suspicion multiplier).
//!
//! Run (a release build of the `beemesh` binary is needed next to the example):
//!
//! ```text
//! cargo build --release -p beemesh-cli --bin beemesh
//! cargo run --release -p beemesh-cli --example bench_membership -- --sizes 5,10,20 --rounds 3
//! ```
//!
//! `serf` must be on PATH (Debian: `apt-get install serf`). Nothing needs root.

// The node API client shared with the integration tests (only part of it is used here).
#[allow(dead_code)]
#[path = "../tests/common/api.rs"]
mod api;

use std::collections::BTreeSet;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use beemesh_manifest::SecretKey;
use beemesh_manifest::ticket::Ticket;
use clap::Parser;
use time::OffsetDateTime;

/// Membership benchmark: BeeMesh against Serf (see the file's documentation).
#[derive(Debug, Parser)]
struct Args {
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
    sizes: Vec<usize>,
    /// Join and failure measurements per size and system.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Polling interval for both systems, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// How long a formed cluster idles before memory and CPU are read, in seconds.
    #[arg(long, default_value_t = 5)]
    idle_s: u64,
    /// BeeMesh timings to measure, as ANNOUNCE_INTERVAL/PEER_TIMEOUT pairs.
    #[arg(long, value_delimiter = ',', default_value = "500ms/3s,2s/8s")]
    beemesh_timing: Vec<String>,
    /// Serf timing profile.
    #[arg(long, default_value = "lan")]
    serf_profile: String,
    /// The `beemesh` binary (default: the release build next to this example).
    #[arg(long, env = "BEEMESH_BIN")]
    beemesh: Option<PathBuf>,
    /// The `serf` binary.
    #[arg(long, default_value = "serf")]
    serf: PathBuf,
}

/// Deadline for any one wait (formation, a join, a failure).
const DEADLINE: Duration = Duration::from_secs(90);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let beemesh = match &args.beemesh {
        Some(p) => p.clone(),
        None => default_beemesh()?,
    };
    let serf_version = Command::new(&args.serf)
        .arg("version")
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (install Serf: apt-get install serf)",
                args.serf.display()
            )
        })?;
    let serf_version = String::from_utf8_lossy(&serf_version.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .trim()
        .to_owned();
    let poll = Duration::from_millis(args.poll_ms);
    let work = tempfile::Builder::new()
        .prefix("bmbench")
        .tempdir()
        .context("a temporary directory")?;
    let mut ports = Ports::new(27100);

    println!("# Membership benchmark: beemesh vs serf");
    println!(
        "machine: {} cores, kernel {}, load average at start {}",
        cores(),
        kernel(),
        loadavg()
    );
    println!(
        "beemesh: {} ({})",
        beemesh.display(),
        env!("CARGO_PKG_VERSION")
    );
    println!("serf: {serf_version}, profile {}", args.serf_profile);
    println!(
        "poll interval {} ms for both; {} rounds per size; loopback, TCP for beemesh (no QUIC, no mDNS)",
        args.poll_ms, args.rounds
    );

    let mut rows = Vec::new();
    for &n in &args.sizes {
        if n < 2 {
            bail!("--sizes: a cluster needs at least 2 members, not {n}");
        }
        for timing in &args.beemesh_timing {
            let (announce, timeout) = timing.split_once('/').with_context(|| {
                format!("--beemesh-timing {timing:?}: expected ANNOUNCE/TIMEOUT")
            })?;
            let dir = work.path().join(format!("bm-{n}-{}", rows.len()));
            let system = Beemesh::new(&beemesh, &dir, announce, timeout)?;
            rows.push(run(system, n, &args, poll, &mut ports)?);
        }
        let system = Serf {
            bin: args.serf.clone(),
            profile: args.serf_profile.clone(),
            dir: work.path().join(format!("serf-{n}")),
        };
        rows.push(run(system, n, &args, poll, &mut ports)?);
    }

    println!("\nload average at the end {}", loadavg());
    println!(
        "\n| N | system | settings | formation | join, median (min–max) | failure detected, median (min–max) | idle RSS per member, median (max) | idle CPU per member |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.markdown());
    }
    Ok(())
}

fn default_beemesh() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    // target/<profile>/examples/bench_membership -> target/<profile>/beemesh
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("beemesh"))
        .context("unexpected location of this program")?;
    if !candidate.exists() {
        bail!(
            "{} does not exist: build it first with `cargo build --release -p beemesh-cli --bin beemesh` \
             (or pass --beemesh PATH)",
            candidate.display()
        );
    }
    Ok(candidate)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Systems under test

/// One running member of a cluster.
struct Member {
    name: String,
    child: Child,
    view: View,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a member is asked whom it sees.
enum View {
    Beemesh(api::Api),
    /// Connected lazily: the agent's RPC listener appears a little after its process.
    Serf {
        addr: SocketAddr,
        rpc: Option<SerfRpc>,
    },
}

impl Member {
    /// The names of the members this one sees alive, or `None` when it does not answer (yet).
    fn alive(&mut self) -> Option<BTreeSet<String>> {
        match &mut self.view {
            View::Beemesh(api) => api
                .peers()
                .ok()
                .map(|ps| ps.into_iter().map(|p| p.name).collect()),
            View::Serf { addr, rpc } => {
                if rpc.is_none() {
                    *rpc = SerfRpc::connect(*addr).ok();
                }
                let result = rpc.as_mut()?.members();
                match result {
                    Ok(ms) => Some(
                        ms.into_iter()
                            .filter(|(name, status)| status == "alive" && *name != self.name)
                            .map(|(name, _)| name)
                            .collect(),
                    ),
                    Err(_) => {
                        *rpc = None;
                        None
                    }
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

trait System {
    /// How the system is named and configured in the results.
    fn label(&self) -> String;
    fn settings(&self) -> String;
    /// Starts member `name`; `seed`: the member to join through (`None` for the first).
    fn spawn(
        &mut self,
        name: &str,
        seed: Option<&Seed>,
        ports: &mut Ports,
    ) -> anyhow::Result<(Member, Seed)>;
}

/// What a new member needs to join through an existing one.
#[derive(Clone)]
enum Seed {
    Beemesh(String),
    Serf(SocketAddr),
}

struct Beemesh {
    bin: PathBuf,
    dir: PathBuf,
    announce: String,
    timeout: String,
    admission: String,
    ticket: PathBuf,
    signer: String,
}

impl Beemesh {
    fn new(bin: &Path, dir: &Path, announce: &str, timeout: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let admission = SecretKey::generate().context("an admission key")?;
        let operator = SecretKey::generate().context("an operator key")?;
        let now = OffsetDateTime::now_utc();
        let ticket = dir.join("fleet.ticket");
        let (fleet, ticket_key) = Ticket::issue_fleet(&admission, now, None)?;
        std::fs::write(&ticket, fleet.to_toml())
            .with_context(|| format!("{}", ticket.display()))?;
        // Beside the ticket, where the nodes look for it by default (this run's own file).
        let key_file = beemesh_manifest::ticket::default_key_path(&ticket);
        let _ = std::fs::remove_file(&key_file);
        ticket_key.save_new(&key_file)?;
        Ok(Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            announce: announce.to_owned(),
            timeout: timeout.to_owned(),
            admission: admission.public().to_string(),
            ticket,
            signer: operator.public().to_string(),
        })
    }
}

impl System for Beemesh {
    fn label(&self) -> String {
        "beemesh".into()
    }

    fn settings(&self) -> String {
        format!(
            "announce_interval {}, peer_timeout {}",
            self.announce, self.timeout
        )
    }

    fn spawn(
        &mut self,
        name: &str,
        seed: Option<&Seed>,
        ports: &mut Ports,
    ) -> anyhow::Result<(Member, Seed)> {
        let dir = self.dir.join(name);
        let data = dir.join("data");
        let peer = beemesh_mesh::load_or_create_identity(&data)
            .with_context(|| format!("identity of {name}"))?
            .public()
            .to_peer_id();
        let port = ports.next_tcp()?;
        let addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}");
        let bootstrap = match seed {
            Some(Seed::Beemesh(a)) => format!("[\"{a}\"]"),
            _ => "[]".into(),
        };
        let socket = dir.join("api.sock");
        let config = format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\n\n\
             [mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\nbootstrap = {bootstrap}\nmdns = false\n\
             announce_interval = \"{}\"\npeer_timeout = \"{}\"\n\n\
             [trust]\ndomain = \"bench.test\"\nsigners = [\"{}\"]\nadmission = \"{}\"\nticket = \"{}\"\n\n\
             [runtime]\ndriver = \"process\"\n\n[api]\nsocket = \"{}\"\n\n[sandbox]\nlandlock = \"off\"\n",
            data.display(),
            self.announce,
            self.timeout,
            self.signer,
            self.admission,
            self.ticket.display(),
            socket.display(),
        );
        let path = dir.join("host.toml");
        std::fs::write(&path, config).with_context(|| format!("{}", path.display()))?;
        let log = std::fs::File::create(dir.join("node.log")).context("node log")?;
        let child = Command::new(&self.bin)
            .args(["node", "--config"])
            .arg(&path)
            .env("BEEMESH_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let member = Member {
            name: name.to_owned(),
            child,
            view: View::Beemesh(api::Api::new(socket)),
        };
        Ok((member, Seed::Beemesh(addr)))
    }
}

struct Serf {
    bin: PathBuf,
    profile: String,
    dir: PathBuf,
}

impl System for Serf {
    fn label(&self) -> String {
        "serf".into()
    }

    fn settings(&self) -> String {
        let detail = match self.profile.as_str() {
            "lan" => " (probe interval 1s, probe timeout 500ms, suspicion mult 4, gossip 200ms)",
            "local" => " (probe interval 1s, probe timeout 200ms, suspicion mult 3, gossip 100ms)",
            "wan" => " (probe interval 5s, probe timeout 3s, suspicion mult 6, gossip 500ms)",
            _ => "",
        };
        format!("-profile={}{detail}", self.profile)
    }

    fn spawn(
        &mut self,
        name: &str,
        seed: Option<&Seed>,
        ports: &mut Ports,
    ) -> anyhow::Result<(Member, Seed)> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("{}", self.dir.display()))?;
        let bind = ports.next_tcp_and_udp()?;
        let rpc = ports.next_tcp()?;
        let bind_addr = SocketAddr::from(([127, 0, 0, 1], bind));
        let rpc_addr = SocketAddr::from(([127, 0, 0, 1], rpc));
        let log =
            std::fs::File::create(self.dir.join(format!("{name}.log"))).context("agent log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("agent")
            .arg(format!("-node={name}"))
            .arg(format!("-bind={bind_addr}"))
            .arg(format!("-rpc-addr={rpc_addr}"))
            .arg(format!("-profile={}", self.profile))
            .arg("-log-level=warn");
        if let Some(Seed::Serf(s)) = seed {
            cmd.arg(format!("-join={s}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("agent log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let member = Member {
            name: name.to_owned(),
            child,
            view: View::Serf {
                addr: rpc_addr,
                rpc: None,
            },
        };
        Ok((member, Seed::Serf(bind_addr)))
    }
}

/// Hands out loopback ports that were free when asked.
struct Ports {
    next: u16,
}

impl Ports {
    fn new(first: u16) -> Self {
        Self { next: first }
    }

    fn take(&mut self, udp_too: bool) -> anyhow::Result<u16> {
        while self.next < 60000 {
            let p = self.next;
            self.next += 1;
            let tcp = TcpListener::bind(("127.0.0.1", p)).is_ok();
            let udp = !udp_too || UdpSocket::bind(("127.0.0.1", p)).is_ok();
            if tcp && udp {
                return Ok(p);
            }
        }
        bail!("no free loopback port left")
    }

    fn next_tcp(&mut self) -> anyhow::Result<u16> {
        self.take(false)
    }

    fn next_tcp_and_udp(&mut self) -> anyhow::Result<u16> {
        self.take(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement

struct Row {
    n: usize,
    label: String,
    settings: String,
    formation: Duration,
    joins: Vec<Duration>,
    failures: Vec<Duration>,
    rss_kib: Vec<u64>,
    cpu_percent: Vec<f64>,
}

impl Row {
    fn markdown(&self) -> String {
        let rss = if self.rss_kib.is_empty() {
            "?".to_owned()
        } else {
            format!(
                "{:.1} MiB ({:.1})",
                median_u64(&self.rss_kib) as f64 / 1024.0,
                self.rss_kib.iter().max().copied().unwrap_or(0) as f64 / 1024.0
            )
        };
        let cpu = if self.cpu_percent.is_empty() {
            "?".to_owned()
        } else {
            let mut v = self.cpu_percent.clone();
            v.sort_by(f64::total_cmp);
            format!("{:.1} %", v[v.len() / 2])
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {rss} | {cpu} |",
            self.n,
            self.label,
            self.settings,
            secs(self.formation),
            spread(&self.joins),
            spread(&self.failures),
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn spread(v: &[Duration]) -> String {
    if v.is_empty() {
        return "?".into();
    }
    let mut v = v.to_vec();
    v.sort();
    format!(
        "{} ({}–{})",
        secs(v[v.len() / 2]),
        secs(v[0]),
        secs(v[v.len() - 1])
    )
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn run(
    mut system: impl System,
    n: usize,
    args: &Args,
    poll: Duration,
    ports: &mut Ports,
) -> anyhow::Result<Row> {
    let label = system.label();
    println!("\n## N = {n}: {label} ({})", system.settings());
    let started = Instant::now();
    let (first, seed) = system.spawn("m00", None, ports)?;
    let mut members = vec![first];
    // The seed answers before the others join it (serf's -join fails otherwise).
    wait_until(&format!("{label} m00 to answer"), poll, || {
        members[0].alive().is_some()
    })?;
    for i in 1..n {
        let (m, _) = system.spawn(&format!("m{i:02}"), Some(&seed), ports)?;
        members.push(m);
    }
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    wait_until(
        &format!("{label}: {n} members to see each other"),
        poll,
        || {
            let mut all = true;
            for m in members.iter_mut() {
                let others: BTreeSet<String> =
                    names.iter().filter(|x| **x != m.name).cloned().collect();
                all &= m.alive().is_some_and(|seen| others.is_subset(&seen));
            }
            all
        },
    )?;
    let formation = started.elapsed();
    println!("formed in {}", secs(formation));

    // Idle: memory and CPU of every member over the idle window.
    let before: Vec<Option<u64>> = members.iter().map(|m| cpu_ticks(m.pid())).collect();
    let idle_start = Instant::now();
    std::thread::sleep(Duration::from_secs(args.idle_s));
    let idle = idle_start.elapsed().as_secs_f64();
    let hz = 100.0; // USER_HZ on Linux
    let cpu_percent: Vec<f64> = members
        .iter()
        .zip(&before)
        .filter_map(|(m, b)| Some((cpu_ticks(m.pid())? - (*b)?) as f64 / hz / idle * 100.0))
        .collect();
    let rss_kib: Vec<u64> = members.iter().filter_map(|m| rss_kib(m.pid())).collect();

    let mut joins = Vec::new();
    let mut failures = Vec::new();
    for round in 0..args.rounds {
        let name = format!("j{round:02}");
        // Join: from the spawn of the new member until every member lists it.
        let spawned = Instant::now();
        let (mut newcomer, _) = system.spawn(&name, Some(&seed), ports)?;
        let join = time_until_all(&mut members, spawned, poll, |seen| seen.contains(&name))
            .with_context(|| format!("{label} N={n}: {name} to be seen by every member"))?;
        // Before killing it, it must have joined completely (it sees everyone too).
        wait_until(
            &format!("{label}: {name} to see every member"),
            poll,
            || {
                newcomer
                    .alive()
                    .is_some_and(|seen| names.iter().all(|x| seen.contains(x)))
            },
        )?;
        // Failure: from SIGKILL until no member lists it as alive.
        let killed = Instant::now();
        newcomer.child.kill().context("SIGKILL")?;
        let failure = time_until_all(&mut members, killed, poll, |seen| !seen.contains(&name))
            .with_context(|| format!("{label} N={n}: {name} to be seen gone by every member"))?;
        let _ = newcomer.child.wait();
        println!(
            "round {}: join {} (spawn to last member), failure {} (SIGKILL to last member)",
            round + 1,
            secs(join),
            secs(failure)
        );
        joins.push(join);
        failures.push(failure);
    }
    Ok(Row {
        n,
        label,
        settings: system.settings(),
        formation,
        joins,
        failures,
        rss_kib,
        cpu_percent,
    })
}

/// Polls every member until `holds` is true of what each sees; returns the time from `t0` to
/// the answer with which the last member first satisfied it.
fn time_until_all(
    members: &mut [Member],
    t0: Instant,
    poll: Duration,
    holds: impl Fn(&BTreeSet<String>) -> bool,
) -> anyhow::Result<Duration> {
    let mut done: Vec<Option<Duration>> = vec![None; members.len()];
    loop {
        let round = Instant::now();
        for (m, d) in members.iter_mut().zip(done.iter_mut()) {
            if d.is_none() && m.alive().is_some_and(|seen| holds(&seen)) {
                *d = Some(t0.elapsed());
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().max().unwrap_or_default());
        }
        if t0.elapsed() > DEADLINE {
            let missing: Vec<&str> = members
                .iter()
                .zip(&done)
                .filter(|(_, d)| d.is_none())
                .map(|(m, _)| m.name.as_str())
                .collect();
            bail!("timed out after {DEADLINE:?}; not yet: {missing:?}");
        }
        std::thread::sleep(poll.saturating_sub(round.elapsed()));
    }
}

fn wait_until(what: &str, poll: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > DEADLINE {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        std::thread::sleep(poll);
    }
    Ok(())
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

// ---------------------------------------------------------------------------------------------
// Serf's RPC: MessagePack over TCP (https://github.com/hashicorp/serf/blob/master/docs/agent/rpc.html.markdown).

/// A connection to one agent's RPC listener, after the handshake.
struct SerfRpc {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    seq: u64,
}

const RPC_TIMEOUT: Duration = Duration::from_secs(5);

impl SerfRpc {
    fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, RPC_TIMEOUT)?;
        stream.set_read_timeout(Some(RPC_TIMEOUT))?;
        stream.set_write_timeout(Some(RPC_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut rpc = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            seq: 0,
        };
        let mut body = Vec::new();
        msgpack::write_map(&mut body, &[("Version", msgpack::Value::UInt(1))]);
        rpc.call("handshake", Some(&body))?;
        Ok(rpc)
    }

    /// Sends a command and reads the response header; the caller reads the body, if any.
    fn call(&mut self, command: &str, body: Option<&[u8]>) -> io::Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let mut out = Vec::new();
        msgpack::write_map(
            &mut out,
            &[
                ("Command", msgpack::Value::Str(command.to_owned())),
                ("Seq", msgpack::Value::UInt(seq)),
            ],
        );
        if let Some(b) = body {
            out.extend_from_slice(b);
        }
        self.writer.write_all(&out)?;
        let header = msgpack::read(&mut self.reader)?;
        let got = header.get("Seq").and_then(msgpack::Value::as_u64);
        if got != Some(seq) {
            return Err(bad(format!("response to seq {seq} carries seq {got:?}")));
        }
        match header.get("Error").and_then(msgpack::Value::as_str) {
            None | Some("") => Ok(()),
            Some(e) => Err(bad(format!("serf {command}: {e}"))),
        }
    }

    /// `members`: every member's name and status (alive, leaving, left, failed).
    fn members(&mut self) -> io::Result<Vec<(String, String)>> {
        self.call("members", None)?;
        let body = msgpack::read(&mut self.reader)?;
        let list = body
            .get("Members")
            .and_then(msgpack::Value::as_array)
            .ok_or_else(|| bad("members: no Members array".into()))?;
        Ok(list
            .iter()
            .filter_map(|m| {
                Some((
                    m.get("Name")?.as_str()?.to_owned(),
                    m.get("Status")?.as_str()?.to_owned(),
                ))
            })
            .collect())
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The part of MessagePack that Serf's RPC uses: maps with string keys written; any value read.
mod msgpack {
    use std::io::{self, Read};

    /// Longest string, binary or container accepted (a members list of thousands fits).
    const MAX_LEN: usize = 16 << 20;
    const MAX_DEPTH: usize = 32;

    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Nil,
        Bool(bool),
        Int(i64),
        UInt(u64),
        Float(f64),
        Str(String),
        Bin(Vec<u8>),
        Array(Vec<Value>),
        Map(Vec<(Value, Value)>),
        Ext(i8, Vec<u8>),
    }

    impl Value {
        /// The value of `key` in a map with string keys.
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(key))
                    .map(|(_, v)| v),
                _ => None,
            }
        }

        /// Strings, and binary that is UTF-8 (older encoders write strings as raw bytes).
        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Str(s) => Some(s),
                Value::Bin(b) => std::str::from_utf8(b).ok(),
                _ => None,
            }
        }

        pub fn as_u64(&self) -> Option<u64> {
            match self {
                Value::UInt(u) => Some(*u),
                Value::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Array(a) => Some(a),
                _ => None,
            }
        }
    }

    fn write_str(out: &mut Vec<u8>, s: &str) {
        let len = s.len();
        if len < 32 {
            out.push(0xa0 | len as u8);
        } else if len <= usize::from(u8::MAX) {
            out.extend_from_slice(&[0xd9, len as u8]);
        } else if len <= usize::from(u16::MAX) {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        out.extend_from_slice(s.as_bytes());
    }

    fn write_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Str(s) => write_str(out, s),
            Value::UInt(u) if *u < 128 => out.push(*u as u8),
            Value::UInt(u) => {
                out.push(0xcf);
                out.extend_from_slice(&u.to_be_bytes());
            }
            // Nothing else is ever sent.
            other => unreachable!("msgpack::write_value({other:?}) is not implemented"),
        }
    }

    /// A map of at most 15 entries with string keys.
    pub fn write_map(out: &mut Vec<u8>, entries: &[(&str, Value)]) {
        assert!(entries.len() < 16, "a fixmap holds at most 15 entries");
        out.push(0x80 | entries.len() as u8);
        for (k, v) in entries {
            write_str(out, k);
            write_value(out, v);
        }
    }

    fn byte(r: &mut impl Read) -> io::Result<u8> {
        let mut b = [0; 1];
        r.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn bytes(r: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
        if n > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("msgpack: {n} bytes is too long"),
            ));
        }
        let mut v = vec![0; n];
        r.read_exact(&mut v)?;
        Ok(v)
    }

    fn be(r: &mut impl Read, width: usize) -> io::Result<u64> {
        let b = bytes(r, width)?;
        Ok(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    }

    fn len(r: &mut impl Read, width: usize) -> io::Result<usize> {
        usize::try_from(be(r, width)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "msgpack: length"))
    }

    /// A length of `width` bytes, then that many bytes.
    fn sized(r: &mut impl Read, width: usize) -> io::Result<Vec<u8>> {
        let n = len(r, width)?;
        bytes(r, n)
    }

    /// Reads one value.
    pub fn read(r: &mut impl Read) -> io::Result<Value> {
        read_at(r, 0)
    }

    fn read_at(r: &mut impl Read, depth: usize) -> io::Result<Value> {
        if depth > MAX_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "msgpack: nested too deeply",
            ));
        }
        let str_of = |b: Vec<u8>| {
            String::from_utf8(b).map(Value::Str).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "msgpack: string is not UTF-8")
            })
        };
        let tag = byte(r)?;
        Ok(match tag {
            0x00..=0x7f => Value::UInt(u64::from(tag)),
            0x80..=0x8f => read_map(r, usize::from(tag & 0x0f), depth)?,
            0x90..=0x9f => read_array(r, usize::from(tag & 0x0f), depth)?,
            0xa0..=0xbf => str_of(bytes(r, usize::from(tag & 0x1f))?)?,
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => Value::Bin(sized(r, 1)?),
            0xc5 => Value::Bin(sized(r, 2)?),
            0xc6 => Value::Bin(sized(r, 4)?),
            0xc7..=0xc9 => {
                let n = len(r, 1 << (tag - 0xc7))?;
                let t = byte(r)? as i8;
                Value::Ext(t, bytes(r, n)?)
            }
            0xca => Value::Float(f64::from(f32::from_bits(be(r, 4)? as u32))),
            0xcb => Value::Float(f64::from_bits(be(r, 8)?)),
            0xcc..=0xcf => Value::UInt(be(r, 1 << (tag - 0xcc))?),
            0xd0 => Value::Int(i64::from(be(r, 1)? as u8 as i8)),
            0xd1 => Value::Int(i64::from(be(r, 2)? as u16 as i16)),
            0xd2 => Value::Int(i64::from(be(r, 4)? as u32 as i32)),
            0xd3 => Value::Int(be(r, 8)? as i64),
            0xd4..=0xd8 => {
                let t = byte(r)? as i8;
                Value::Ext(t, bytes(r, 1 << (tag - 0xd4))?)
            }
            0xd9 => str_of(sized(r, 1)?)?,
            0xda => str_of(sized(r, 2)?)?,
            0xdb => str_of(sized(r, 4)?)?,
            0xdc => {
                let n = len(r, 2)?;
                read_array(r, n, depth)?
            }
            0xdd => {
                let n = len(r, 4)?;
                read_array(r, n, depth)?
            }
            0xde => {
                let n = len(r, 2)?;
                read_map(r, n, depth)?
            }
            0xdf => {
                let n = len(r, 4)?;
                read_map(r, n, depth)?
            }
            0xe0..=0xff => Value::Int(i64::from(tag as i8)),
            0xc1 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "msgpack: reserved byte 0xc1",
                ));
            }
        })
    }

    fn read_array(r: &mut impl Read, n: usize, depth: usize) -> io::Result<Value> {
        if n > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "msgpack: array too long",
            ));
        }
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(read_at(r, depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn read_map(r: &mut impl Read, n: usize, depth: usize) -> io::Result<Value> {
        if n > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "msgpack: map too long",
            ));
        }
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let k = read_at(r, depth + 1)?;
            let val = read_at(r, depth + 1)?;
            v.push((k, val));
        }
        Ok(Value::Map(v))
    }
}
