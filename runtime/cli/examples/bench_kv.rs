//! Key-value benchmark: a strong workload's store (a Raft group on 3 `beemesh node`
//! processes) against etcd 3.4 (3 members), side by side in one run, through one HTTP load
//! client.
//!
//! Both systems run as real processes on loopback, each member with its own data directory
//! on the same file system, with their default durability (etcd fsyncs its WAL before it
//! acknowledges a write; a BeeMesh Raft log append is fsynced before the entry counts towards
//! the quorum).
//!
//! - **etcd**: `etcd` (Debian `etcd-server`, 3.4) with three members; requests go to the v3
//!   JSON gateway: `POST /v3/kv/put` and `POST /v3/kv/range` (linearizable by default).
//! - **BeeMesh**: three `beemesh node` processes (process driver, TCP on loopback); a signed
//!   workload with `[consistency] mode = "strong"` and three replicas, one per node; requests
//!   go to each replica's state endpoint (`PUT` and `GET /v1/kv/{key}`, bearer token), whose
//!   reads are linearizable (read index).
//!
//! The load client is the same for both: one persistent HTTP/1.1 connection (hyper) per
//! client, clients spread round robin over the three members; for each number of clients, a
//! phase of writes (values of `--value-bytes`, keys cycling over `--keys`) then a phase of
//! reads (random keys, all written beforehand). Every answer is checked (status, and the value
//! read has the length written). The systems alternate at each number of clients, so that a
//! change in the machine's load during the run hits both.
//!
//! Run (no root needed):
//!
//! ```text
//! apt-get install etcd-server
//! cargo build --release -p beemesh-cli --bin beemesh
//! cargo run --release -p beemesh-cli --example bench_kv -- --clients 1,16,64 --seconds 10
//! ```

// The node API client shared with the integration tests (only part of it is used here).
#[allow(dead_code)]
#[path = "../tests/common/api.rs"]
mod api;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use beemesh_manifest::ticket::Ticket;
use beemesh_manifest::{SecretKey, SignedManifest};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;

/// Key-value benchmark: a strong workload's store against etcd (see the file's documentation).
#[derive(Debug, Parser)]
struct Args {
    /// Numbers of concurrent clients.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Length of each measured phase (writes, then reads), in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Time at the start of each phase whose operations are not counted, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Distinct keys: all written before the first phase, then overwritten in turn.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Systems to measure, in this order at each number of clients.
    #[arg(long, value_delimiter = ',', default_value = "etcd,beemesh")]
    systems: Vec<String>,
    /// The `etcd` binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// The `beemesh` binary (default: the release build next to this example).
    #[arg(long, env = "BEEMESH_BIN")]
    beemesh: Option<PathBuf>,
    /// Where the members' data directories go (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data directories and logs after the run.
    #[arg(long)]
    keep: bool,
}

