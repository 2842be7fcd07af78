//! Daemon confinement, tested in child processes: confinement is irreversible, so every case
//! re-executes this test binary with `BEEMESH_SANDBOX_TEST_CASE` set and checks its exit
//! status and output. The binary has its own `main` (no libtest) so that the child is
//! single-threaded when it confines itself, as the daemon is.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use beemesh_manifest::host::LandlockMode;
use beemesh_sandbox::{
    Enforcement, SIMULATE_NO_LANDLOCK_ENV, SandboxError, SandboxPolicy, confine,
};

const CASE_ENV: &str = "BEEMESH_SANDBOX_TEST_CASE";
const DIR_ENV: &str = "BEEMESH_SANDBOX_TEST_DIR";

/// Paths shared between the parent and a child case.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    fn config(&self) -> PathBuf {
        self.root.join("etc/host.toml")
    }
    fn api_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    fn podman_socket(&self) -> PathBuf {
        self.root.join("podman/podman.sock")
    }
    fn forbidden(&self) -> PathBuf {
        self.root.join("outside/secret.txt")
    }
    /// The layout of a flashed image: the config partition's copy in a directory of its own
    /// (`/run/beemesh-config`), the API socket in another (`/run/beemesh`).
    fn node_config_dir(&self) -> PathBuf {
        self.root.join("beemesh-config")
    }
    fn node_config(&self) -> PathBuf {
        self.node_config_dir().join("host.toml")
    }
    fn node_ticket(&self) -> PathBuf {
        self.node_config_dir().join("ticket")
    }
    /// A host config for the daemon's own policy builder; `socket` is the API socket.
    fn write_node_config(&self, socket: &Path) {
        std::fs::write(
            self.node_config(),
            format!(
                "[node]\ndata_dir = {:?}\n\
                 [trust]\ndomain = \"example.org\"\nsigners = [\"{SIGNER}\"]\n\
                 [api]\nsocket = {:?}\n\
                 [sandbox]\nlandlock = \"required\"\n",
                self.data().display().to_string(),
                socket.display().to_string(),
            ),
        )
        .expect("write the node config");
    }

    fn create(root: &Path) -> Self {
        let l = Layout {
            root: root.to_path_buf(),
        };
        for d in [
            l.data(),
            l.api_dir(),
            l.root.join("etc"),
            l.root.join("podman"),
            l.root.join("outside"),
            l.node_config_dir(),
        ] {
            std::fs::create_dir_all(d).expect("create test dirs");
        }
        std::fs::write(l.config(), "[trust]\ndomain = \"example.org\"\n").expect("write config");
        std::fs::write(l.forbidden(), "not for the daemon\n").expect("write secret");
        std::fs::write(l.node_ticket(), "ticket\n").expect("write ticket");
        l.write_node_config(&l.api_dir().join("api.sock"));
        l
    }

    fn policy(&self, mode: LandlockMode) -> SandboxPolicy {
        SandboxPolicy {
            landlock: mode,
            // /proc as the daemon default has it (the checks below read /proc/self/status).
            read_only: vec![self.config(), PathBuf::from("/proc")],
            read_exec: Vec::new(),
            read_write: vec![self.data(), self.api_dir()],
            sockets: vec![self.podman_socket()],
            required: vec![self.data(), self.config(), self.api_dir()],
            keep_capabilities: Vec::new(),
        }
    }
}

/// A valid operator key for the host configs of these tests.
const SIGNER: &str = "ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU=";

type CaseResult = Result<(), String>;

fn check(cond: bool, msg: impl FnOnce() -> String) -> CaseResult {
    if cond { Ok(()) } else { Err(msg()) }
}

