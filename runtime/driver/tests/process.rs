//! The process driver on this host: commands run confined, their output is kept, and a
//! restarted daemon adopts them. Needs Landlock (every supported kernel has it); the
//! capability checks assume the tests run as root, as CI does, and are skipped otherwise.

mod common;

use std::path::Path;
use std::time::Duration;

use beemesh_driver::{
    BackoffPolicy, ContainerDriver, ContainerState, Enforcement, EnsureAction, LogOptions,
    LogSource, ProcessConfig, ProcessDriver, ReplicaState, procfs, reconcile,
};
use beemesh_manifest::host::LandlockMode;
use common::{NODE, log_lines, manifest, spec, wait_for, wait_for_log};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(20);

fn driver(root: &Path) -> ProcessDriver {
    let mut config = ProcessConfig::new(root);
    config.landlock = LandlockMode::Required;
    config.stop_timeout = Duration::from_secs(2);
    config.backoff = BackoffPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
        reset_after: Duration::from_secs(60),
    };
    ProcessDriver::new(config).expect("process driver")
}

fn shell(name: &str, script: &str, env: &str) -> std::sync::Arc<beemesh_manifest::Manifest> {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    manifest(
        name,
        &format!(
            "[[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\nresources = {{ cpu = \"100m\", memory = \"64Mi\" }}\n{env}\n"
        ),
    )
}

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_runs_and_its_output_is_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = driver(tmp.path());
    let s = spec(
        shell(
            "logs",
            "echo out-line; echo err-line >&2; exec sleep 300",
            "",
        ),
        "sha256:logs-1",
    );

    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    assert_eq!(status.action, EnsureAction::Created);
    let pid = status.containers[0].pid.expect("a pid");
    assert!(procfs::alive(pid, None));
    assert!(
        status.not_enforced.iter().any(|n| n.starts_with("network")),
        "the status must say what is not enforced: {:?}",
        status.not_enforced
    );

    // stdout and stderr are both kept, in order, in the replica's log.
    wait_for_log(&d, &s.id, "err-line", WAIT).await;
    let lines = log_lines(&d, &s.id).await;
    let text: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(text, ["out-line", "err-line"]);
    assert!(
        lines
            .iter()
            .all(|l| l.container == "main" && l.source == LogSource::Output)
    );
    let mut tail = d
        .logs(
            &s.id,
            LogOptions {
                tail: Some(1),
                follow: false,
            },
        )
        .await
        .expect("logs");
    let last = tail.next().await.expect("one line").expect("ok");
    assert_eq!(last.line, "err-line");
    assert!(tail.next().await.is_none());

    let usage = d.usage(&s.id).await.expect("usage");
    assert!(
        usage.processes >= 1 && usage.memory_rss_bytes > 0,
        "{usage:?}"
    );

    d.stop(&s.id).await.expect("stop");
    wait_for("the process to be gone", WAIT, async || {
        (!procfs::alive(pid, None)).then_some(())
    })
    .await;
    assert!(d.status(&s.id).await.expect("status").is_none());
    assert!(
        !tmp.path().join(s.id.object_name()).exists(),
        "the replica directory is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landlock_denies_writes_outside_the_replica_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A directory the process could write to without Landlock (it runs as our user).
    let outside = tempfile::tempdir().expect("tempdir");
    let d = driver(tmp.path());
    let script = "if echo x > \"$OUTSIDE/escape\"; then echo outside=written; else echo outside=denied; fi; \
                  if echo y > \"$HOME/inside\"; then echo inside=written; fi; \
                  if cat /etc/shadow > /dev/null; then echo shadow=read; else echo shadow=denied; fi; exec sleep 300";
    let env = format!("env = {{ OUTSIDE = \"{}\" }}", outside.path().display());
    let s = spec(shell("landlock", script, &env), "sha256:landlock-1");

    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    let outside_line = wait_for_log(&d, &s.id, "outside=", WAIT).await;
    assert_eq!(outside_line, "outside=denied");
    assert_eq!(
        wait_for_log(&d, &s.id, "inside=", WAIT).await,
        "inside=written"
    );
    assert_eq!(
        wait_for_log(&d, &s.id, "shadow=", WAIT).await,
        "shadow=denied"
    );
    let lines = log_lines(&d, &s.id).await;
    assert!(
        lines.iter().any(|l| l.line.contains("Permission denied")),
        "the shell reports EACCES: {lines:?}"
    );
    assert!(!outside.path().join("escape").exists());
    assert!(
        tmp.path()
            .join(s.id.object_name())
            .join("data/inside")
            .exists()
    );
    d.stop(&s.id).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_cannot_regain_capabilities() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = driver(tmp.path());
    // grep is a fresh exec: what it reads of itself is what any program started there gets.
    let s = spec(
        shell(
            "caps",
            "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; exec sleep 300",
            "",
        ),
        "sha256:caps-1",
    );
    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    wait_for_log(&d, &s.id, "NoNewPrivs:", WAIT).await;
    let lines = log_lines(&d, &s.id).await;
    let field = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.line.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("{name} missing from {lines:?}"))
    };
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set} must be empty");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    if running_as_root() {
        // Root with CAP_SETPCAP empties the bounding set: nothing can ever be regained.
        assert_eq!(field("CapBnd:"), "0000000000000000");
    } else {
        eprintln!(
            "not root: the bounding set is kept (no CAP_SETPCAP); no_new_privs still applies"
        );
    }

    // Without a delegated cgroup v2 the memory limit is RLIMIT_DATA, and the report says so.
    let report = d.report().await;
    let pid = status.containers[0].pid.expect("pid");
    let memory = report.control("memory-limit").expect("memory control");
    if memory.enforcement == Enforcement::Partial {
        assert_eq!(
            procfs::limit(pid, "Max data size"),
            Some((Some(64 << 20), Some(64 << 20)))
        );
        assert_eq!(
            report.control("cpu-limit").map(|c| c.enforcement),
            Some(Enforcement::NotEnforced)
        );
        assert!(
            status
                .not_enforced
                .iter()
                .any(|n| n.starts_with("cpu limit")),
            "{:?}",
            status.not_enforced
        );
    }
    assert_eq!(
        report
            .control("landlock")
            .map(|c| c.enforcement == Enforcement::NotEnforced),
        Some(false)
    );
    d.stop(&s.id).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_is_restarted_and_a_new_instance_adopts_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = driver(tmp.path());
    let s = spec(
        shell("adopt", "echo started; exec sleep 300", ""),
        "sha256:adopt-1",
    );
    let first = d.ensure(&s).await.expect("ensure");
    let pid1 = first.containers[0].pid.expect("pid");

    // Killed from outside: the next ensure (the reconcile loop's periodic call) restarts it.
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid1).expect("pid fits")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    wait_for("the driver to see the process dead", WAIT, async || {
        let st = d.status(&s.id).await.expect("status").expect("exists");
        (st.containers[0].state != ContainerState::Running).then_some(())
    })
    .await;
    let again = d.ensure(&s).await.expect("ensure");
    assert_eq!(again.action, EnsureAction::Restarted, "{again:?}");
    assert_eq!(again.state, ReplicaState::Running);
    assert_eq!(again.restarts, 1);
    let pid2 = again.containers[0].pid.expect("pid");
    assert_ne!(pid1, pid2);

    // A new driver instance (a restarted daemon) adopts the running process.
    let d2 = driver(tmp.path());
    let adopted = d2.ensure(&s).await.expect("ensure");
    assert_eq!(adopted.action, EnsureAction::Adopted, "{adopted:?}");
    assert_eq!(
        adopted.containers[0].pid,
        Some(pid2),
        "the same process, not a second one"
    );
    let listed = d2.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, s.id);
    assert_eq!(listed[0].content_id, "sha256:adopt-1");

    // Not wanted any more: one reconcile pass removes it.
    let outcome = reconcile(&d2, &[], NODE, false).await.expect("reconcile");
    assert_eq!(outcome.removed.len(), 1);
    assert!(outcome.removed[0].1.is_ok());
    wait_for("the process to be gone", WAIT, async || {
        (!procfs::alive(pid2, None)).then_some(())
    })
    .await;
    assert!(d2.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_is_a_failed_status() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = driver(tmp.path());
    let m = manifest(
        "nocmd",
        "[[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"/nonexistent/program\"]\n",
    );
    let s = spec(m, "sha256:nocmd-1");
    let status = d.ensure(&s).await.expect("ensure");
    let ReplicaState::Failed { reason } = &status.state else {
        panic!("expected a failure, got {status:?}");
    };
    assert!(reason.contains("/nonexistent/program"), "{reason}");
    assert!(reason.contains("next attempt in"), "{reason}");
    // Retried later, not in a loop: the next call reports the pending retry.
    let again = d.ensure(&s).await.expect("ensure");
    assert!(
        matches!(&again.state, ReplicaState::Failed { reason } if reason.contains("next attempt in"))
    );
    assert!(
        d.list().await.expect("list").is_empty(),
        "nothing is left behind"
    );
}