/// Deadline for a cluster to form, and for a workload to be placed and running.
const READY: Duration = Duration::from_secs(120);
/// Deadline of one request.
const REQUEST: Duration = Duration::from_secs(30);
/// Interval between readiness probes.
const POLL: Duration = Duration::from_millis(100);
/// The workload's name.
const WORKLOAD: &str = "benchkv";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients: give numbers of clients above 0");
    }
    if args.seconds <= args.warmup {
        bail!("--seconds must exceed --warmup");
    }
    if args.keys == 0 || args.value_bytes == 0 {
        bail!("--keys and --value-bytes must be above 0");
    }
    for s in &args.systems {
        if s != "etcd" && s != "beemesh" {
            bail!("--systems: unknown system {s:?} (etcd, beemesh)");
        }
    }
    let want = |s: &str| args.systems.iter().any(|x| x == s);
    let etcd_version = if want("etcd") {
        Some(etcd_version(&args.etcd)?)
    } else {
        None
    };
    let beemesh = if want("beemesh") {
        Some(match &args.beemesh {
            Some(p) => p.clone(),
            None => default_beemesh()?,
        })
    } else {
        None
    };
    let work = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("{}", d.display()))?;
            tempfile::Builder::new()
                .prefix("bench-kv")
                .tempdir_in(d)
                .context("a temporary directory")?
        }
        None => tempfile::Builder::new()
            .prefix("bench-kv")
            .tempdir()
            .context("a temporary directory")?,
    };

    println!("# Key-value benchmark: beemesh (strong) vs etcd");
    println!(
        "machine: {} cores, kernel {}, load average at start {}",
        cores(),
        kernel(),
        loadavg()
    );
    println!(
        "data directories under {} ({})",
        work.path().display(),
        filesystem(work.path())
    );
    if let Some(v) = &etcd_version {
        println!("etcd: {} ({v})", args.etcd.display());
    }
    if let Some(b) = &beemesh {
        println!("beemesh: {} ({})", b.display(), env!("CARGO_PKG_VERSION"));
    }
    println!(
        "{}-byte values, {} keys, phases of {} s ({} s warm-up not counted), clients {:?}",
        args.value_bytes, args.keys, args.seconds, args.warmup, args.clients
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("the load client's runtime")?;
    let value: Vec<u8> = (0..args.value_bytes)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let mut ports = Ports::new(27400);

    // Start both clusters, then measure them in turn.
    let mut clusters: Vec<Cluster> = Vec::new();
    for s in &args.systems {
        let started = Instant::now();
        let cluster = if s == "etcd" {
            start_etcd(&args.etcd, &work.path().join("etcd"), &mut ports)?
        } else {
            let bin = beemesh.as_deref().context("the beemesh binary")?;
            start_beemesh(bin, &work.path().join("beemesh"), &mut ports)?
        };
        println!(
            "{}: 3 members ready after {:.1} s",
            cluster.label,
            started.elapsed().as_secs_f64()
        );
        let preload = rt.block_on(preload(&cluster, &value, args.keys))?;
        println!(
            "{}: {} keys written in {:.1} s",
            cluster.label,
            args.keys,
            preload.as_secs_f64()
        );
        clusters.push(cluster);
    }

    let mut rows = Vec::new();
    let counter = Arc::new(AtomicU64::new(0));
    for &n in &args.clients {
        for c in &clusters {
            for op in [Op::Write, Op::Read] {
                let phase = Phase {
                    op,
                    clients: n,
                    warmup: Duration::from_secs(args.warmup),
                    length: Duration::from_secs(args.seconds),
                    keys: args.keys,
                    value: &value,
                };
                let row = rt.block_on(measure(c, &phase, counter.clone()))?;
                println!("{}", row.markdown());
                rows.push(row);
            }
        }
    }

    println!("\nload average at the end {}", loadavg());
    println!(
        "\n| system | op | clients | ops/s | p50 | p99 | errors | server CPU (3 members) | client CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.markdown());
    }
    drop(clusters);
    if args.keep {
        let kept = work.keep();
        println!("\ndata and logs kept in {}", kept.display());
    }
    Ok(())
}

fn etcd_version(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| {
        anyhow!(
            "cannot run {}: {e}. Install etcd 3.4: apt-get install etcd-server (or pass --etcd PATH, \
             or --systems beemesh)",
            bin.display()
        )
    })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .trim()
        .to_owned())
}

fn default_beemesh() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    // target/<profile>/examples/bench_kv -> target/<profile>/beemesh
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

/// The file system a path is on, as `/proc/mounts` names it (device and type).
fn filesystem(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "?".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && path.starts_with(f[1])).then(|| (f[1].len(), f[0], f[2]))
        })
        .max_by_key(|(len, _, _)| *len)
        .map_or_else(|| "?".into(), |(_, dev, ty)| format!("{dev}, {ty}"))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A member process, killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("log file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    /// The last lines of the process's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running; the exit status if not.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user plus system) a process has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the command.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// Hands out loopback ports that were free when asked.
struct Ports {
    next: u16,
}

impl Ports {
    fn new(first: u16) -> Self {
        Self { next: first }
    }

    fn next(&mut self) -> anyhow::Result<u16> {
        while self.next < 60000 {
            let p = self.next;
            self.next += 1;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return Ok(p);
            }
        }
        bail!("no free loopback port left")
    }
}