fn proc_status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Child: confine with `required`, then prove what is denied and what still works.
fn case_confined(l: &Layout) -> CaseResult {
    // Before confinement the file outside is readable: the denial below is the sandbox's.
    std::fs::read_to_string(l.forbidden()).map_err(|e| format!("pre-check read failed: {e}"))?;
    let status = confine(&l.policy(LandlockMode::Required)).map_err(|e| format!("confine: {e}"))?;
    println!(
        "status: {}",
        serde_json::to_string(&status).unwrap_or_default()
    );
    // "partial" on kernels before ABI 9 (unix socket connects are not mediated there); the
    // filesystem rules below are enforced either way.
    check(
        status.landlock.enforcement != Enforcement::NotEnforced,
        || format!("landlock not enforced: {:?}", status.landlock),
    )?;
    check(status.landlock.abi.is_some_and(|a| a >= 1), || {
        "no ABI reported".into()
    })?;
    check(status.no_new_privs, || "no_new_privs not reported".into())?;
    check(status.capabilities.effective.is_empty(), || {
        format!("effective caps left: {:?}", status.capabilities.effective)
    })?;

    // Reading outside the allowed paths: EACCES.
    match std::fs::read_to_string(l.forbidden()) {
        Err(e) if e.raw_os_error() == Some(libc_eacces()) => println!("read outside: {e}"),
        other => {
            return Err(format!(
                "reading {} should fail with EACCES, got {other:?}",
                l.forbidden().display()
            ));
        }
    }
    match std::fs::read_to_string("/etc/hostname") {
        Err(e) if e.raw_os_error() == Some(libc_eacces()) => {}
        other => {
            return Err(format!(
                "reading /etc/hostname should fail with EACCES, got {other:?}"
            ));
        }
    }
    match std::fs::write(l.root.join("outside/new.txt"), "x") {
        Err(e) if e.raw_os_error() == Some(libc_eacces()) => {}
        other => {
            return Err(format!(
                "writing outside should fail with EACCES, got {other:?}"
            ));
        }
    }
    // What the daemon needs still works.
    std::fs::read_to_string(l.config()).map_err(|e| format!("reading the config: {e}"))?;
    std::fs::write(l.data().join("state.json"), "{}")
        .map_err(|e| format!("writing the data dir: {e}"))?;
    let api = UnixListener::bind(l.api_dir().join("api.sock"))
        .map_err(|e| format!("binding the API socket: {e}"))?;
    drop(api);
    let mut podman = UnixStream::connect(l.podman_socket())
        .map_err(|e| format!("connecting to the allowed socket: {e}"))?;
    podman
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    podman
        .write_all(b"ping\n")
        .map_err(|e| format!("writing to the allowed socket: {e}"))?;
    let mut reply = [0u8; 5];
    podman
        .read_exact(&mut reply)
        .map_err(|e| format!("reading from the allowed socket: {e}"))?;
    check(&reply == b"pong\n", || {
        format!("unexpected reply {reply:?}")
    })?;
    // The kernel agrees.
    check(proc_status_field("NoNewPrivs:") == "1", || {
        "NoNewPrivs is not 1".into()
    })?;
    check(proc_status_field("CapEff:") == "0000000000000000", || {
        format!("CapEff {}", proc_status_field("CapEff:"))
    })?;
    check(proc_status_field("CapPrm:") == "0000000000000000", || {
        format!("CapPrm {}", proc_status_field("CapPrm:"))
    })?;
    println!("confined: reads outside denied, config/data/api/podman socket usable");
    Ok(())
}

fn libc_eacces() -> i32 {
    13
}

/// Expects `result` to be an EACCES denial; `what` names the attempt.
fn denied<T: std::fmt::Debug>(what: &str, result: std::io::Result<T>) -> CaseResult {
    match result {
        Err(e) if e.raw_os_error() == Some(libc_eacces()) => {
            println!("{what}: denied ({e})");
            Ok(())
        }
        other => Err(format!("{what} should fail with EACCES, got {other:?}")),
    }
}

/// The daemon's policy as the node builds it: `SandboxPolicy::for_daemon` over the host
/// config it loaded, plus the ticket beside it (runtime/cli/src/daemon.rs).
fn node_policy(l: &Layout) -> Result<SandboxPolicy, String> {
    let host = beemesh_manifest::HostConfig::load(&l.node_config())
        .map_err(|e| format!("loading the node config: {e:?}"))?;
    let mut policy = SandboxPolicy::for_daemon(&host, &[l.node_config()], None);
    policy.read_only.push(l.node_ticket());
    Ok(policy)
}

