//! `find-config-partition` (runtime/image/rootfs/usr/lib/beemesh/, also used by the NixOS
//! module): the config partition comes from the boot disk only. Each case builds a fake
//! sysfs, mount table and `blkid` for a host and runs the script with `sh` (dash on Debian,
//! as the image runs it) and `bash` (as NixOS's writeShellScript runs it).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/rootfs/usr/lib/beemesh/find-config-partition"
);

/// A partition: kernel name, major:minor, GPT name, file system label.
struct Part<'a> {
    name: &'a str,
    devnum: &'a str,
    partname: Option<&'a str>,
    label: Option<&'a str>,
}

fn part<'a>(
    name: &'a str,
    devnum: &'a str,
    partname: Option<&'a str>,
    label: Option<&'a str>,
) -> Part<'a> {
    Part {
        name,
        devnum,
        partname,
        label,
    }
}

struct FakeHost {
    dir: tempfile::TempDir,
    mountinfo: String,
}

impl FakeHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["sys/dev/block", "sys/class/block", "dev", "labels", "bin"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        // blkid -p -o value -s LABEL DEV: the label from labels/<name>, exit 2 when none.
        let blkid = dir.path().join("bin/blkid");
        std::fs::write(
            &blkid,
            "#!/bin/sh\nfor last; do :; done\nf=\"$FAKE_LABELS/${last##*/}\"\n[ -f \"$f\" ] || exit 2\ncat \"$f\"\n",
        )
        .expect("write blkid");
        std::fs::set_permissions(&blkid, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        FakeHost {
            dir,
            mountinfo: String::new(),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A block device's sysfs directory, linked from /sys/dev/block and /sys/class/block.
    fn device(&self, rel: &str, name: &str, devnum: &str) -> PathBuf {
        let d = self.root().join("sys/devices").join(rel);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("dev"), format!("{devnum}\n")).expect("dev");
        symlink(
            format!("../../devices/{rel}"),
            self.root().join("sys/dev/block").join(devnum),
        )
        .expect("symlink dev/block");
        symlink(
            format!("../../devices/{rel}"),
            self.root().join("sys/class/block").join(name),
        )
        .expect("symlink class/block");
        d
    }

    /// A disk on `bus` with its partitions.
    fn disk(&self, bus: &str, name: &str, devnum: &str, parts: &[Part]) {
        self.device(&format!("{bus}/block/{name}"), name, devnum);
        for p in parts {
            let d = self.device(&format!("{bus}/block/{name}/{}", p.name), p.name, p.devnum);
            std::fs::write(d.join("partition"), "1\n").expect("partition");
            let mut uevent = format!("DEVNAME={}\nDEVTYPE=partition\n", p.name);
            if let Some(n) = p.partname {
                uevent.push_str(&format!("PARTNAME={n}\n"));
            }
            std::fs::write(d.join("uevent"), uevent).expect("uevent");
            if let Some(l) = p.label {
                std::fs::write(self.root().join("labels").join(p.name), format!("{l}\n"))
                    .expect("label");
            }
        }
    }

    /// A device-mapper device (dm-verity) over `under`.
    fn dm(&self, name: &str, devnum: &str, under: &str) {
        let d = self.device(&format!("virtual/block/{name}"), name, devnum);
        std::fs::create_dir_all(d.join("slaves")).expect("mkdir");
        let target = std::fs::read_link(self.root().join("sys/class/block").join(under))
            .expect("the device beneath exists");
        // ../../devices/X relative to sys/class/block -> absolute in the fake tree.
        let abs = self
            .root()
            .join("sys/class/block")
            .join(target)
            .canonicalize()
            .expect("canonical");
        symlink(abs, d.join("slaves").join(under)).expect("symlink slave");
    }

    fn mount(&mut self, mountpoint: &str, devnum: &str, fstype: &str) {
        let id = 20 + self.mountinfo.lines().count();
        self.mountinfo.push_str(&format!(
            "{id} 1 {devnum} / {mountpoint} ro,relatime shared:1 - {fstype} src ro\n"
        ));
    }

    /// Runs the script with `shell`; returns (exit code, stdout, stderr).
    fn run(&self, shell: &str, args: &[&str]) -> (i32, String, String) {
        let mountinfo = self.root().join("mountinfo");
        std::fs::write(&mountinfo, &self.mountinfo).expect("mountinfo");
        let path = format!(
            "{}:{}",
            self.root().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(shell)
            .arg(SCRIPT)
            .args(args)
            .env("PATH", path)
            .env("BEEMESH_SYSFS", self.root().join("sys"))
            .env("BEEMESH_MOUNTINFO", &mountinfo)
            .env("BEEMESH_DEVDIR", self.root().join("dev"))
            .env("FAKE_LABELS", self.root().join("labels"))
            .output()
            .expect("run the script");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn dev(&self, name: &str) -> String {
        format!("{}\n", self.root().join("dev").join(name).display())
    }
}

fn shells() -> Vec<&'static str> {
    ["sh", "bash"]
        .into_iter()
        .filter(|s| Command::new(s).arg("-c").arg("true").status().is_ok())
        .collect()
}

/// The Debian image's disk (GPT names as the builder writes them).
fn debian_disk(h: &FakeHost) {
    h.disk(
        "pci0000:00/0000:00:04.0/virtio1",
        "vda",
        "254:0",
        &[
            part("vda1", "254:1", Some("esp"), Some("ESP")),
            part("vda2", "254:2", Some("beemesh-root"), None),
            part("vda3", "254:3", Some("BEEMESH"), Some("BEEMESH")),
            part("vda4", "254:4", Some("beemesh-data"), None),
        ],
    );
}

/// A USB stick with a partition named and labelled BEEMESH: never the boot disk.
fn hostile_stick(h: &FakeHost) {
    h.disk(
        "pci0000:00/0000:00:14.0/usb1/1-1/host6/target6:0:0/6:0:0:0",
        "sda",
        "8:0",
        &[part("sda1", "8:1", Some("BEEMESH"), Some("BEEMESH"))],
    );
}

#[test]
fn a_second_disk_with_a_beemesh_partition_is_ignored() {
    let mut h = FakeHost::new();
    // The stick is probed first (sda before vda) and, on a real host, could win by-label.
    hostile_stick(&h);
    debian_disk(&h);
    h.mount("/", "254:2", "erofs");
    h.mount("/var", "254:4", "ext4");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH", "/", "/usr"]);
        assert_eq!(code, 0, "{sh}: {err}");
        assert_eq!(out, h.dev("vda3"), "{sh}: the boot disk's partition: {err}");
        assert!(err.contains("boot disk: vda (holds /)"), "{sh}: {err}");
    }
}

#[test]
fn no_config_partition_on_the_boot_disk_means_none_even_if_a_stick_has_one() {
    let mut h = FakeHost::new();
    hostile_stick(&h);
    h.disk(
        "pci0000:00/0000:00:04.0/virtio1",
        "vda",
        "254:0",
        &[
            part("vda1", "254:1", Some("esp"), Some("ESP")),
            part("vda2", "254:2", Some("beemesh-root"), None),
        ],
    );
    h.mount("/", "254:2", "erofs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH"]);
        assert_eq!((code, out.as_str()), (0, ""), "{sh}: {err}");
        assert!(
            err.contains("no partition named or labelled BEEMESH on the boot disk vda"),
            "{sh}: {err}"
        );
    }
}

