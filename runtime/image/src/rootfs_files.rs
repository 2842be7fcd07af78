//! The files of the image's own design, from runtime/image/rootfs/ (embedded, so the
//! `beemesh` binary builds images without the source tree): (path, bytes, mode). Add a line
//! here for every file added there.

pub const FILES: &[(&str, &[u8], u32)] = &[
    (
        "/etc/containers/containers.conf",
        include_bytes!("../rootfs/etc/containers/containers.conf"),
        0o644,
    ),
    (
        "/etc/containers/storage.conf",
        include_bytes!("../rootfs/etc/containers/storage.conf"),
        0o644,
    ),
    ("/etc/fstab", include_bytes!("../rootfs/etc/fstab"), 0o644),
    (
        "/etc/systemd/network/80-dhcp.network",
        include_bytes!("../rootfs/etc/systemd/network/80-dhcp.network"),
        0o644,
    ),
    (
        "/usr/lib/beemesh/copy-config",
        include_bytes!("../rootfs/usr/lib/beemesh/copy-config"),
        0o755,
    ),
    (
        "/usr/lib/beemesh/find-config-partition",
        include_bytes!("../rootfs/usr/lib/beemesh/find-config-partition"),
        0o755,
    ),
    (
        "/usr/lib/beemesh/load-images",
        include_bytes!("../rootfs/usr/lib/beemesh/load-images"),
        0o755,
    ),
    (
        "/usr/lib/repart.d/50-data.conf",
        include_bytes!("../rootfs/usr/lib/repart.d/50-data.conf"),
        0o644,
    ),
    (
        "/usr/lib/systemd/journald.conf.d/beemesh.conf",
        include_bytes!("../rootfs/usr/lib/systemd/journald.conf.d/beemesh.conf"),
        0o644,
    ),
    (
        "/usr/lib/systemd/system/beemesh-config.service",
        include_bytes!("../rootfs/usr/lib/systemd/system/beemesh-config.service"),
        0o644,
    ),
    (
        "/usr/lib/systemd/system/beemesh-images.service",
        include_bytes!("../rootfs/usr/lib/systemd/system/beemesh-images.service"),
        0o644,
    ),
    (
        "/usr/lib/systemd/system/beemesh.service",
        include_bytes!("../rootfs/usr/lib/systemd/system/beemesh.service"),
        0o644,
    ),
    (
        "/usr/lib/systemd/system/systemd-networkd-wait-online.service.d/beemesh.conf",
        include_bytes!(
            "../rootfs/usr/lib/systemd/system/systemd-networkd-wait-online.service.d/beemesh.conf"
        ),
        0o644,
    ),
    (
        "/usr/lib/tmpfiles.d/beemesh.conf",
        include_bytes!("../rootfs/usr/lib/tmpfiles.d/beemesh.conf"),
        0o644,
    ),
    (
        "/usr/lib/systemd/user/podman.service.d/beemesh.conf",
        include_bytes!("../rootfs/usr/lib/systemd/user/podman.service.d/beemesh.conf"),
        0o644,
    ),
];

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Every file under rootfs/ is embedded, with its executable bit.
    #[test]
    fn every_rootfs_file_is_listed() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("rootfs");
        let mut stack = vec![base.clone()];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("read rootfs").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = format!("/{}", p.strip_prefix(&base).expect("prefix").display());
                    let exec = p.metadata().expect("stat").permissions().mode() & 0o111 != 0;
                    found.push((rel, exec));
                }
            }
        }
        for (rel, exec) in &found {
            let entry = super::FILES.iter().find(|(path, _, _)| path == rel);
            let Some((_, _, mode)) = entry else {
                panic!("{rel} is in rootfs/ but not in FILES");
            };
            assert_eq!(*mode & 0o111 != 0, *exec, "{rel}: mode {mode:o}");
        }
        assert_eq!(
            found.len(),
            super::FILES.len(),
            "FILES lists a file rootfs/ lacks"
        );
    }
}