/// Connects to a unix socket and says how it went: `connected`, or `failed: <reason>`.
/// perl-base (Essential on Debian) carries IO::Socket::UNIX, so no extra package is needed.
const CONNECT: &str = "perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]); print $s ? \"connected\\n\" : \"failed: $!\\n\"'";

/// A stand-in for the node's API: a unix socket in a directory of its own, counting the
/// connections it accepts.
struct FakeApi {
    socket: std::path::PathBuf,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeApi {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("api dir");
        let socket = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if conn.is_ok() {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        FakeApi { socket, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a workload tries against the node: the API socket directly and through
/// `/proc/<daemon pid>/root`, the socket's directory, the config file, its own directory.
fn probe_script() -> String {
    format!(
        "echo \"api=$({CONNECT} \"$SOCK\")\"; \
         echo \"proc-root=$({CONNECT} \"/proc/$DAEMON/root$SOCK\")\"; \
         if [ -e \"$SOCK\" ]; then echo socket=visible; else echo socket=absent; fi; \
         echo \"run-dir=$(ls -A \"$RUN\" 2>&1 | tr '\\n' ' ')\"; \
         echo \"config=$(cat \"$CONFIG\" 2>&1)\"; \
         if echo y > \"$HOME/inside\"; then echo home=written; fi; \
         if echo x > \"$OUTSIDE/escape\" 2>/dev/null; then echo outside=written; else echo outside=denied; fi; \
         grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -d '\t' | sed 's/^/status-/'; \
         exec sleep 300"
    )
}

/// A node-like layout: the API socket's directory, data_dir holding the driver's root, a
/// config file; the driver hides all three.
struct NodeLayout {
    _tmp: tempfile::TempDir,
    run: std::path::PathBuf,
    data: std::path::PathBuf,
    config: std::path::PathBuf,
    /// Writable by the test's user, not hidden: only Landlock keeps the workload out.
    outside: std::path::PathBuf,
}

impl NodeLayout {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical");
        let (run, data, etc) = (root.join("run"), root.join("data"), root.join("etc"));
        std::fs::create_dir_all(&etc).expect("etc");
        std::fs::create_dir_all(data.join("process")).expect("data");
        let config = etc.join("host.toml");
        std::fs::write(&config, "secret-config\n").expect("config");
        let outside = root.join("outside");
        std::fs::create_dir_all(&outside).expect("outside");
        NodeLayout {
            _tmp: tmp,
            run,
            data,
            config,
            outside,
        }
    }

    fn driver(&self, landlock: LandlockMode) -> ProcessDriver {
        let mut config = ProcessConfig::new(self.data.join("process"));
        config.landlock = landlock;
        config.stop_timeout = Duration::from_secs(2);
        config.hide = vec![self.run.clone(), self.data.clone(), self.config.clone()];
        ProcessDriver::new(config).expect("process driver with hidden paths")
    }

    fn env(&self, api: &FakeApi) -> String {
        format!(
            "env = {{ SOCK = \"{}\", DAEMON = \"{}\", RUN = \"{}\", CONFIG = \"{}\", OUTSIDE = \"{}\" }}",
            api.socket.display(),
            std::process::id(),
            self.run.display(),
            self.config.display(),
            self.outside.display()
        )
    }
}

/// The same connect, from a process outside the driver: the socket works.
fn control_connect(socket: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{CONNECT} \"$0\""))
        .arg(socket)
        .output()
        .expect("run the control process");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_cannot_reach_the_node_api_socket_while_a_process_outside_can() {
    let layout = NodeLayout::new();
    let api = FakeApi::start(&layout.run);
    let d = layout.driver(LandlockMode::Required);
    let s = spec(
        shell("api", &probe_script(), &layout.env(&api)),
        "sha256:api-1",
    );

    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    let line = |prefix: &'static str| {
        let d = &d;
        let id = s.id.clone();
        async move { wait_for_log(d, &id, prefix, WAIT).await }
    };
    // The socket is not there to connect to (Landlock before ABI 9 would let it connect).
    let direct = line("api=").await;
    assert!(
        direct.starts_with("api=failed: No such file or directory"),
        "{direct}"
    );
    assert_eq!(line("socket=").await, "socket=absent");
    // Nor through the daemon's (here: the test's) view of the file system.
    let via_proc = line("proc-root=").await;
    assert!(
        via_proc.starts_with("proc-root=failed: Permission denied"),
        "{via_proc}"
    );
    // Landlock denies listing what is left in sight.
    let run_dir = line("run-dir=").await;
    assert!(
        run_dir.trim_end() == "run-dir=" || run_dir.contains("Permission denied"),
        "{run_dir}"
    );
    let config = line("config=").await;
    assert!(!config.contains("secret-config"), "{config}");
    // The replica's own directory, beneath the hidden data_dir, is still its own; the rest
    // of the confinement is intact: Landlock, no capabilities (the bounding set emptied, as
    // joining the user namespace granted every capability there), no_new_privs.
    assert_eq!(line("home=").await, "home=written");
    assert_eq!(line("outside=").await, "outside=denied");
    assert_eq!(
        line("status-CapEff:").await,
        "status-CapEff:0000000000000000"
    );
    assert_eq!(
        line("status-CapBnd:").await,
        "status-CapBnd:0000000000000000"
    );
    assert_eq!(line("status-NoNewPrivs:").await, "status-NoNewPrivs:1");
    assert!(!layout.outside.join("escape").exists());
    assert!(
        layout
            .data
            .join("process")
            .join(s.id.object_name())
            .join("data/inside")
            .exists()
    );

    // The same program, outside the driver, connects: the socket works, the workload is
    // what is kept out.
    let before = api.accepted();
    assert_eq!(control_connect(&api.socket), "connected");
    wait_for("the control connection to be accepted", WAIT, async || {
        (api.accepted() == before + 1).then_some(())
    })
    .await;
    assert_eq!(
        before, 0,
        "only the control process may have connected to the API socket"
    );

    let report = d.report().await;
    let control = report.control("node-api").expect("node-api control");
    assert_eq!(control.enforcement, Enforcement::Enforced, "{control:?}");
    assert!(
        control.detail.contains(&layout.run.display().to_string()),
        "{control:?}"
    );
    d.stop(&s.id).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_landlock_the_namespace_alone_keeps_the_socket_and_config_out() {
    let layout = NodeLayout::new();
    let api = FakeApi::start(&layout.run);
    let d = layout.driver(LandlockMode::Off);
    let s = spec(
        shell("api-off", &probe_script(), &layout.env(&api)),
        "sha256:api-off-1",
    );
    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    // Without Landlock nothing else stands in the way: what keeps the workload out is the
    // namespace alone. The socket's directory is an empty tmpfs, the config /dev/null that
    // cannot be opened (nodev).
    let direct = wait_for_log(&d, &s.id, "api=", WAIT).await;
    assert!(
        direct.starts_with("api=failed: No such file or directory"),
        "{direct}"
    );
    assert_eq!(
        wait_for_log(&d, &s.id, "socket=", WAIT).await,
        "socket=absent"
    );
    assert_eq!(
        wait_for_log(&d, &s.id, "run-dir=", WAIT).await.trim_end(),
        "run-dir="
    );
    let config = wait_for_log(&d, &s.id, "config=", WAIT).await;
    assert!(
        !config.contains("secret-config") && config.contains("Permission denied"),
        "{config}"
    );
    assert_eq!(wait_for_log(&d, &s.id, "home=", WAIT).await, "home=written");
    // The way around through the daemon's (here: the test's) /proc/PID/root is closed by
    // the user namespace: no ptrace access to processes outside it.
    let via_proc = wait_for_log(&d, &s.id, "proc-root=", WAIT).await;
    assert!(
        via_proc.starts_with("proc-root=failed: Permission denied"),
        "{via_proc}"
    );
    assert_eq!(api.accepted(), 0, "the workload reached the API socket");
    let report = d.report().await;
    let control = report.control("node-api").expect("node-api control");
    assert_eq!(control.enforcement, Enforcement::Enforced, "{control:?}");
    assert!(
        !status
            .not_enforced
            .iter()
            .any(|n| n.starts_with("node API")),
        "{:?}",
        status.not_enforced
    );
    d.stop(&s.id).await.expect("stop");
}
