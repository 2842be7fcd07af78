//! The Podman driver against real rootless Podman: the API service of the `beemesh-test`
//! user that `.ci/setup-podman` prepares (tests run as root and use that user's socket).
//!
//! Socket: `BEEMESH_TEST_PODMAN_SOCKET`, else `/run/user/<uid of beemesh-test>/podman/podman.sock`.
//! Image: `BEEMESH_TEST_IMAGE`, else `localhost/busybox:latest`.
//! Without Podman these tests print a notice and pass, unless `BEEMESH_REQUIRE_PODMAN=1`
//! (CI), which makes them fail with a pointer to `.ci/setup-podman`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use beemesh_driver::podman::socket_answers;
use beemesh_driver::{
    BackoffPolicy, ContainerDriver, ContainerState, Enforcement, EnsureAction, PodmanConfig,
    PodmanDriver, ReplicaState, procfs, reconcile,
};
use common::{manifest, spec, wait_for, wait_for_log};
use futures_util::StreamExt;
use podman_api::Podman;
use podman_api::opts::{ContainerListFilter, ContainerListOpts, ExecCreateOpts};

const WAIT: Duration = Duration::from_secs(60);
const TEST_USER: &str = "beemesh-test";

fn image() -> String {
    std::env::var("BEEMESH_TEST_IMAGE").unwrap_or_else(|_| "localhost/busybox:latest".into())
}

fn socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BEEMESH_TEST_PODMAN_SOCKET") {
        return PathBuf::from(p);
    }
    let uid = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(TEST_USER))
                .then(|| f.nth(1).map(str::to_owned))
                .flatten()
        })
        .unwrap_or_else(|| "0".into());
    PathBuf::from(format!("/run/user/{uid}/podman/podman.sock"))
}

/// The driver, or `None` (after a notice) when Podman is not set up and not required.
async fn driver() -> Option<(PodmanDriver, Podman)> {
    let socket = socket_path();
    if !socket_answers(&socket).await {
        let msg = format!(
            "rootless Podman API not reachable at {}: run .ci/setup-podman (as root) to install Podman and start the {TEST_USER} user's API service",
            socket.display()
        );
        if std::env::var("BEEMESH_REQUIRE_PODMAN").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED (set BEEMESH_REQUIRE_PODMAN=1 to fail instead): {msg}");
        return None;
    }
    let mut config = PodmanConfig::new(&socket);
    config.stop_timeout = Duration::from_secs(2);
    config.backoff = BackoffPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
        reset_after: Duration::from_secs(60),
    };
    let driver = PodmanDriver::connect(config)
        .await
        .expect("connect to Podman");
    Some((driver, Podman::unix(&socket)))
}

/// Runs `cmd` in a container through the API (an outside observer, not the driver):
/// (exit code, output).
async fn exec(podman: &Podman, container: &str, cmd: &[&str]) -> (i64, String) {
    let exec = podman
        .containers()
        .get(container)
        .create_exec(
            &ExecCreateOpts::builder()
                .command(cmd.to_vec())
                .attach_stdout(true)
                .attach_stderr(true)
                .build(),
        )
        .await
        .expect("exec create");
    let mut output = String::new();
    let opts = Default::default();
    if let Some(mut stream) = exec.start(&opts).await.expect("exec start") {
        while let Some(chunk) = stream.next().await {
            if let Ok(c) = chunk {
                output.push_str(&String::from_utf8_lossy(&c.to_vec()));
            }
        }
    }
    let info = exec.inspect().await.expect("exec inspect");
    (info["ExitCode"].as_i64().unwrap_or(-1), output)
}