/// Where a client sends its requests.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// BeeMesh: the replica's bearer token.
    token: Option<String>,
}

/// A running cluster of three members.
struct Cluster {
    label: &'static str,
    kind: Kind,
    targets: Vec<Target>,
    procs: Vec<Proc>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Etcd,
    Beemesh,
}

impl Cluster {
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            if let Some(status) = p.exited() {
                bail!(
                    "{} member {i} exited: {status}; the end of {}:\n{}",
                    self.label,
                    p.log.display(),
                    p.log_tail()
                );
            }
        }
        Ok(())
    }

    fn cpu(&self) -> Duration {
        self.procs.iter().filter_map(|p| cpu_time(p.pid())).sum()
    }
}

fn start_etcd(bin: &Path, dir: &Path, ports: &mut Ports) -> anyhow::Result<Cluster> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut members = Vec::new();
    for i in 0..3 {
        members.push((format!("m{i}"), ports.next()?, ports.next()?));
    }
    let initial: Vec<String> = members
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect();
    let initial = initial.join(",");
    let mut procs = Vec::new();
    let mut targets = Vec::new();
    for (name, client, peer) in &members {
        let data = dir.join(name);
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=bench-kv")
            .arg("--logger=zap")
            .arg("--log-level=warn");
        procs.push(Proc::spawn(&mut cmd, &dir.join(format!("{name}.log")))?);
        targets.push(Target {
            addr: SocketAddr::from(([127, 0, 0, 1], *client)),
            token: None,
        });
    }
    let mut cluster = Cluster {
        label: "etcd",
        kind: Kind::Etcd,
        targets,
        procs,
    };
    // Ready when every member reports itself healthy (it has a leader and answers).
    let deadline = Instant::now() + READY;
    for t in cluster.targets.clone() {
        loop {
            cluster.check_alive()?;
            let last = match http_once(t.addr, "GET", "/health", None, &[]) {
                Ok((200, body)) if String::from_utf8_lossy(&body).contains("\"true\"") => break,
                Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "etcd member at {} not healthy after {READY:?}: {last}",
                    t.addr
                );
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(cluster)
}

fn start_beemesh(bin: &Path, dir: &Path, ports: &mut Ports) -> anyhow::Result<Cluster> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let admission = SecretKey::generate().context("an admission key")?;
    let operator = SecretKey::generate().context("an operator key")?;
    let ticket = dir.join("fleet.ticket");
    let (fleet, ticket_key) = Ticket::issue_fleet(&admission, OffsetDateTime::now_utc(), None)?;
    std::fs::write(&ticket, fleet.to_toml()).with_context(|| format!("{}", ticket.display()))?;
    ticket_key.save_new(&beemesh_manifest::ticket::default_key_path(&ticket))?;

    let mut procs = Vec::new();
    let mut apis = Vec::new();
    let mut first: Option<String> = None;
    let mut datas = Vec::new();
    for i in 0..3 {
        let name = format!("n{i}");
        let home = dir.join(&name);
        let data = home.join("data");
        let peer = beemesh_mesh::load_or_create_identity(&data)
            .with_context(|| format!("identity of {name}"))?
            .public()
            .to_peer_id();
        let port = ports.next()?;
        let bootstrap = first
            .as_ref()
            .map_or_else(String::new, |a| format!("{a:?}"));
        // The socket's directory is the daemon's to write: the configuration lies beside it.
        let socket = home.join("run").join("api.sock");
        let config = format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\n\n\
             [mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\nbootstrap = [{bootstrap}]\nmdns = false\n\n\
             [trust]\ndomain = \"bench.test\"\nsigners = [\"{}\"]\nadmission = \"{}\"\nticket = \"{}\"\n\n\
             [runtime]\ndriver = \"process\"\n\n[api]\nsocket = \"{}\"\n\n[sandbox]\nlandlock = \"off\"\n",
            data.display(),
            operator.public(),
            admission.public(),
            ticket.display(),
            socket.display(),
        );
        let path = home.join("host.toml");
        std::fs::write(&path, config).with_context(|| format!("{}", path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["node", "--config"])
            .arg(&path)
            .env("BEEMESH_LOG", "warn")
            .env("NO_COLOR", "1");
        procs.push(Proc::spawn(&mut cmd, &home.join("node.log"))?);
        apis.push(api::Api::new(socket));
        datas.push(data);
        if first.is_none() {
            first = Some(format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"));
        }
    }
    let mut cluster = Cluster {
        label: "beemesh",
        kind: Kind::Beemesh,
        targets: Vec::new(),
        procs,
    };
    let deadline = Instant::now() + READY;
    let wait =
        |cluster: &mut Cluster, what: &str, probe: &mut dyn FnMut() -> Result<(), String>| {
            loop {
                cluster.check_alive()?;
                let last = match probe() {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                };
                if Instant::now() >= deadline {
                    bail!("beemesh: {what} not within {READY:?}: {last}");
                }
                std::thread::sleep(POLL);
            }
        };
    // Every node sees the two others.
    wait(&mut cluster, "a mesh of 3 nodes", &mut || {
        for a in &apis {
            let peers = a.peers().map_err(|e| e.to_string())?;
            if peers.len() < 2 {
                return Err(format!(
                    "{} sees {} peers",
                    a.socket().display(),
                    peers.len()
                ));
            }
        }
        Ok(())
    })?;
    let manifest = format!(
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"{WORKLOAD}\"\ngeneration = 1\n\n\
         [placement]\nreplicas = 3\nspread = \"node\"\n\n\
         [consistency]\nmode = \"strong\"\n\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"86400\"]\n\
         resources = {{ cpu = \"10m\", memory = \"8Mi\" }}\n"
    );
    let mut signed = SignedManifest::new(manifest);
    signed
        .add_signature("bench", &operator)
        .context("signing the workload")?;
    let (status, answer) = apis[0]
        .apply(&signed.to_toml())
        .map_err(|e| anyhow!("applying the workload: {e}"))?;
    if !(200..300).contains(&status) {
        bail!("applying the workload: {status} {answer}");
    }
    // Three replicas running (for a strong workload: once every host is a voter of the
    // group), one endpoint on each node.
    let mut targets = Vec::new();
    wait(&mut cluster, "3 running replicas", &mut || {
        let r = apis[0]
            .request("GET", &format!("/v1/workloads/default/{WORKLOAD}"), None)
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = r.json().map_err(|e| e.to_string())?;
        if v["running"] != 3 {
            return Err(format!("running: {}", v["running"]));
        }
        targets.clear();
        for data in &datas {
            let found = (0..3).find_map(|i| {
                endpoint(
                    &data
                        .join("replicas")
                        .join(format!("bm_default_{WORKLOAD}_{i}")),
                )
            });
            match found {
                Some(t) => targets.push(t),
                None => return Err(format!("no endpoint under {}", data.display())),
            }
        }
        Ok(())
    })?;
    // Every replica's store answers a write.
    for t in &targets {
        let t = t.clone();
        wait(&mut cluster, "a first write", &mut || match http_once(
            t.addr,
            "PUT",
            "/v1/kv/ready",
            t.token.as_deref(),
            b"1",
        ) {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status} {}", String::from_utf8_lossy(&body))),
            Err(e) => Err(e.to_string()),
        })?;
    }
    cluster.targets = targets;
    Ok(cluster)
}

/// A replica's endpoint as its node wrote it down (process driver).
fn endpoint(replica_dir: &Path) -> Option<Target> {
    let port = std::fs::read_to_string(replica_dir.join("port")).ok()?;
    let token = std::fs::read_to_string(replica_dir.join("token")).ok()?;
    Some(Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port.trim().parse().ok()?)),
        token: Some(token.trim().to_owned()),
    })
}