/// Child: the node's own policy, confined. Its configuration (and the directory holding it)
/// cannot be changed, while the API socket's directory and data_dir stay writable.
fn case_node_config_read_only(l: &Layout) -> CaseResult {
    let policy = node_policy(l)?;
    // Before confinement the config is writable (the test owns it): the denials below are
    // Landlock's.
    std::fs::OpenOptions::new()
        .append(true)
        .open(l.node_config())
        .map_err(|e| format!("pre-check: the config is not writable before confinement: {e}"))?;
    let status = confine(&policy).map_err(|e| format!("confine: {e}"))?;
    check(
        status.landlock.enforcement != Enforcement::NotEnforced,
        || format!("landlock not enforced: {:?}", status.landlock),
    )?;
    let before =
        std::fs::read_to_string(l.node_config()).map_err(|e| format!("reading the config: {e}"))?;
    std::fs::read_to_string(l.node_ticket()).map_err(|e| format!("reading the ticket: {e}"))?;

    denied(
        "writing host.toml",
        std::fs::OpenOptions::new()
            .write(true)
            .open(l.node_config()),
    )?;
    denied(
        "truncating host.toml",
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(l.node_config()),
    )?;
    denied(
        "writing the ticket",
        std::fs::OpenOptions::new()
            .append(true)
            .open(l.node_ticket()),
    )?;
    denied(
        "planting a file in the config directory",
        std::fs::write(l.node_config_dir().join("signers.toml"), "x"),
    )?;
    denied(
        "replacing host.toml by rename",
        std::fs::rename(l.node_config(), l.node_config_dir().join("old.toml")),
    )?;
    denied("removing host.toml", std::fs::remove_file(l.node_config()))?;
    denied(
        "moving a planted config over host.toml from the data directory",
        std::fs::write(l.data().join("evil.toml"), "x")
            .and_then(|()| std::fs::rename(l.data().join("evil.toml"), l.node_config())),
    )?;
    denied(
        "replacing the config directory",
        std::fs::rename(l.node_config_dir(), l.root.join("moved")),
    )?;
    let after = std::fs::read_to_string(l.node_config())
        .map_err(|e| format!("reading the config again: {e}"))?;
    check(before == after, || "the config changed".into())?;

    // What the daemon writes still works.
    std::fs::write(l.data().join("state.json"), "{}")
        .map_err(|e| format!("writing the data dir: {e}"))?;
    std::fs::create_dir(l.data().join("process"))
        .map_err(|e| format!("creating a directory in the data dir: {e}"))?;
    let api = UnixListener::bind(l.api_dir().join("api.sock"))
        .map_err(|e| format!("binding the API socket: {e}"))?;
    drop(api);
    std::fs::remove_file(l.api_dir().join("api.sock"))
        .map_err(|e| format!("removing the old API socket: {e}"))?;
    println!("node policy: config read-only, API socket directory and data_dir writable");
    Ok(())
}

/// Child: a config beneath a directory the daemon may write (here the API socket's) is
/// refused before anything is applied.
fn case_node_config_beneath_a_writable_dir_is_refused(l: &Layout) -> CaseResult {
    l.write_node_config(&l.node_config_dir().join("api.sock"));
    let policy = node_policy(l)?;
    match confine(&policy) {
        Err(e @ SandboxError::ReadOnlyBeneathWritable { .. }) => {
            let msg = e.to_string();
            println!("refused: {msg}");
            check(
                msg.contains(&l.node_config().display().to_string())
                    && msg.contains(&l.node_config_dir().display().to_string()),
                || format!("the message must name both paths: {msg}"),
            )?;
            check(proc_status_field("NoNewPrivs:") == "0", || {
                "no_new_privs was set by a refused confine".into()
            })
        }
        other => Err(format!("expected a refusal, got {other:?}")),
    }
}