/// Containers in the replica's pod, infra excluded, as Podman lists them.
async fn pod_members(podman: &Podman, pod: &str) -> Vec<podman_api::models::ListContainer> {
    let opts = ContainerListOpts::builder()
        .all(true)
        .filter([ContainerListFilter::Pod(pod.to_owned())])
        .build();
    podman
        .containers()
        .list(&opts)
        .await
        .expect("list")
        .into_iter()
        .filter(|c| c.pod_name.as_deref() == Some(pod) && c.is_infra != Some(true))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_serves_its_port_with_limits_read_only_root_and_stops() {
    let Some((d, podman)) = driver().await else {
        return;
    };
    let image = image();
    // Two containers share the pod's network namespace; `mem` allocates once told to.
    let m = manifest(
        "web",
        &format!(
            r#"
[[container]]
name = "web"
image = "{image}"
command = ["httpd", "-f", "-p", "8080", "-h", "/"]
ports = [{{ name = "http", container = 8080 }}]
resources = {{ cpu = "250m", memory = "64Mi" }}
health = {{ http = "/etc/passwd", port = 8080 }}

[[container]]
name = "mem"
image = "{image}"
command = ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.1; done; dd if=/dev/zero of=/dev/null bs=128M count=1 2>/dev/null; echo big=$?; dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null; echo small=$?; exec sleep 300"]
resources = {{ cpu = "100m", memory = "64Mi" }}
volumes = [{{ name = "tmp", path = "/tmp", memory = true, size = "1Mi" }}]
"#
        ),
    );
    let s = spec(m, "sha256:web-1");
    let _ = d.stop(&s.id).await; // leftovers of an interrupted run

    let status = d.ensure(&s).await.expect("ensure");
    assert_eq!(status.state, ReplicaState::Running, "{status:?}");
    assert_eq!(status.action, EnsureAction::Created);

    // The declared port answers through the slirp4netns port forward on loopback.
    let host_port = status.host_port(8080).expect("port 8080 is forwarded");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], host_port));
    let code = wait_for(
        "httpd to answer through the port forward",
        WAIT,
        async || {
            beemesh_driver::probe::http_status(addr, "/etc/passwd")
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(code, 200);
    let health = d.health(&s).await.expect("health");
    assert!(health.alive(), "{health:?}");

    // Inspected: read-only root, no-new-privileges, capabilities dropped.
    let web = format!("{}_web", s.id.object_name());
    let inspect = podman
        .containers()
        .get(&web)
        .inspect()
        .await
        .expect("inspect");
    let hc = inspect.host_config.expect("host config");
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert!(
        hc.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o == "no-new-privileges")
    );
    assert!(hc.cap_add.unwrap_or_default().is_empty());
    assert!(
        hc.cap_drop
            .unwrap_or_default()
            .iter()
            .any(|c| c == "CAP_NET_BIND_SERVICE")
    );

    // A write to / fails inside the container.
    let (rc, out) = exec(&podman, &web, &["touch", "/written-by-test"]).await;
    assert_ne!(rc, 0, "writing to / must fail: {out}");
    assert!(out.contains("Read-only file system"), "{out}");
    let (_, status_text) = exec(&podman, &web, &["cat", "/proc/1/status"]).await;
    assert!(
        status_text.lines().any(|l| l == "NoNewPrivs:\t1"),
        "{status_text}"
    );
    assert!(
        status_text
            .lines()
            .any(|l| l == "CapEff:\t0000000000000000"),
        "{status_text}"
    );

    // The memory limit is in effect: by cgroup where Podman can use one, else as
    // RLIMIT_DATA on the container's processes (rootless on cgroup v1, as on this host).
    let report = d.report().await;
    let memory = report
        .control("memory-limit")
        .expect("memory control")
        .clone();
    match memory.enforcement {
        Enforcement::Enforced => assert_eq!(hc.memory, Some(64 << 20)),
        Enforcement::Partial => {
            let pid = status
                .containers
                .iter()
                .find(|c| c.name == "web")
                .and_then(|c| c.pid)
                .expect("web pid");
            assert_eq!(
                procfs::limit(pid, "Max data size"),
                Some((Some(64 << 20), Some(64 << 20)))
            );
            assert!(
                status
                    .not_enforced
                    .iter()
                    .any(|n| n.starts_with("memory limit")),
                "{:?}",
                status.not_enforced
            );
        }
        Enforcement::NotEnforced => panic!("memory limit not enforced: {memory:?}"),
    }
    // ... and allocating past it fails while a small allocation works.
    let mem = format!("{}_mem", s.id.object_name());
    let (rc, out) = exec(&podman, &mem, &["touch", "/tmp/go"]).await;
    assert_eq!(rc, 0, "{out}");
    let big = wait_for_log(&d, &s.id, "big=", WAIT).await;
    assert_ne!(
        big, "big=0",
        "a 128 MiB allocation must fail under a 64 MiB limit"
    );
    assert_eq!(wait_for_log(&d, &s.id, "small=", WAIT).await, "small=0");

    // Stopping removes everything.
    d.stop(&s.id).await.expect("stop");
    assert!(pod_members(&podman, &s.id.object_name()).await.is_empty());
    assert!(
        !podman
            .pods()
            .get(s.id.object_name())
            .exists()
            .await
            .expect("exists")
    );
    assert!(d.status(&s.id).await.expect("status").is_none());
    assert!(!d.list().await.expect("list").iter().any(|r| r.id == s.id));
}