/// One blocking HTTP/1.1 request on a new connection (readiness probes only): status, body.
fn http_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the answer's head")?;
    let status = String::from_utf8_lossy(&raw[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status in the answer")?;
    // Enough for probes: a body sent with a length or until the connection closed.
    Ok((status, raw[split + 4..].to_vec()))
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

struct Phase<'a> {
    op: Op,
    clients: usize,
    warmup: Duration,
    length: Duration,
    keys: usize,
    value: &'a [u8],
}

fn key(i: u64) -> String {
    format!("bench/{i:08}")
}

/// One client's persistent connection.
struct Conn {
    target: Target,
    kind: Kind,
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Conn {
    async fn open(target: &Target, kind: Kind) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            target: target.clone(),
            kind,
            sender,
            driver,
        })
    }

    /// Writes `value` under `key`.
    async fn put(&mut self, key: &str, value: &[u8], value_b64: &str) -> anyhow::Result<()> {
        let req = match self.kind {
            Kind::Etcd => {
                let body = format!(
                    "{{\"key\":\"{}\",\"value\":\"{value_b64}\"}}",
                    B64.encode(key)
                );
                self.request(Method::POST, "/v3/kv/put", body.into_bytes())?
            }
            Kind::Beemesh => self.request(Method::PUT, &format!("/v1/kv/{key}"), value.to_vec())?,
        };
        let (status, body) = self.send(req).await?;
        if status != 200 {
            bail!("writing {key}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Reads `key` and checks that its value has `len` bytes.
    async fn get(&mut self, key: &str, len: usize) -> anyhow::Result<()> {
        let req = match self.kind {
            Kind::Etcd => {
                let body = format!("{{\"key\":\"{}\"}}", B64.encode(key));
                self.request(Method::POST, "/v3/kv/range", body.into_bytes())?
            }
            Kind::Beemesh => self.request(Method::GET, &format!("/v1/kv/{key}"), Vec::new())?,
        };
        let (status, body) = self.send(req).await?;
        if status != 200 {
            bail!("reading {key}: {status} {}", String::from_utf8_lossy(&body));
        }
        let got = match self.kind {
            Kind::Etcd => {
                let v: serde_json::Value =
                    serde_json::from_slice(&body).context("etcd's answer is not JSON")?;
                let value = v["kvs"][0]["value"]
                    .as_str()
                    .with_context(|| format!("reading {key}: no value in {v}"))?;
                B64.decode(value).context("etcd's value")?.len()
            }
            Kind::Beemesh => body.len(),
        };
        if got != len {
            bail!("reading {key}: {got} bytes, {len} written");
        }
        Ok(())
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.target.addr.to_string());
        if let Some(t) = &self.target.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if self.kind == Kind::Etcd {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        Ok(req.body(Full::new(Bytes::from(body)))?)
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        let exchange = async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(REQUEST, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {REQUEST:?}"))?
    }
}

/// Writes every key once, with 16 clients.
async fn preload(cluster: &Cluster, value: &[u8], keys: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let value_b64 = Arc::new(B64.encode(value));
    let value = Arc::new(value.to_vec());
    let mut tasks = Vec::new();
    for c in 0..16 {
        let target = cluster.targets[c % cluster.targets.len()].clone();
        let (kind, next, value, value_b64) =
            (cluster.kind, next.clone(), value.clone(), value_b64.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&target, kind).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys as u64 {
                    return anyhow::Ok(());
                }
                conn.put(&key(i), &value, &value_b64).await?;
            }
        }));
    }
    for t in tasks {
        t.await.context("a preload task")??;
    }
    Ok(started.elapsed())
}