/// Child: Landlock absent (simulated) and `required`: confine refuses, clearly.
fn case_required_refuses(l: &Layout) -> CaseResult {
    match confine(&l.policy(LandlockMode::Required)) {
        Err(e @ SandboxError::LandlockUnavailable { .. }) => {
            let msg = e.to_string();
            println!("refused: {msg}");
            check(msg.contains("landlock = \"required\""), || {
                format!("message does not name the setting: {msg}")
            })?;
            check(msg.contains(SIMULATE_NO_LANDLOCK_ENV), || {
                format!("message does not give the reason: {msg}")
            })?;
            check(msg.contains("best-effort"), || {
                format!("message does not say how to proceed: {msg}")
            })?;
            // Nothing was applied: the process is as it was.
            check(proc_status_field("NoNewPrivs:") == "0", || {
                "no_new_privs was set by a refused confine".into()
            })?;
            Ok(())
        }
        other => Err(format!("expected a refusal, got {other:?}")),
    }
}

/// Child: Landlock absent (simulated) and `best-effort`: starts and reports.
fn case_best_effort_reports(l: &Layout) -> CaseResult {
    let status =
        confine(&l.policy(LandlockMode::BestEffort)).map_err(|e| format!("confine: {e}"))?;
    println!(
        "status: {}",
        serde_json::to_string(&status).unwrap_or_default()
    );
    check(
        status.landlock.enforcement == Enforcement::NotEnforced,
        || format!("{:?}", status.landlock),
    )?;
    check(
        status.not_enforced.iter().any(|n| n.contains("Landlock")),
        || format!("not_enforced: {:?}", status.not_enforced),
    )?;
    check(status.no_new_privs, || "no_new_privs not set".into())?;
    check(status.capabilities.effective.is_empty(), || {
        "capabilities kept".into()
    })?;
    // Without Landlock the outside file stays readable: best-effort really is weaker.
    std::fs::read_to_string(l.forbidden()).map_err(|e| format!("read outside failed: {e}"))?;
    Ok(())
}

/// (name, child body, run with Landlock absence simulated)
type Case = (&'static str, fn(&Layout) -> CaseResult, bool);

const CASES: &[Case] = &[
    (
        "confined_reads_outside_fail_with_eacces_and_allowed_socket_works",
        case_confined,
        false,
    ),
    (
        "node_policy_keeps_the_config_read_only_and_the_socket_and_data_dirs_writable",
        case_node_config_read_only,
        false,
    ),
    (
        "node_config_beneath_a_writable_directory_is_refused",
        case_node_config_beneath_a_writable_dir_is_refused,
        false,
    ),
    (
        "required_refuses_without_landlock",
        case_required_refuses,
        true,
    ),
    (
        "best_effort_starts_and_reports_without_landlock",
        case_best_effort_reports,
        true,
    ),
];

fn run_child(name: &str) -> ExitCode {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        eprintln!("{DIR_ENV} is not set");
        return ExitCode::FAILURE;
    };
    let layout = Layout {
        root: PathBuf::from(dir),
    };
    let Some((_, case, _)) = CASES.iter().find(|(n, _, _)| *n == name) else {
        eprintln!("unknown case {name}");
        return ExitCode::FAILURE;
    };
    match case(&layout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `ping` -> `pong` on the "Podman" socket until the deadline.
fn echo_server(socket: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("bind the test socket");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut buf = [0u8; 5];
                    if s.read_exact(&mut buf).is_ok() && &buf == b"ping\n" {
                        let _ = s.write_all(b"pong\n");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return,
            }
        }
    })
}

fn main() -> ExitCode {
    if let Ok(case) = std::env::var(CASE_ENV) {
        return run_child(&case);
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find the test binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selected: Vec<_> = CASES
        .iter()
        .filter(|(n, _, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, _, simulate) in selected {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = Layout::create(tmp.path());
        let server = echo_server(&layout.podman_socket());
        let mut cmd = Command::new(&exe);
        cmd.env(CASE_ENV, name)
            .env(DIR_ENV, tmp.path())
            .env_remove(SIMULATE_NO_LANDLOCK_ENV);
        if *simulate {
            cmd.env(SIMULATE_NO_LANDLOCK_ENV, "1");
        }
        let out = cmd.output().expect("run the child case");
        drop(server);
        let ok = out.status.success();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            println!(
                "--- stdout\n{}--- stderr\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            failed.push(*name);
        }
    }
    if failed.is_empty() {
        println!("\ntest result: ok");
        ExitCode::SUCCESS
    } else {
        println!("\ntest result: FAILED ({})", failed.join(", "));
        ExitCode::FAILURE
    }
}