/// The node name of `restarted_daemon_adopts_and_killed_container_is_restarted`.
const ADOPT_NODE: &str = "adopt-test-node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_daemon_adopts_and_killed_container_is_restarted() {
    let Some((d, podman)) = driver().await else {
        return;
    };
    let image = image();
    let m = manifest(
        "adopt",
        &format!(
            "[[container]]\nname = \"main\"\nimage = \"{image}\"\ncommand = [\"sleep\", \"300\"]\nvolumes = [{{ name = \"scratch\", path = \"/scratch\" }}]\n"
        ),
    );
    // A node name of its own: the reconcile pass at the end removes every replica of its
    // node that it is not given, and the other tests' replicas (running at the same time in
    // the same Podman) are labelled with the common one.
    let s = beemesh_driver::ReplicaSpec::new(m, 0, "sha256:adopt-1", ADOPT_NODE);
    let volume = format!("{}_main_scratch", s.id.object_name());
    let _ = d.stop(&s.id).await;
    let pod = s.id.object_name();

    let first = d.ensure(&s).await.expect("ensure");
    assert_eq!(first.action, EnsureAction::Created, "{first:?}");
    let pid1 = first.containers[0].pid.expect("pid");
    let id1 = pod_members(&podman, &pod).await[0].id.clone();
    assert!(
        podman
            .volumes()
            .get(&volume)
            .exists()
            .await
            .expect("exists"),
        "the scratch volume lives with the replica"
    );

    // A new driver instance (the daemon restarted) adopts it: still one container.
    let Some((d2, _)) = driver().await else {
        return;
    };
    let adopted = d2.ensure(&s).await.expect("ensure");
    assert_eq!(adopted.action, EnsureAction::Adopted, "{adopted:?}");
    assert_eq!(adopted.state, ReplicaState::Running);
    let members = pod_members(&podman, &pod).await;
    assert_eq!(members.len(), 1, "one container, not two: {members:?}");
    assert_eq!(members[0].id, id1);
    let listed = d2.list().await.expect("list");
    let info = listed
        .iter()
        .find(|r| r.id == s.id)
        .expect("listed by labels");
    assert_eq!(info.content_id, "sha256:adopt-1");
    assert_eq!(info.node, ADOPT_NODE);

    // Killed from outside: the reconcile loop's next `ensure` starts it again.
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid1).expect("pid fits")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    wait_for("Podman to see the container exit", WAIT, async || {
        let st = d2.status(&s.id).await.expect("status").expect("exists");
        (st.containers[0].state != ContainerState::Running).then_some(())
    })
    .await;
    let restarted = d2.ensure(&s).await.expect("ensure");
    assert_eq!(restarted.action, EnsureAction::Restarted, "{restarted:?}");
    assert_eq!(restarted.state, ReplicaState::Running);
    assert_eq!(restarted.restarts, 1);
    assert_ne!(restarted.containers[0].pid, Some(pid1));
    let members = pod_members(&podman, &pod).await;
    assert_eq!(members.len(), 1, "restarted in place: {members:?}");

    // A new content id replaces it.
    let s2 = beemesh_driver::ReplicaSpec::new(s.manifest.clone(), 0, "sha256:adopt-2", ADOPT_NODE);
    let replaced = d2.ensure(&s2).await.expect("ensure");
    assert_eq!(replaced.action, EnsureAction::Replaced, "{replaced:?}");
    let members = pod_members(&podman, &pod).await;
    assert_eq!(members.len(), 1);
    assert_ne!(members[0].id, id1);

    // No longer wanted: one reconcile pass removes it.
    let outcome = reconcile(&d2, &[], ADOPT_NODE, false)
        .await
        .expect("reconcile");
    assert!(
        outcome
            .removed
            .iter()
            .any(|(id, r)| *id == s.id && r.is_ok()),
        "{outcome:?}"
    );
    assert!(!podman.pods().get(&pod).exists().await.expect("exists"));
    assert!(
        !podman
            .volumes()
            .get(&volume)
            .exists()
            .await
            .expect("exists"),
        "and dies with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_gives_a_status_naming_the_image_and_error() {
    let Some((d, podman)) = driver().await else {
        return;
    };
    let missing = "localhost/beemesh-no-such-image:1";
    let m = manifest(
        "noimage",
        &format!("[[container]]\nname = \"main\"\nimage = \"{missing}\"\ncommand = [\"true\"]\n"),
    );
    let s = spec(m, "sha256:noimage-1");
    let _ = d.stop(&s.id).await;

    let status = d
        .ensure(&s)
        .await
        .expect("a failed replica is a status, not an error");
    let ReplicaState::Failed { reason } = &status.state else {
        panic!("expected Failed, got {status:?}");
    };
    eprintln!("reason: {reason}");
    assert!(
        reason.contains(missing),
        "the reason names the image: {reason}"
    );
    assert!(
        reason.contains("pull failed"),
        "the reason gives the error: {reason}"
    );
    assert!(reason.contains("next attempt in"), "{reason}");
    // Not a crash loop: the next call waits out the back-off without touching Podman.
    let again = d.ensure(&s).await.expect("ensure");
    assert!(matches!(&again.state, ReplicaState::Failed { reason } if reason.contains(missing)));
    assert!(
        !podman
            .pods()
            .get(s.id.object_name())
            .exists()
            .await
            .expect("exists"),
        "nothing half-created is left"
    );
}

