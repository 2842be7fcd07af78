//! `beemesh dev` as a new user meets it: start the real binary with a fresh HOME, XDG
//! directories and TMPDIR, read what it prints, run the printed shell commands as printed (in
//! `sh`, with a PATH that does not know where `beemesh` is), then poll `beemesh get workloads
//! -o json` until the example's replicas run on distinct dev nodes. Ctrl-C (SIGINT) must end
//! `dev` with status 0, stop every replica and remove its directory.
//!
//! - The process driver: as root `auto` means processes; as another user the test points
//!   XDG_RUNTIME_DIR at an empty directory, so no Podman socket answers and `auto` falls back.
//! - Rootless Podman: as root the test runs `dev` as the user `.ci/setup-podman` prepares
//!   (`BEEMESH_TEST_USER`, default `beemesh-test`), as another user as that user, with the real
//!   XDG_RUNTIME_DIR. Without a working rootless Podman it prints `SKIPPED` and passes, unless
//!   `BEEMESH_REQUIRE_PODMAN=1` (CI), which makes that a failure.
//! - The stateful examples on a dev mesh: `examples/counter.toml` (eventual state) with both
//!   drivers, and `examples/kube/statefulset.yaml` (strong state, converted with `beemesh kube
//!   convert`) with rootless Podman.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_beemesh");
/// A PATH without the directory of the binary under test, as a new user's shell has.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Bounds on each wait (the build machines are small and shared).
const START: Duration = Duration::from_secs(120);
const PLACE: Duration = Duration::from_secs(120);
const STOP: Duration = Duration::from_secs(60);

/// Who runs `dev` and the printed commands.
#[derive(Debug, Clone)]
struct RunAs {
    /// `None`: this process's user.
    ids: Option<(u32, u32)>,
    /// XDG_RUNTIME_DIR: a fresh directory, or the user's real one (where Podman's socket is).
    runtime_dir: Option<PathBuf>,
}

impl RunAs {
    fn apply(&self, cmd: &mut Command, home: &Path, tmp: &Path) {
        cmd.env_clear()
            .env("PATH", SYSTEM_PATH)
            .env("HOME", home)
            .env("TMPDIR", tmp)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env(
                "XDG_RUNTIME_DIR",
                self.runtime_dir.clone().unwrap_or_else(|| tmp.join("run")),
            );
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
    }
}

/// A running `beemesh dev` and what it printed up to its instructions.
struct Dev {
    child: Option<Child>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    /// The state directory it announced.
    root: PathBuf,
    /// `driver: ...` line.
    driver: String,
    /// Node names it announced.
    nodes: Vec<String>,
    /// The shell commands under "In another shell:".
    commands: Vec<String>,
}

