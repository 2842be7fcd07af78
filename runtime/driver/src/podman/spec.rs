//! From a manifest to libpod objects: the pod (network namespace, slirp4netns port forwards)
//! and one container spec per `[[container]]`. Pure functions, tested without Podman.

use std::collections::BTreeMap;
use std::net::IpAddr;

use beemesh_manifest::workload::{Container, Protocol, Volume};
use podman_api::models::PortMapping;
use serde_json::{Value, json};

use crate::labels::{self, ReplicaLabels};
use crate::types::{ReplicaId, ReplicaSpec, SIDECAR_CONTAINER, SIDECAR_SOCKET_DIR, Sidecar};

/// CFS period used for CPU limits (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which limits the host lets rootless Podman enforce through cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory: bool,
    pub cpu: bool,
}

/// Settings that shape every container the driver creates.
#[derive(Debug, Clone)]
pub struct ContainerDefaults {
    /// Run catatonit as PID 1 (signals reach the command, zombies are reaped).
    pub init: bool,
    /// Seconds Podman waits after SIGTERM before SIGKILL.
    pub stop_timeout_secs: u64,
}

pub fn pod_name(id: &ReplicaId) -> String {
    id.object_name()
}

pub fn container_name(id: &ReplicaId, container: &str) -> String {
    format!("{}_{container}", id.object_name())
}

pub fn volume_name(id: &ReplicaId, container: &str, volume: &str) -> String {
    format!("{}_{container}_{volume}", id.object_name())
}

/// The pod's hostname: `<workload>-<index>`, a valid DNS label where the object name is not.
pub fn hostname(id: &ReplicaId) -> String {
    let h = format!("{}-{}", id.name, id.index);
    if h.len() <= 63 { h } else { id.name.clone() }
}

pub fn replica_labels(spec: &ReplicaSpec) -> ReplicaLabels {
    ReplicaLabels {
        id: spec.id.clone(),
        content_id: spec.content_id.clone(),
        node: spec.node.clone(),
    }
}