/// One client's observations.
#[derive(Default)]
struct Observed {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

struct Row {
    label: &'static str,
    op: Op,
    clients: usize,
    ops_per_s: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    first_error: Option<String>,
    cpu_percent: f64,
    client_cpu_percent: f64,
}

impl Row {
    fn markdown(&self) -> String {
        let op = match self.op {
            Op::Write => "write",
            Op::Read => "read",
        };
        let errors = match &self.first_error {
            Some(e) => format!("{} (first: {e})", self.errors),
            None => self.errors.to_string(),
        };
        format!(
            "| {} | {op} | {} | {:.0} | {} | {} | {errors} | {:.0} % | {:.0} % |",
            self.label,
            self.clients,
            self.ops_per_s,
            ms(self.p50),
            ms(self.p99),
            self.cpu_percent,
            self.client_cpu_percent,
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs one phase against one cluster: `clients` clients, each on its own connection.
async fn measure(
    cluster: &Cluster,
    phase: &Phase<'_>,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<Row> {
    // Connections are opened before the clock starts.
    let mut conns = Vec::new();
    for c in 0..phase.clients {
        let target = &cluster.targets[c % cluster.targets.len()];
        conns.push(Conn::open(target, cluster.kind).await?);
    }
    let start = Instant::now();
    let counted_from = start + phase.warmup;
    let stop = start + phase.length;
    let cpu_before = Arc::new(std::sync::Mutex::new(None));
    // The servers' and the load client's CPU over the counted part of the phase.
    let sampler = {
        let pids: Vec<u32> = cluster.procs.iter().map(Proc::pid).collect();
        let cpu_before = cpu_before.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(counted_from.into()).await;
            let cpu: Duration = pids.iter().filter_map(|p| cpu_time(*p)).sum();
            let own = cpu_time(std::process::id()).unwrap_or_default();
            if let Ok(mut b) = cpu_before.lock() {
                *b = Some((Instant::now(), cpu, own));
            }
        })
    };
    let value_b64 = Arc::new(B64.encode(phase.value));
    let value = Arc::new(phase.value.to_vec());
    let keys = phase.keys as u64;
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let (counter, value, value_b64) = (counter.clone(), value.clone(), value_b64.clone());
        let op = phase.op;
        tasks.push(tokio::spawn(async move {
            let mut seen = Observed::default();
            let mut rng = XorShift::new(c as u64 + 1);
            loop {
                let began = Instant::now();
                if began >= stop {
                    break;
                }
                let k = match op {
                    Op::Write => counter.fetch_add(1, Ordering::Relaxed) % keys,
                    Op::Read => rng.next() % keys,
                };
                let result = match op {
                    Op::Write => conn.put(&key(k), &value, &value_b64).await,
                    Op::Read => conn.get(&key(k), value.len()).await,
                };
                let took = began.elapsed();
                match result {
                    Ok(()) if began >= counted_from => seen
                        .latencies_us
                        .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
                    Ok(()) => {}
                    Err(e) => {
                        seen.errors += 1;
                        if seen.first_error.is_none() {
                            seen.first_error = Some(format!("{e:#}"));
                        }
                        // A failed exchange may leave the connection unusable.
                        if let Ok(fresh) = Conn::open(&conn.target, conn.kind).await {
                            conn = fresh;
                        }
                    }
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let seen = t.await.context("a client task")?;
        all.extend(seen.latencies_us);
        errors += seen.errors;
        if first_error.is_none() {
            first_error = seen.first_error;
        }
    }
    let (now, servers, own) = (
        Instant::now(),
        cluster.cpu(),
        cpu_time(std::process::id()).unwrap_or_default(),
    );
    let _ = sampler.await;
    let (cpu_percent, client_cpu_percent) = match cpu_before.lock().ok().and_then(|b| *b) {
        Some((at, servers0, own0)) => {
            let wall = now.saturating_duration_since(at).as_secs_f64();
            let share = |after: Duration, before: Duration| {
                if wall > 0.0 {
                    100.0 * after.saturating_sub(before).as_secs_f64() / wall
                } else {
                    0.0
                }
            };
            (share(servers, servers0), share(own, own0))
        }
        None => (0.0, 0.0),
    };
    all.sort_unstable();
    let counted = (phase.length - phase.warmup).as_secs_f64();
    let pct = |p: f64| {
        if all.is_empty() {
            return Duration::ZERO;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        Duration::from_micros(u64::from(all[i]))
    };
    Ok(Row {
        label: cluster.label,
        op: phase.op,
        clients: phase.clients,
        ops_per_s: all.len() as f64 / counted,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
        first_error,
        cpu_percent,
        client_cpu_percent,
    })
}

/// A small random number generator for picking keys (xorshift64*).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