impl Dev {
    fn start(nodes: u16, run_as: &RunAs, home: &Path, tmp: &Path) -> Dev {
        let mut cmd = Command::new(BIN);
        cmd.args(["dev", "--nodes", &nodes.to_string()])
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_as.apply(&mut cmd, home, tmp);
        let mut child = cmd.spawn().expect("beemesh dev starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprint!("[dev stderr] {text}");
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&text);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut dev = Dev {
            child: Some(child),
            stdout: Vec::new(),
            stderr,
            root: PathBuf::new(),
            driver: String::new(),
            nodes: Vec::new(),
            commands: Vec::new(),
        };
        let deadline = Instant::now() + START;
        while dev.stdout.last().is_none_or(|l| !l.starts_with("Ctrl-C")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    println!("[dev] {line}");
                    dev.stdout.push(line);
                }
                Err(_) => panic!(
                    "beemesh dev printed no instructions within {START:?}; stdout: {:#?}; stderr: {}",
                    dev.stdout,
                    dev.stderr()
                ),
            }
        }
        // Keep draining stdout so dev never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        dev.parse();
        dev
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn parse(&mut self) {
        let lines = &self.stdout;
        self.root = lines
            .iter()
            .find_map(|l| l.split_once(", state in ").map(|(_, d)| PathBuf::from(d)))
            .unwrap_or_else(|| panic!("no `state in DIR` line: {lines:#?}"));
        self.driver = lines
            .iter()
            .find_map(|l| l.strip_prefix("driver: "))
            .unwrap_or_else(|| panic!("no `driver:` line: {lines:#?}"))
            .to_owned();
        self.nodes = lines
            .iter()
            .filter(|l| l.contains("  api "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        let start = lines
            .iter()
            .position(|l| l == "In another shell:")
            .unwrap_or_else(|| panic!("no `In another shell:` line: {lines:#?}"));
        self.commands = lines[start + 1..]
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
            .collect();
    }

    /// The value the printed commands export as BEEMESH_API.
    fn api(&self) -> String {
        self.commands
            .iter()
            .find_map(|c| c.strip_prefix("export BEEMESH_API="))
            .unwrap_or_else(|| panic!("no `export BEEMESH_API=`: {:#?}", self.commands))
            .to_owned()
    }

    /// The example the printed `beemesh sign` command signs.
    fn example(&self) -> beemesh_manifest::Manifest {
        let path = self
            .commands
            .iter()
            .find_map(|c| {
                let mut words = c.split_whitespace();
                (words.next() == Some("beemesh") && words.next() == Some("sign"))
                    .then(|| words.next())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no `beemesh sign FILE`: {:#?}", self.commands));
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        beemesh_manifest::Manifest::from_toml(path, &text).expect("the example is valid")
    }

    /// Runs the printed commands in `sh -e`, as a user pasting them into a new shell.
    fn run_printed_commands(&self, run_as: &RunAs, home: &Path, tmp: &Path) -> String {
        assert!(
            self.commands
                .iter()
                .any(|c| c.starts_with("beemesh apply ")),
            "no apply command: {:#?}",
            self.commands
        );
        let script = self.commands.join("\n");
        let mut cmd = Command::new("sh");
        cmd.args(["-e", "-c", &script]).current_dir(home);
        run_as.apply(&mut cmd, home, tmp);
        let out = cmd.output().expect("sh runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("[printed commands]\n{script}\n[their output]\n{text}");
        assert!(
            out.status.success(),
            "the printed commands failed ({}):\n{script}\n{text}",
            out.status
        );
        text
    }

    /// Polls `beemesh get workloads -o json` until `replicas` replicas of the example run on
    /// distinct dev nodes; returns those nodes.
    fn wait_running(&self, ns: &str, name: &str, replicas: usize) -> BTreeSet<String> {
        let api = self.api();
        let deadline = Instant::now() + PLACE;
        loop {
            let out = Command::new(BIN)
                .args(["get", "workloads", "-o", "json"])
                .env("BEEMESH_API", &api)
                .output()
                .expect("beemesh get workloads runs");
            let last = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && let Some(w) = v.as_array().into_iter().flatten().find(|w| {
                    w["namespace"].as_str() == Some(ns) && w["name"].as_str() == Some(name)
                })
            {
                let running: Vec<String> = w["placements"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["state"].as_str() == Some("running"))
                    .filter_map(|p| p["node"].as_str().map(str::to_owned))
                    .collect();
                let distinct: BTreeSet<String> = running.iter().cloned().collect();
                if running.len() == replicas && distinct.len() == replicas {
                    return distinct;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{ns}/{name} did not get {replicas} running replicas on distinct nodes within {PLACE:?}; last answer: {last}; dev stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Ctrl-C: SIGINT, then the exit status.
    fn interrupt(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("dev is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, Signal::SIGINT).expect("SIGINT to dev");
        let deadline = Instant::now() + STOP;
        loop {
            if let Some(status) = child.try_wait().expect("wait for dev") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "beemesh dev did not exit within {STOP:?} of SIGINT; stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    /// A failed test still stops dev (and so its replicas).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
            }
            let deadline = Instant::now() + STOP;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Processes of this machine whose working directory is inside `dir` (the process driver
/// runs each replica in its directory).
fn processes_inside(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(dir) {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A fresh HOME and TMPDIR, owned by `ids` when given.
fn sandbox(ids: Option<(u32, u32)>) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix("beemesh-dev-test-")
        .tempdir()
        .expect("tempdir");
    let home = t.path().join("home");
    let tmp = t.path().join("tmp");
    for d in [&home, &tmp, &tmp.join("run")] {
        std::fs::create_dir_all(d).expect("mkdir");
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).expect("chown");
        }
    }
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(t.path(), Some(uid), Some(gid)).expect("chown");
    }
    (t, home, tmp)
}

/// The whole first try: start, follow the printed commands, see replicas, Ctrl-C.
fn first_try(nodes: u16, run_as: &RunAs, expect_driver: &str) -> Option<Dev> {
    let (_t, home, tmp) = sandbox(run_as.ids);
    let mut dev = Dev::start(nodes, run_as, &home, &tmp);
    if !dev.driver.starts_with(expect_driver) {
        return Some(dev);
    }
    assert!(
        dev.root.starts_with(&tmp),
        "dev's directory {} is in TMPDIR",
        dev.root.display()
    );
    assert_eq!(dev.nodes.len(), usize::from(nodes), "{:#?}", dev.stdout);
    let said = dev.run_printed_commands(run_as, &home, &tmp);
    // The printed `beemesh logs` shows the example's output.
    assert!(
        said.contains(" from replica "),
        "no replica output among the printed commands' output: {said}"
    );
    let example = dev.example();
    let replicas = usize::try_from(example.placement.replicas).expect("replicas");
    assert_eq!(
        replicas,
        usize::from(nodes.min(3)),
        "one replica per node, up to 3"
    );
    let on = dev.wait_running(&example.namespace, &example.name, replicas);
    let known: BTreeSet<String> = dev.nodes.iter().cloned().collect();
    assert!(
        on.is_subset(&known),
        "replicas on {on:?}, dev nodes {known:?}"
    );
    println!("{}/{} running on {on:?}", example.namespace, example.name);

    let status = dev.interrupt();
    assert!(
        status.success(),
        "beemesh dev exits 0 on SIGINT, got {status}; stderr: {}",
        dev.stderr()
    );
    assert!(
        !dev.root.exists(),
        "beemesh dev removes {} on exit",
        dev.root.display()
    );
    let left = processes_inside(&dev.root);
    assert!(left.is_empty(), "replica processes outlived dev: {left:#?}");
    assert!(
        dev.stderr().contains(&format!(
            "stopped {replicas} replica{}",
            if replicas == 1 { "" } else { "s" }
        )),
        "dev stops its replicas: {}",
        dev.stderr()
    );
    None
}

/// As root `auto` means the process driver; as another user, an empty XDG_RUNTIME_DIR has no
/// Podman socket, so `auto` falls back to it too.
fn process_user() -> RunAs {
    RunAs {
        ids: None,
        runtime_dir: None,
    }
}

#[test]
fn three_nodes_run_the_printed_example_with_the_process_driver() {
    if let Some(dev) = first_try(3, &process_user(), "process") {
        panic!("expected the process driver, got `{}`", dev.driver);
    }
}

#[test]
fn one_node_places_at_once_in_solo_mode() {
    // Without solo mode a lone node that is given a workload in its first seconds never
    // places it (it waits for peers); the printed commands run right after dev is ready.
    if let Some(dev) = first_try(1, &process_user(), "process") {
        panic!("expected the process driver, got `{}`", dev.driver);
    }
}

/// The user whose rootless Podman the test uses, and its runtime directory.
/// The tests that run `beemesh dev` on rootless Podman share one user's Podman, and every
/// `dev` names its nodes dev-1, dev-2, ...: a node stops the labelled replicas of its own
/// name that it does not want (`beemesh_driver::reconcile`), so two of them at once would
/// stop each other's replicas. They take turns.
fn podman_dev_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

fn podman_user() -> Result<RunAs, String> {
    if !is_root() {
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(format!("/run/user/{uid}")), PathBuf::from);
        return Ok(RunAs {
            ids: None,
            runtime_dir: Some(dir),
        });
    }
    let user = std::env::var("BEEMESH_TEST_USER").unwrap_or_else(|_| "beemesh-test".into());
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user.as_str()) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    });
    let Some((uid, gid)) = ids else {
        return Err(format!(
            "no user {user} (run .ci/setup-podman as root to create it)"
        ));
    };
    Ok(RunAs {
        ids: Some((uid, gid)),
        runtime_dir: Some(PathBuf::from(format!("/run/user/{uid}"))),
    })
}

/// The home directory of `uid`, from /etc/passwd.
fn home_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 5 && f[2] == uid.to_string()).then(|| f[5].to_owned())
    })
}

/// True if a Podman API answers on `socket` (GET /_ping).
fn podman_answers(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.contains(" 200 ")
}

/// Runs the Podman CLI against the user's API socket, as that user.
fn podman(run_as: &RunAs, socket: &Path, args: &[&str]) -> std::process::Output {
    let url = format!("unix://{}", socket.display());
    let mut cmd = Command::new("podman");
    cmd.args(["--url", &url]).args(args).current_dir("/");
    if let Some((uid, gid)) = run_as.ids {
        // Podman reads its configuration under the user's own home.
        cmd.uid(uid).gid(gid).env_clear().env("PATH", SYSTEM_PATH);
        if let Some(home) = home_of(uid) {
            cmd.env("HOME", home);
        }
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("podman {args:?} runs: {e}"))
}

/// A Podman test without rootless Podman: `SKIPPED`, or a failure under
/// `BEEMESH_REQUIRE_PODMAN=1`.
fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("BEEMESH_REQUIRE_PODMAN").is_ok_and(|v| v == "1") {
        panic!("{reason} (BEEMESH_REQUIRE_PODMAN=1; run .ci/setup-podman as root)");
    }
    eprintln!("SKIPPED {test}: {reason} (set BEEMESH_REQUIRE_PODMAN=1 to fail instead)");
}

#[test]
fn three_nodes_run_the_printed_example_with_rootless_podman() {
    const TEST: &str = "three_nodes_run_the_printed_example_with_rootless_podman";
    let _turn = podman_dev_turn();
    let run_as = match podman_user() {
        Ok(r) => r,
        Err(reason) => return skip_or_fail(TEST, &reason),
    };
    let socket = run_as
        .runtime_dir
        .clone()
        .unwrap_or_default()
        .join("podman/podman.sock");
    if !podman_answers(&socket) {
        return skip_or_fail(
            TEST,
            &format!("no rootless Podman API answers at {}", socket.display()),
        );
    }
    // `auto` must pick Podman here; if it does not, dev says why (for example no image).
    if let Some(dev) = first_try(3, &run_as, "podman") {
        return skip_or_fail(
            TEST,
            &format!("beemesh dev did not pick Podman: driver: {}", dev.driver),
        );
    }
    // Its pods are gone too.
    let out = podman(
        &run_as,
        &socket,
        &["ps", "--all", "--format", "{{.Names}} {{.Labels}}"],
    );
    assert!(
        out.status.success(),
        "podman ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let left: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("io.beemesh.node:dev-") && l.contains("io.beemesh.workload:hello"))
        .collect();
    assert!(left.is_empty(), "dev's containers outlived it: {left:#?}");
}

/// The stateful example (examples/counter.toml) on a dev mesh: each replica writes its count
/// through its state endpoint and lists everyone's; a replica's log must come to show both
/// replicas' keys, read back through its own endpoint (under Podman: the sidecar in its pod).
fn shared_state(run_as: &RunAs, expect_driver: &str) -> Option<Dev> {
    let (_t, home, tmp) = sandbox(run_as.ids);
    let mut dev = Dev::start(2, run_as, &home, &tmp);
    if !dev.driver.starts_with(expect_driver) {
        return Some(dev);
    }
    let example = home.join("counter.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/counter.toml"),
        &example,
    )
    .expect("copy the example");
    if let Some((uid, gid)) = run_as.ids {
        std::os::unix::fs::chown(&example, Some(uid), Some(gid)).expect("chown");
    }
    let key = dev.root.join("operator.key");
    let signed = home.join("counter.signed.toml");
    let api = dev.api();
    let beemesh = |args: &[&std::ffi::OsStr]| run_beemesh(run_as, &home, &tmp, &api, args);
    let (ok, said) = beemesh(&[
        "sign".as_ref(),
        example.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--out".as_ref(),
        signed.as_os_str(),
    ]);
    assert!(ok, "sign: {said}");
    let (ok, said) = beemesh(&["apply".as_ref(), signed.as_os_str()]);
    assert!(ok, "apply: {said}");
    dev.wait_running("default", "counter", 2);
    let deadline = Instant::now() + PLACE;
    let seen =
        loop {
            let (_, log) = beemesh(&[
                "logs".as_ref(),
                "default/counter".as_ref(),
                "--replica".as_ref(),
                "0".as_ref(),
            ]);
            // A line listing both replicas' keys, as replica 0 read them from its endpoint.
            if let Some(line) = log.lines().rev().find(|l| {
                l.contains("\"key\":\"hits/") && l.matches("\"key\":\"hits/").count() == 2
            }) {
                break line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "replica 0 never listed both replicas' counts; its log: {log}; dev stderr: {}",
                dev.stderr()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
    println!("replica 0 read: {seen}");
    assert!(dev.interrupt().success(), "dev exits 0; {}", dev.stderr());
    None
}

#[test]
fn replicas_share_eventual_state_with_the_process_driver() {
    if let Some(dev) = shared_state(&process_user(), "process") {
        panic!("expected the process driver, got `{}`", dev.driver);
    }
}

#[test]
fn replicas_share_eventual_state_through_their_sidecars_with_rootless_podman() {
    const TEST: &str = "replicas_share_eventual_state_through_their_sidecars_with_rootless_podman";
    let _turn = podman_dev_turn();
    let run_as = match podman_user() {
        Ok(r) => r,
        Err(reason) => return skip_or_fail(TEST, &reason),
    };
    let socket = run_as
        .runtime_dir
        .clone()
        .unwrap_or_default()
        .join("podman/podman.sock");
    if !podman_answers(&socket) {
        return skip_or_fail(
            TEST,
            &format!("no rootless Podman API answers at {}", socket.display()),
        );
    }
    if let Some(dev) = shared_state(&run_as, "podman") {
        skip_or_fail(
            TEST,
            &format!("beemesh dev did not pick Podman: driver: {}", dev.driver),
        );
    }
}

/// Runs `beemesh ARGS` as `run_as` in `home` against the node API `api`: success and output.
fn run_beemesh(
    run_as: &RunAs,
    home: &Path,
    tmp: &Path,
    api: &str,
    args: &[&std::ffi::OsStr],
) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(home);
    run_as.apply(&mut cmd, home, tmp);
    cmd.env("BEEMESH_API", api);
    let out = cmd.output().expect("beemesh runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `GET path` on a node's API socket: the JSON body of a 200 answer, else the answer as text.
fn api_get(socket: &str, path: &str) -> Result<serde_json::Value, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {socket}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: node\r\n\r\n").as_bytes())
        .map_err(|e| format!("writing to {socket}: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("reading from {socket}: {e}"))?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
        }
        _ => Err(answer),
    }
}

/// One line of the StatefulSet example's log: `kv | <replica> counted <n> after <writer>`,
/// written after the replica's conditional write of `n` succeeded on a value it had read as
/// `n - 1` written by `writer` (`nobody` for an absent counter).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counted {
    replica: String,
    n: u64,
    after: String,
}

impl Counted {
    fn parse(line: &str) -> Option<Counted> {
        let (container, text) = line.split_once(" | ")?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match (container, words.as_slice()) {
            ("kv", [replica, "counted", n, "after", after]) => Some(Counted {
                replica: (*replica).to_owned(),
                n: n.parse().ok()?,
                after: (*after).to_owned(),
            }),
            _ => None,
        }
    }
}

/// examples/kube/statefulset.yaml as a Kubernetes user brings it: converted with the real
/// `beemesh kube convert`, signed with dev's operator key and applied to a three-node dev mesh
/// under rootless Podman. The StatefulSet becomes a strong workload: its three replicas run on
/// three nodes, the API shows consistency `strong` and a group whose voters are those nodes,
/// with a leader; and the replicas add to one counter by compare-and-set (`If-Match` on the
/// revision) through the sidecars in their pods. Every replica must come to log a count it
/// made on a value another replica wrote; no count may be claimed twice (that would be two
/// conditional writes succeeding on one revision: a lost update), and the writer a replica
/// read before counting n must be the one that logged n - 1. It waits for at least 15 counts.
///
/// The example names docker.io/library/busybox:1.36.1. No registry is reachable on the build
/// machines, so when that image is absent the test tags the user's localhost/busybox:latest
/// (imported by .ci/setup-podman) under that name, as a user without a registry would.
#[test]
fn a_statefulset_converts_to_a_strong_workload_whose_replicas_share_a_counter_with_rootless_podman()
{
    const TEST: &str = "a_statefulset_converts_to_a_strong_workload_whose_replicas_share_a_counter_with_rootless_podman";
    let _turn = podman_dev_turn();
    const REPLICAS: usize = 3;
    /// Enough counts for the replicas to have raced each other a few times (about 10 s).
    const MIN_COUNTS: usize = 15;
    let run_as = match podman_user() {
        Ok(r) => r,
        Err(reason) => return skip_or_fail(TEST, &reason),
    };
    let socket = run_as
        .runtime_dir
        .clone()
        .unwrap_or_default()
        .join("podman/podman.sock");
    if !podman_answers(&socket) {
        return skip_or_fail(
            TEST,
            &format!("no rootless Podman API answers at {}", socket.display()),
        );
    }
    let (_t, home, tmp) = sandbox(run_as.ids);
    let owned = |p: &Path| {
        if let Some((uid, gid)) = run_as.ids {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
        }
    };

    // Convert, as a user would, into a directory of manifests (no node needed).
    let yaml = home.join("statefulset.yaml");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/kube/statefulset.yaml"
        ),
        &yaml,
    )
    .expect("copy the example");
    owned(&yaml);
    let converted = home.join("kv");
    let (ok, said) = run_beemesh(
        &run_as,
        &home,
        &tmp,
        "/nonexistent",
        &[
            "kube".as_ref(),
            "convert".as_ref(),
            yaml.as_os_str(),
            "--out-dir".as_ref(),
            converted.as_os_str(),
        ],
    );
    assert!(ok, "kube convert: {said}");
    assert!(
        said.contains("a StatefulSet becomes a workload with consistency.mode = \"strong\""),
        "the conversion says what a StatefulSet becomes: {said}"
    );
    let files: Vec<PathBuf> = std::fs::read_dir(&converted)
        .expect("the converted directory")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "one manifest: {files:?}");
    let manifest_path = &files[0];
    let text = std::fs::read_to_string(manifest_path).expect("read the manifest");
    let manifest =
        beemesh_manifest::Manifest::from_toml(&manifest_path.display().to_string(), &text)
            .expect("the converted manifest is valid");
    assert_eq!(
        (manifest.namespace.as_str(), manifest.name.as_str()),
        ("storage", "kv")
    );
    assert_eq!(
        manifest.consistency.mode,
        beemesh_manifest::workload::ConsistencyMode::Strong
    );
    assert_eq!(
        usize::try_from(manifest.placement.replicas).expect("replicas"),
        REPLICAS
    );

    // The image, from the user's store.
    let image = manifest.containers[0].image.clone();
    if !podman(&run_as, &socket, &["image", "exists", &image])
        .status
        .success()
    {
        let tagged = podman(
            &run_as,
            &socket,
            &["tag", "localhost/busybox:latest", &image],
        );
        if !tagged.status.success() {
            return skip_or_fail(
                TEST,
                &format!(
                    "{image} is not in the user's image store, and localhost/busybox:latest (from .ci/setup-podman) could not be tagged as it: {}",
                    String::from_utf8_lossy(&tagged.stderr).trim()
                ),
            );
        }
    }

    let mut dev = Dev::start(3, &run_as, &home, &tmp);
    if !dev.driver.starts_with("podman") {
        return skip_or_fail(
            TEST,
            &format!("beemesh dev did not pick Podman: driver: {}", dev.driver),
        );
    }
    let api = dev.api();
    let beemesh = |args: &[&std::ffi::OsStr]| run_beemesh(&run_as, &home, &tmp, &api, args);
    let key = dev.root.join("operator.key");
    let signed = home.join("kv.signed.toml");
    let (ok, said) = beemesh(&[
        "sign".as_ref(),
        manifest_path.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--out".as_ref(),
        signed.as_os_str(),
    ]);
    assert!(ok, "sign: {said}");
    let (ok, said) = beemesh(&["apply".as_ref(), signed.as_os_str()]);
    assert!(ok, "apply: {said}");
    let on = dev.wait_running("storage", "kv", REPLICAS);

    // The API: a strong workload whose group's voters are its three hosts, with a leader.
    let deadline = Instant::now() + PLACE;
    let group = loop {
        let answer = api_get(&api, "/v1/workloads/storage/kv");
        if let Ok(w) = &answer {
            let voters: BTreeSet<String> = w["group"]["voters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let leader = w["group"]["leader"].as_str();
            if w["consistency"].as_str() == Some("strong")
                && voters == on
                && leader.is_some_and(|l| on.contains(l))
            {
                break w["group"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "storage/kv did not show a strong group with voters {on:?} and a leader within {PLACE:?}; last answer: {answer:?}; dev stderr: {}",
            dev.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("storage/kv runs on {on:?}; its group: {group}");

    // The replicas' logs: each counted on another replica's write, no count twice.
    let deadline = Instant::now() + PLACE;
    loop {
        let mut logs = String::new();
        let mut counted: Vec<Counted> = Vec::new();
        for i in 0..REPLICAS {
            let (_, log) = beemesh(&[
                "logs".as_ref(),
                "storage/kv".as_ref(),
                "--replica".as_ref(),
                i.to_string().as_ref(),
            ]);
            counted.extend(log.lines().filter_map(Counted::parse));
            logs.push_str(&format!("--- replica {i}\n{log}"));
        }
        let mut writer: std::collections::BTreeMap<u64, &str> = std::collections::BTreeMap::new();
        for c in &counted {
            if let Some(other) = writer.insert(c.n, &c.replica) {
                panic!(
                    "count {} was claimed by both {other} and {}: a lost update; logs:\n{logs}",
                    c.n, c.replica
                );
            }
        }
        for c in &counted {
            let before = c.n.checked_sub(1).and_then(|b| writer.get(&b));
            if let Some(before) = before {
                assert_eq!(
                    *before, c.after,
                    "{} counted {} after reading {} - 1 as {}'s, but {before} wrote it; logs:\n{logs}",
                    c.replica, c.n, c.n, c.after
                );
            }
        }
        let replicas: BTreeSet<&str> = counted.iter().map(|c| c.replica.as_str()).collect();
        let read_another: BTreeSet<&str> = counted
            .iter()
            .filter(|c| c.after != c.replica && replicas.contains(c.after.as_str()))
            .map(|c| c.replica.as_str())
            .collect();
        if replicas.len() == REPLICAS
            && read_another.len() == REPLICAS
            && counted.len() >= MIN_COUNTS
        {
            println!(
                "{} counts, each claimed once; every replica counted on another's write: {read_another:?}",
                counted.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within {PLACE:?}, not every replica counted on another replica's write or fewer than {MIN_COUNTS} counts were made ({} counts; counting: {replicas:?}, on another's write: {read_another:?}); logs:\n{logs}\ndev stderr: {}",
            counted.len(),
            dev.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let status = dev.interrupt();
    assert!(status.success(), "dev exits 0; {}", dev.stderr());
    let out = podman(
        &run_as,
        &socket,
        &["ps", "--all", "--format", "{{.Names}} {{.Labels}}"],
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let left: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("bm_storage_kv_") && l.contains("io.beemesh.node:dev-"))
        .collect();
    assert!(left.is_empty(), "dev's containers outlived it: {left:#?}");
}