#[test]
fn a_file_system_label_alone_is_enough_on_the_boot_disk() {
    // A partition made by hand from another OS: FAT label BEEMESH, no GPT name.
    let mut h = FakeHost::new();
    h.disk(
        "pci0000:00/0000:00:1d.0/nvme/nvme0",
        "nvme0n1",
        "259:0",
        &[
            part("nvme0n1p1", "259:1", Some("esp"), Some("ESP")),
            part("nvme0n1p2", "259:2", Some("beemesh-root"), None),
            part(
                "nvme0n1p3",
                "259:3",
                Some("Basic data partition"),
                Some("BEEMESH"),
            ),
        ],
    );
    hostile_stick(&h);
    h.mount("/", "259:2", "erofs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH"]);
        assert_eq!(code, 0, "{sh}: {err}");
        assert_eq!(out, h.dev("nvme0n1p3"), "{sh}: {err}");
    }
}

#[test]
fn nixos_disk_image_is_found_through_usr_and_verity_through_its_device() {
    // NixOS: / is a tmpfs (0:N is no block device), the erofs store is mounted at /usr.
    let mut h = FakeHost::new();
    hostile_stick(&h);
    debian_disk(&h);
    h.mount("/", "0:25", "tmpfs");
    h.mount("/usr", "254:2", "erofs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH", "/", "/usr", "/iso"]);
        assert_eq!(code, 0, "{sh}: {err}");
        assert_eq!(out, h.dev("vda3"), "{sh}: {err}");
        assert!(err.contains("boot disk: vda (holds /usr)"), "{sh}: {err}");
    }

    // A dm-verity root: the disk is the one beneath the device-mapper device.
    let mut h = FakeHost::new();
    hostile_stick(&h);
    debian_disk(&h);
    h.dm("dm-0", "253:0", "vda2");
    h.mount("/", "253:0", "erofs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH"]);
        assert_eq!(code, 0, "{sh}: {err}");
        assert_eq!(out, h.dev("vda3"), "{sh}: {err}");
    }
}

