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