/// The uid the test Podman runs as (the socket directory's owner).
fn podman_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(socket_path()).map_or(0, |m| m.uid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reaches_its_sidecar_and_no_other_replica_or_host_process_does() {
    use std::os::unix::fs::PermissionsExt;
    let Some((d, podman)) = driver().await else {
        return;
    };
    let image = image();
    // Files readable by the Podman user: the sidecar's root and the socket directory, which
    // in the product belong to the node's own user.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let rootfs =
        beemesh_driver::sidecar::assemble(std::path::Path::new("/bin/busybox"), dir.path())
            .expect("sidecar root from busybox-static");
    let uid = podman_uid();
    let socket_dir = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir(&p).expect("socket dir");
        std::fs::write(p.join("hello"), format!("for {name}\n")).expect("write");
        std::os::unix::fs::chown(&p, Some(uid), None).expect("chown");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        p
    };
    // The "sidecar" serves its directory over HTTP on 127.0.0.1:7480 inside the pod.
    let with_sidecar = |name: &str| {
        let m = manifest(
            name,
            &format!(
                "[[container]]\nname = \"app\"\nimage = \"{image}\"\ncommand = [\"sleep\", \"300\"]\n"
            ),
        );
        let mut s = spec(m, &format!("sha256:{name}-1"));
        s.env
            .insert("BEEMESH_STATE_URL".into(), "http://127.0.0.1:7480".into());
        s.sidecar = Some(beemesh_driver::Sidecar {
            rootfs: rootfs.clone(),
            command: vec![
                "/bin/busybox".into(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "127.0.0.1:7480".into(),
                "-h".into(),
                beemesh_driver::SIDECAR_SOCKET_DIR.into(),
            ],
            socket_dir: socket_dir(name),
            port: 7480,
        });
        s
    };
    let a = with_sidecar("side-a");
    let b = with_sidecar("side-b");
    for s in [&a, &b] {
        let _ = d.stop(&s.id).await;
        let status = d.ensure(s).await.expect("ensure");
        assert_eq!(status.state, ReplicaState::Running, "{status:?}");
        assert!(
            status
                .containers
                .iter()
                .any(|c| c.name == beemesh_driver::SIDECAR_CONTAINER),
            "the sidecar is reported with the replica: {status:?}"
        );
    }
    let app = |s: &beemesh_driver::ReplicaSpec| format!("{}_app", s.id.object_name());
    // Each replica reaches its own sidecar, at the address in its environment.
    for (s, name) in [(&a, "side-a"), (&b, "side-b")] {
        let out = wait_for("the replica to reach its sidecar", WAIT, async || {
            let (rc, out) = exec(
                &podman,
                &app(s),
                &["sh", "-c", "wget -qO- \"$BEEMESH_STATE_URL/hello\""],
            )
            .await;
            (rc == 0).then_some(out)
        })
        .await;
        assert_eq!(out.trim(), format!("for {name}"));
        // The replica's own containers do not see the node's directory.
        let (rc, _) = exec(&podman, &app(s), &["ls", "/run/beemesh/hello"]).await;
        assert_ne!(rc, 0, "only the sidecar has the socket directory");
    }
    // Nothing of it is on the host's loopback.
    assert!(
        tokio::net::TcpStream::connect("127.0.0.1:7480")
            .await
            .is_err()
            || std::env::var_os("BEEMESH_TEST_PORT_7480_TAKEN").is_some(),
        "the sidecar's port must not be reachable from the host"
    );
    // The sidecar is confined like the workload's containers.
    let side = format!(
        "{}_{}",
        a.id.object_name(),
        beemesh_driver::SIDECAR_CONTAINER
    );
    let inspect = podman
        .containers()
        .get(&side)
        .inspect()
        .await
        .expect("inspect the sidecar");
    let hc = inspect.host_config.expect("host config");
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert!(
        hc.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o == "no-new-privileges")
    );
    // A sidecar that dies is restarted with the replica's containers.
    podman
        .containers()
        .get(&side)
        .kill()
        .await
        .expect("kill the sidecar");
    let status = wait_for("the replica to be repaired", WAIT, async || {
        let st = d.ensure(&a).await.ok()?;
        (st.state == ReplicaState::Running && st.action == EnsureAction::Restarted).then_some(st)
    })
    .await;
    assert_eq!(status.state, ReplicaState::Running);
    for s in [&a, &b] {
        d.stop(&s.id).await.expect("stop");
    }
}
