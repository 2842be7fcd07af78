//! The process driver inside a daemon that confines itself with Landlock, in the daemon's
//! order: the driver (and with it the workloads' namespace) is made first, then the process
//! restricts itself, then workloads start. Landlock is irreversible and a restricted process
//! may not mount anything, so every case re-executes this test binary with
//! `BEEMESH_DRIVER_TEST_CASE` set; the binary has its own `main` (no libtest), so the child
//! is single-threaded when it confines itself, as the daemon is.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use beemesh_driver::process::default_read_exec_paths;
use beemesh_driver::{ContainerDriver, DriverError, ProcessConfig, ProcessDriver, ReplicaState};
use beemesh_manifest::host::LandlockMode;
use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    path_beneath_rules,
};

const CASE_ENV: &str = "BEEMESH_DRIVER_TEST_CASE";
const DIR_ENV: &str = "BEEMESH_DRIVER_TEST_DIR";
const WAIT: Duration = Duration::from_secs(20);

/// The node's files under the test directory.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    fn socket(&self) -> PathBuf {
        self.run().join("api.sock")
    }
    fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    fn config(&self) -> PathBuf {
        self.root.join("etc/host.toml")
    }

    fn create(root: &Path) -> Self {
        let l = Layout {
            root: root.to_path_buf(),
        };
        for d in [l.run(), l.data(), l.root.join("etc")] {
            std::fs::create_dir_all(d).expect("create test dirs");
        }
        std::fs::write(l.config(), "secret-config\n").expect("write config");
        l
    }

    fn driver_config(&self) -> ProcessConfig {
        let mut config = ProcessConfig::new(self.data().join("process"));
        config.landlock = LandlockMode::Required;
        config.stop_timeout = Duration::from_secs(2);
        config.hide = vec![self.run(), self.data(), self.config()];
        config
    }
}

/// Confines this process as the daemon does with the process driver: read and execute on
/// the system paths, everything beneath the test directory (its data_dir and API socket
/// directory), read-write on /dev/null and friends.
fn confine_like_the_daemon(l: &Layout) -> Result<(), String> {
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| e.to_string();
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(
            default_read_exec_paths(),
            AccessFs::from_read(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules([&l.root], AccessFs::from_all(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            ["/dev/null", "/dev/zero", "/dev/urandom"],
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    if status.ruleset == landlock::RulesetStatus::NotEnforced {
        return Err("Landlock is not enforced on this kernel".into());
    }
    Ok(())
}

type CaseResult = Result<(), String>;

/// Child: driver first, Landlock second (the daemon's order); a workload cannot reach the
/// API socket, and still runs with its own directory.
fn case_namespace_before_landlock(l: &Layout) -> CaseResult {
    let driver = ProcessDriver::new(l.driver_config()).map_err(|e| format!("driver: {e}"))?;
    confine_like_the_daemon(l)?;
    // This process, like the daemon, is confined: it cannot make a new namespace now.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        // The script as a TOML multi-line literal string: its quotes and backslashes stay.
        let script = r#"perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]); print $s ? "api=connected\n" : "api=failed: $!\n"' "$SOCK"
if echo y > "$HOME/inside"; then echo home=written; fi
exec sleep 300"#;
        let m = common::manifest(
            "confined",
            &format!(
                "[[container]]\nname = \"main\"\nimage = \"none\"\n\
                 command = [\"/bin/sh\", \"-c\", '''{script}''']\n\
                 env = {{ SOCK = \"{}\" }}\nresources = {{ cpu = \"100m\", memory = \"64Mi\" }}\n",
                l.socket().display()
            ),
        );
        let s = common::spec(m, "sha256:confined-1");
        let status = driver.ensure(&s).await.map_err(|e| format!("ensure: {e}"))?;
        if status.state != ReplicaState::Running {
            return Err(format!("replica not running: {status:?}"));
        }
        let api = common::wait_for_log(&driver, &s.id, "api=", WAIT).await;
        println!("workload: {api}");
        let home = common::wait_for_log(&driver, &s.id, "home=", WAIT).await;
        driver.stop(&s.id).await.map_err(|e| format!("stop: {e}"))?;
        if !api.starts_with("api=failed: No such file or directory") {
            return Err(format!("the workload reached the API socket: {api}"));
        }
        if home != "home=written" {
            return Err(format!("the replica lost its directory: {home}"));
        }
        Ok(())
    })
}

/// Child: Landlock first, driver second: the namespace cannot be made, and the driver says
/// so (and why) instead of running workloads that could reach the API.
fn case_namespace_after_landlock_fails_closed(l: &Layout) -> CaseResult {
    confine_like_the_daemon(l)?;
    match ProcessDriver::new(l.driver_config()) {
        Err(e @ DriverError::Isolation(_)) => {
            let msg = e.to_string();
            println!("refused: {msg}");
            // Which step fails first depends on the ruleset (here: writing the uid map under
            // /proc, which Landlock keeps read-only); the cause must be named either way.
            if !msg.contains("cannot prepare the workloads' namespace")
                || !msg.contains("before the daemon confines itself with Landlock")
            {
                return Err(format!(
                    "the message must name the failed step and the cause: {msg}"
                ));
            }
            Ok(())
        }
        Err(e) => Err(format!("expected an isolation error, got {e}")),
        Ok(_) => Err("a confined process made the workloads' namespace".into()),
    }
}

type Case = (&'static str, fn(&Layout) -> CaseResult);

const CASES: &[Case] = &[
    (
        "namespace_made_before_landlock_keeps_workloads_of_a_confined_daemon_out",
        case_namespace_before_landlock,
    ),
    (
        "namespace_after_landlock_fails_closed_with_the_reason",
        case_namespace_after_landlock_fails_closed,
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
    let Some((_, case)) = CASES.iter().find(|(n, _)| *n == name) else {
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

/// Serves the fake API socket, counting connections, until `done` is set.
fn serve(socket: &Path, accepted: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("bind the API socket");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && accepted.load(Ordering::SeqCst) < usize::MAX / 2 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.read(&mut [0u8; 1]);
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
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, _) in selected {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical");
        let layout = Layout::create(&root);
        let accepted = Arc::new(AtomicUsize::new(0));
        let server = serve(&layout.socket(), accepted.clone());
        let out = Command::new(&exe)
            .env(CASE_ENV, name)
            .env(DIR_ENV, &root)
            .output()
            .expect("run the child case");
        let reached = accepted.swap(usize::MAX / 2, Ordering::SeqCst);
        let _ = server.join();
        let ok = out.status.success() && reached == 0;
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            println!(
                "--- connections to the API socket: {reached}\n--- stdout\n{}--- stderr\n{}",
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