/// Port forwards for every declared port of every container, on `publish` (loopback by
/// default: the node's proxy is the way in, DESIGN.md section 6). A port without `host`
/// gets a free host port chosen by Podman.
pub fn port_mappings(spec: &ReplicaSpec, publish: IpAddr) -> Vec<PortMapping> {
    spec.manifest
        .containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .map(|p| PortMapping {
            container_port: Some(p.container),
            host_ip: Some(publish.to_string()),
            host_port: p.host,
            protocol: Some(protocol_name(p.protocol).to_owned()),
            range: None,
        })
        .collect()
}

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Named volumes the container needs (disk-backed scratch volumes), with their labels.
pub fn disk_volumes<'a>(
    spec: &'a ReplicaSpec,
    c: &'a Container,
) -> impl Iterator<Item = (String, &'a Volume)> + 'a {
    c.volumes
        .iter()
        .filter(|v| !v.memory)
        .map(move |v| (volume_name(&spec.id, &c.name, &v.name), v))
}

/// The libpod SpecGenerator for one container of the replica.
/// The sidecar container of a replica's pod: the node's program from a root file system
/// (no image), read-only, every capability dropped, no new privileges, the replica's socket
/// directory bind-mounted at [`SIDECAR_SOCKET_DIR`] (this container only), and small limits.
pub fn sidecar_body(
    spec: &ReplicaSpec,
    sidecar: &Sidecar,
    defaults: &ContainerDefaults,
    limits: CgroupLimits,
) -> Value {
    let id = &spec.id;
    let mut labels = replica_labels(spec).to_map();
    labels.insert(labels::CONTAINER.to_owned(), SIDECAR_CONTAINER.to_owned());
    let mut body = json!({
        "name": container_name(id, SIDECAR_CONTAINER),
        "pod": pod_name(id),
        "rootfs": sidecar.rootfs,
        "labels": labels,
        "entrypoint": sidecar.command,
        "read_only_filesystem": true,
        "no_new_privileges": true,
        "cap_drop": ["all"],
        "init": false,
        "stop_timeout": defaults.stop_timeout_secs,
        "restart_policy": "no",
        "mounts": [{
            "destination": SIDECAR_SOCKET_DIR,
            "source": sidecar.socket_dir,
            "type": "bind",
            "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
        }],
    });
    let mut resources = serde_json::Map::new();
    if limits.memory {
        let bytes: i64 = 64 << 20;
        resources.insert("memory".into(), json!({ "limit": bytes, "swap": bytes }));
    }
    if limits.cpu {
        resources.insert(
            "cpu".into(),
            json!({ "quota": 20_000, "period": CPU_PERIOD_US }),
        );
    }
    if !resources.is_empty()
        && let Some(obj) = body.as_object_mut()
    {
        obj.insert("resource_limits".into(), Value::Object(resources));
    }
    body
}

pub fn container_body(
    spec: &ReplicaSpec,
    c: &Container,
    defaults: &ContainerDefaults,
    limits: CgroupLimits,
) -> Value {
    let id = &spec.id;
    let mut labels = replica_labels(spec).to_map();
    labels.insert(labels::CONTAINER.to_owned(), c.name.clone());

    let mut env: BTreeMap<String, String> = spec.env.clone();
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));

    let mut body = json!({
        "name": container_name(id, &c.name),
        "pod": pod_name(id),
        "image": c.image,
        "labels": labels,
        "env": env,
        "read_only_filesystem": c.security.read_only_root,
        "no_new_privileges": true,
        "cap_drop": ["all"],
        "cap_add": c.security.capabilities.iter().map(|cap| format!("CAP_{cap}")).collect::<Vec<_>>(),
        "init": defaults.init,
        "stop_timeout": defaults.stop_timeout_secs,
        // Restarts are the driver's job (with back-off and a status), not conmon's.
        "restart_policy": "no",
    });
    let Some(obj) = body.as_object_mut() else {
        return body;
    };
    if !c.command.is_empty() {
        obj.insert("entrypoint".into(), json!(c.command));
    }
    if !c.args.is_empty() {
        obj.insert("command".into(), json!(c.args));
    }
    if let Some(w) = &c.workdir {
        obj.insert("work_dir".into(), json!(w));
    }
    match (c.security.run_as_user, c.security.run_as_group) {
        (Some(u), Some(g)) => {
            obj.insert("user".into(), json!(format!("{u}:{g}")));
        }
        (Some(u), None) => {
            obj.insert("user".into(), json!(u.to_string()));
        }
        (None, Some(g)) => {
            obj.insert("user".into(), json!(format!("0:{g}")));
        }
        (None, None) => {}
    }
    let mut resources = serde_json::Map::new();
    if limits.memory {
        let bytes = i64::try_from(c.resources.memory.bytes()).unwrap_or(i64::MAX);
        // swap = limit: memory plus swap may not exceed the limit, i.e. no swap.
        resources.insert("memory".into(), json!({ "limit": bytes, "swap": bytes }));
    }
    if limits.cpu {
        let quota = c.resources.cpu.millis().saturating_mul(CPU_PERIOD_US) / 1000;
        resources.insert(
            "cpu".into(),
            json!({ "quota": i64::try_from(quota.max(1000)).unwrap_or(i64::MAX), "period": CPU_PERIOD_US }),
        );
    }
    if !resources.is_empty() {
        obj.insert("resource_limits".into(), Value::Object(resources));
    }
    let tmpfs: Vec<Value> = c
        .volumes
        .iter()
        .filter(|v| v.memory)
        .map(|v| {
            let size = v.size.unwrap_or(c.resources.memory).bytes();
            json!({
                "destination": v.path,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["rw", "nosuid", "nodev", format!("size={size}")],
            })
        })
        .collect();
    if !tmpfs.is_empty() {
        obj.insert("mounts".into(), Value::Array(tmpfs));
    }
    let named: Vec<Value> = disk_volumes(spec, c)
        .map(|(name, v)| json!({ "Name": name, "Dest": v.path, "Options": ["rw", "nosuid", "nodev"] }))
        .collect();
    if !named.is_empty() {
        obj.insert("volumes".into(), Value::Array(named));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use beemesh_manifest::Manifest;

    fn spec(extra: &str) -> ReplicaSpec {
        let text = format!(
            r#"
api = "beemesh/v1"
kind = "Workload"
name = "hello"
generation = 1

[[container]]
name = "web"
image = "localhost/busybox:latest"
command = ["httpd", "-f"]
args = ["-p", "8080"]
env = {{ GREETING = "hi" }}
ports = [{{ name = "http", container = 8080 }}, {{ name = "metrics", container = 9090, host = 19090, protocol = "udp" }}]
resources = {{ cpu = "250m", memory = "64Mi" }}
volumes = [{{ name = "scratch", path = "/tmp", memory = true }}, {{ name = "data", path = "/data" }}]
{extra}
"#
        );
        let m = Manifest::from_toml("t.toml", &text).expect("valid manifest");
        ReplicaSpec::new(Arc::new(m), 1, "sha256:0123", "node-a")
    }

    #[test]
    fn container_spec_is_confined_and_limited() {
        let mut s = spec("security = { capabilities = [\"NET_BIND_SERVICE\"] }");
        s.env
            .insert("BEEMESH_STATE_URL".to_owned(), "http://x".to_owned());
        let d = ContainerDefaults {
            init: true,
            stop_timeout_secs: 5,
        };
        let b = container_body(
            &s,
            &s.manifest.containers[0],
            &d,
            CgroupLimits {
                memory: true,
                cpu: true,
            },
        );
        assert_eq!(b["name"], "bm_default_hello_1_web");
        assert_eq!(b["pod"], "bm_default_hello_1");
        assert_eq!(b["no_new_privileges"], true);
        assert_eq!(b["read_only_filesystem"], true);
        assert_eq!(b["cap_drop"], json!(["all"]));
        assert_eq!(b["cap_add"], json!(["CAP_NET_BIND_SERVICE"]));
        assert_eq!(b["entrypoint"], json!(["httpd", "-f"]));
        assert_eq!(b["command"], json!(["-p", "8080"]));
        assert_eq!(b["env"]["GREETING"], "hi");
        assert_eq!(b["env"]["BEEMESH_STATE_URL"], "http://x");
        assert_eq!(b["resource_limits"]["memory"]["limit"], 64 << 20);
        assert_eq!(b["resource_limits"]["cpu"]["quota"], 25_000);
        assert_eq!(b["labels"]["io.beemesh.content-id"], "sha256:0123");
        assert_eq!(b["labels"]["io.beemesh.container"], "web");
        assert_eq!(b["labels"]["io.beemesh.replica"], "1");
        assert_eq!(b["mounts"][0]["destination"], "/tmp");
        assert_eq!(b["mounts"][0]["options"][3], format!("size={}", 64 << 20));
        assert_eq!(b["volumes"][0]["Name"], "bm_default_hello_1_web_data");
        assert_eq!(b["init"], true);
    }

    #[test]
    fn no_cgroup_limits_when_the_host_has_none() {
        let s = spec("");
        let d = ContainerDefaults {
            init: false,
            stop_timeout_secs: 5,
        };
        let b = container_body(
            &s,
            &s.manifest.containers[0],
            &d,
            CgroupLimits {
                memory: false,
                cpu: false,
            },
        );
        assert!(b.get("resource_limits").is_none());
        assert_eq!(b["cap_add"], json!([]));
    }

    #[test]
    fn ports_are_forwarded_on_the_publish_address() {
        let s = spec("");
        let m = port_mappings(&s, "127.0.0.1".parse().expect("ip"));
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].container_port, Some(8080));
        assert_eq!(m[0].host_port, None);
        assert_eq!(m[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(m[1].host_port, Some(19090));
        assert_eq!(m[1].protocol.as_deref(), Some("udp"));
        assert_eq!(hostname(&s.id), "hello-1");
    }
}