#[test]
fn two_config_partitions_on_the_boot_disk_are_an_error_not_a_guess() {
    let mut h = FakeHost::new();
    h.disk(
        "pci0000:00/0000:00:04.0/virtio1",
        "vda",
        "254:0",
        &[
            part("vda2", "254:2", Some("beemesh-root"), None),
            part("vda3", "254:3", Some("BEEMESH"), Some("BEEMESH")),
            part("vda5", "254:5", None, Some("BEEMESH")),
        ],
    );
    h.mount("/", "254:2", "erofs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH"]);
        assert_eq!((code, out.as_str()), (1, ""), "{sh}: {err}");
        assert!(
            err.contains("2 partitions") && err.contains("refusing"),
            "{sh}: {err}"
        );
    }
}

#[test]
fn no_boot_disk_means_no_config_partition_and_labels_are_never_evaluated() {
    // An ISO booted from a CD: /iso is on sr0, a disk without partitions; a stick labels a
    // partition with shell syntax, which must stay data.
    let mut h = FakeHost::new();
    h.disk(
        "pci0000:00/ata1/host0/target0:0:0/0:0:0:0",
        "sr0",
        "11:0",
        &[],
    );
    let marker = h.root().join("evaluated");
    let evil = format!("$(touch {})", marker.display());
    h.disk(
        "pci0000:00/usb1/1-1/host6/target6:0:0/6:0:0:0",
        "sda",
        "8:0",
        &[part("sda1", "8:1", Some(&evil), Some(&evil))],
    );
    h.mount("/", "0:25", "tmpfs");
    h.mount("/iso", "11:0", "iso9660");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &[&evil, "/", "/usr", "/iso"]);
        assert_eq!((code, out.as_str()), (0, ""), "{sh}: {err}");
        assert!(err.contains("boot disk: sr0 (holds /iso)"), "{sh}: {err}");
    }
    assert!(!marker.exists(), "a label was evaluated as shell code");

    // Nothing on a block device at all (a netboot): nothing is read.
    let mut h = FakeHost::new();
    hostile_stick(&h);
    h.mount("/", "0:25", "tmpfs");
    for sh in shells() {
        let (code, out, err) = h.run(sh, &["BEEMESH"]);
        assert_eq!((code, out.as_str()), (0, ""), "{sh}: {err}");
        assert!(err.contains("no boot disk found"), "{sh}: {err}");
    }
}
