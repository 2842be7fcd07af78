//! `beemesh image build`: spec -> `<name>.raw` + `<name>.qcow2` + `<name>.manifest.json`.
//!
//! Steps (each one function, each driving one tool):
//! 1. packages: `mmdebstrap` makes a root file system tarball from the spec's packages (or
//!    the lock's exact versions); the tarball is cached by everything that determines it;
//! 2. customize: the beemesh binary, the baked host config, the `beemesh` user, systemd units,
//!    the packages' /var kept read-only at /usr/share/factory/var (the real /var is the
//!    data partition, filled by systemd-tmpfiles at boot);
//! 3. root: `mkfs.erofs` (fixed timestamp and UUID);
//! 4. ESP: `mkfs.fat` + `mcopy`: systemd-boot, the kernel, the initramfs, one boot entry;
//! 5. config: an empty `BEEMESH` FAT partition for `beemesh image configure`;
//! 6. disk: `systemd-repart` assembles the GPT from the three partition images;
//! 7. qcow2: `qemu-img convert`;
//! 8. manifest: packages, versions, digests, partitions and the images' SHA-256.
//!
//! Everything that could vary between two builds is pinned: timestamps come from
//! SOURCE_DATE_EPOCH, UUIDs and volume ids from the spec's hash, machine-id is empty (set at
//! boot), no random seed is written, and the initramfs is built by initramfs-tools, which
//! honours SOURCE_DATE_EPOCH.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::lock::{self, LOCK_VERSION, Lock, LockedPackage};
use crate::progress::Steps;
use crate::spec::{ImageSpec, LoadedSpec, hex};
use crate::tools::{self, BUILD_TOOLS, ToolError, command, run};
use crate::{gpt, rootfs_files};

/// The GPT type of the `BEEMESH` config partition (a FAT file system). Fixed, so tools can
/// find it by type as well as by name; the data partition is `linux-generic`.
pub const CONFIG_PARTITION_TYPE: &str = "8b1e6b2c-5d59-4f1e-9a54-3c0a7b7e6d21";
/// GPT partition names (the root is found by PARTUUID, the data partition by name).
pub const ROOT_PARTITION_NAME: &str = "beemesh-root";
pub const ESP_PARTITION_NAME: &str = "esp";
/// The uid of the `beemesh` user (its units name it: user@1000.service).
pub const BEEMESH_UID: u32 = 1000;

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/beemesh-image";

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub spec: PathBuf,
    pub out: PathBuf,
    /// Build exactly the lock file's packages; fail if the spec asks for another set.
    pub locked: bool,
    /// Resolve the packages afresh and rewrite the lock file.
    pub update_lock: bool,
    /// Overrides the spec's `host.beemesh`.
    pub beemesh: Option<PathBuf>,
    /// Where the package tarball is cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Keep the work directory (the unpacked root file system) for inspection.
    pub keep_work: bool,
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{0}")]
    Lock(String),
    #[error("{what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |cause| BuildError::Io {
        what,
        path: path.to_owned(),
        cause,
    }
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub name: String,
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub manifest: PathBuf,
    pub files: PathBuf,
    pub raw_sha256: String,
    pub qcow2_sha256: String,
    /// Apparent size of the raw disk (the spec's disk size) and the bytes it occupies.
    pub raw_size: u64,
    pub raw_allocated: u64,
    pub qcow2_size: u64,
    pub packages: usize,
    pub cache_hit: bool,
    pub lock_written: bool,
    pub seconds: f64,
    pub steps: Vec<(String, f64)>,
}

/// SHA-256 of a file. Large files go to coreutils' sha256sum, which is much faster than
/// unoptimised (debug) builds of this crate.
pub fn sha256_file(path: &Path) -> Result<String, BuildError> {
    let len = std::fs::metadata(path)
        .map_err(io("cannot stat", path))?
        .len();
    if len > 8 << 20
        && let Ok(out) = run(std::process::Command::new("sha256sum").arg("--").arg(path))
        && let Some(sum) = out.split_whitespace().next()
        && sum.len() == 64
    {
        return Ok(sum.to_owned());
    }
    let mut f = std::fs::File::open(path).map_err(io("cannot read", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("cannot read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Runs the whole build.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    tools::check_root("beemesh image build")?;
    tools::check_tools(BUILD_TOOLS)?;
    let spec = ImageSpec::load(&opts.spec)?;
    let epoch = spec.epoch();
    let binary = opts
        .beemesh
        .clone()
        .unwrap_or_else(|| spec.resolve(&spec.spec.host.beemesh));
    if !binary.is_file() {
        return Err(BuildError::Other(format!(
            "the beemesh binary {} does not exist: build it (cargo build --release -p \
             beemesh-cli) or pass --beemesh PATH",
            binary.display()
        )));
    }
    let name = spec.spec.name.clone();
    std::fs::create_dir_all(&opts.out).map_err(io("cannot create", &opts.out))?;
    let work = opts.out.join(format!(".{name}.work"));
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io("cannot clean", &work))?;
    }
    std::fs::create_dir_all(&work).map_err(io("cannot create", &work))?;

    let mut steps = Steps::new(8, opts.quiet);
    let result = (|| -> Result<BuildReport, BuildError> {
        steps.start("packages (mmdebstrap)");
        let (tarball, packages, cache_hit, lock_written) =
            packages_step(&spec, opts, &work, epoch, &steps)?;

        steps.start("customize the root file system");
        let root = work.join("rootfs");
        unpack(&tarball, &root, epoch)?;
        if !cache_hit && opts.cache_dir.is_none() {
            let _ = std::fs::remove_file(&tarball);
        }
        customize(&spec, &root, &binary, epoch)?;
        let (kernel, initrd) = boot_files(&root)?;
        let mut listing = file_list(&root)?;

        steps.start("root file system (mkfs.erofs)");
        let root_img = work.join("root.erofs");
        run(command("mkfs.erofs", epoch)
            .arg("-zlz4hc")
            .arg(format!("-T{epoch}"))
            .arg(format!("-U{}", spec.uuid("root-fs")))
            .arg("--quiet")
            .arg(&root_img)
            .arg(&root))?;

        steps.start("EFI system partition (mkfs.fat, mcopy)");
        let esp = work.join("esp.img");
        let cmdline = kernel_cmdline(&spec);
        let esp_files = esp_contents(&root, &kernel, &initrd, &cmdline, &work)?;
        for (dest, src) in &esp_files {
            listing.push(format!("esp:{dest} {}", sha256_file(src)?));
        }
        make_fat(
            &esp,
            spec.spec.disk.esp_size.bytes(),
            "ESP",
            &spec.volume_id("esp"),
            epoch,
            &esp_files,
        )?;

        steps.start("config partition BEEMESH (mkfs.fat)");
        let config = work.join("config.img");
        let readme = work.join("README.txt");
        std::fs::write(&readme, crate::configure::README).map_err(io("cannot write", &readme))?;
        make_fat(
            &config,
            spec.spec.disk.config_size.bytes(),
            crate::configure::CONFIG_LABEL,
            &spec.volume_id("config"),
            epoch,
            &[("README.txt".to_owned(), readme)],
        )?;
        let files = opts.out.join(format!("{name}.files"));
        std::fs::write(&files, listing.join("\n") + "\n").map_err(io("cannot write", &files))?;

        steps.start("GPT disk (systemd-repart)");
        let raw = opts.out.join(format!("{name}.raw"));
        assemble(&spec, &work, &root_img, &esp, &config, &raw, epoch)?;

        steps.start("qcow2 (qemu-img convert)");
        let qcow2 = opts.out.join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&qcow2);
        run(command("qemu-img", epoch)
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2))?;

        steps.start("manifest (sha256)");
        let raw_sha256 = sha256_file(&raw)?;
        let qcow2_sha256 = sha256_file(&qcow2)?;
        let binary_sha256 = sha256_file(&root.join("usr/bin/beemesh"))?;
        let raw_meta = std::fs::metadata(&raw).map_err(io("cannot stat", &raw))?;
        let qcow2_size = std::fs::metadata(&qcow2)
            .map_err(io("cannot stat", &qcow2))?
            .len();
        let parts = gpt::partitions(&raw).map_err(BuildError::Other)?;
        let manifest = opts.out.join(format!("{name}.manifest.json"));
        let doc = json!({
            "name": name,
            "spec": spec.path,
            "spec_sha256": spec.hash_hex(),
            "source_date_epoch": epoch,
            "debian": {
                "suite": spec.spec.debian.suite,
                "mirror": spec.spec.debian.mirror,
                "architecture": spec.spec.debian.architecture,
            },
            "kernel_cmdline": cmdline,
            "debug": spec.spec.debug,
            "beemesh": { "sha256": binary_sha256 },
            "inputs": {
                "lock_sha256": sha256_file(&spec.lock_path())?,
                "host_defaults_sha256": sha256_file(&spec.resolve(&spec.spec.host.defaults))?,
            },
            "partitions": parts.iter().map(|p| json!({
                "index": p.index, "name": p.name, "type": p.type_guid,
                "offset": p.offset, "size": p.size,
            })).collect::<Vec<_>>(),
            "package_count": packages.len(),
            "packages": packages,
            "images": {
                "raw": { "file": raw.file_name().map(|f| f.to_string_lossy().into_owned()), "sha256": raw_sha256, "size": raw_meta.len() },
                "qcow2": { "file": qcow2.file_name().map(|f| f.to_string_lossy().into_owned()), "sha256": qcow2_sha256, "size": qcow2_size },
            },
            "tools": {
                "mmdebstrap": tools::version("mmdebstrap", "--version"),
                "mkfs.erofs": tools::version("mkfs.erofs", "--version"),
                "systemd-repart": tools::version("systemd-repart", "--version"),
                "qemu-img": tools::version("qemu-img", "--version"),
            },
        });
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| BuildError::Other(e.to_string()))?;
        std::fs::write(&manifest, text + "\n").map_err(io("cannot write", &manifest))?;
        steps.finish();
        Ok(BuildReport {
            name: name.clone(),
            raw,
            qcow2,
            manifest,
            files,
            raw_sha256,
            qcow2_sha256,
            raw_size: raw_meta.len(),
            raw_allocated: raw_meta.blocks() * 512,
            qcow2_size,
            packages: packages.len(),
            cache_hit,
            lock_written,
            seconds: 0.0,
            steps: Vec::new(),
        })
    })();
    if result.is_err() {
        steps.fail();
    }
    if !opts.keep_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    report.steps = std::mem::take(&mut steps.timings);
    Ok(report)
}

/// The builder's kernel arguments followed by the spec's.
pub fn kernel_cmdline(spec: &LoadedSpec) -> String {
    let mut args = vec![
        format!("root=PARTUUID={}", spec.uuid("root-partition")),
        "rootfstype=erofs".to_owned(),
        "ro".to_owned(),
        // The partitions are found by the units, not by the auto-generator (which would try
        // to mount the ESP and guess at /var).
        "systemd.gpt_auto=0".to_owned(),
    ];
    args.extend(spec.spec.boot.cmdline.iter().cloned());
    if spec.spec.debug.serial_console {
        args.push("systemd.journald.forward_to_console=1".to_owned());
    }
    args.join(" ")
}

// ---------------------------------------------------------------------------------------------
// 1. packages

/// Everything that determines the mmdebstrap tarball, hashed: the cache key.
fn cache_key(spec: &LoadedSpec, pins: &[String], epoch: u64) -> String {
    let mut h = Sha256::new();
    for part in [
        "beemesh-image-packages-v1",
        &tools::version("mmdebstrap", "--version"),
        &spec.spec.debian.suite,
        &spec.spec.debian.mirror,
        &spec.spec.debian.architecture,
        ESSENTIAL_HOOK,
        &epoch.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for p in pins {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// Puts `erofs` into every initramfs the kernel package builds (the root is erofs).
const ESSENTIAL_HOOK: &str = "mkdir -p \"$1/usr/share/initramfs-tools/modules.d\" && \
     echo erofs > \"$1/usr/share/initramfs-tools/modules.d/beemesh-erofs\"";

/// Returns the tarball, the installed packages (with digests), whether the cache served it
/// and whether the lock file was (re)written.
fn packages_step(
    spec: &LoadedSpec,
    opts: &BuildOptions,
    work: &Path,
    epoch: u64,
    steps: &Steps,
) -> Result<(PathBuf, Vec<LockedPackage>, bool, bool), BuildError> {
    let requested = spec.requested_packages();
    let lock_path = spec.lock_path();
    let existing = Lock::load(&lock_path).map_err(BuildError::Lock)?;
    let usable = existing.as_ref().filter(|l| {
        l.version == LOCK_VERSION
            && l.requested == requested
            && l.suite == spec.spec.debian.suite
            && l.mirror == spec.spec.debian.mirror
            && l.architecture == spec.spec.debian.architecture
    });
    if opts.locked && opts.update_lock {
        return Err(BuildError::Lock(
            "--locked and --update-lock contradict each other".into(),
        ));
    }
    let lock = match (usable, opts.locked, opts.update_lock) {
        (_, _, true) => None,
        (Some(l), _, _) => Some(l.clone()),
        (None, true, _) => {
            return Err(BuildError::Lock(match existing {
                None => format!(
                    "--locked: {} does not exist; build once without --locked to resolve and write it",
                    lock_path.display()
                ),
                Some(_) => format!(
                    "--locked: {} was resolved for another package list, suite or mirror than {} \
                     asks for; build without --locked (or with --update-lock) to resolve again",
                    lock_path.display(),
                    spec.path.display()
                ),
            }));
        }
        (None, false, false) => None,
    };

    let includes: Vec<String> = match &lock {
        Some(l) => l.packages.iter().map(LockedPackage::pin).collect(),
        None => requested.clone(),
    };
    let tar = work.join("packages.tar");

    // The cache holds only tarballs built from a lock: their content is determined by the
    // key (exact versions, verified by digest after every build), so reusing one cannot
    // change the image.
    let key = lock.as_ref().map(|_| cache_key(spec, &includes, epoch));
    if let (Some(dir), Some(key)) = (&opts.cache_dir, &key) {
        let cached = dir.join(format!("packages-{key}.tar"));
        let sum = dir.join(format!("packages-{key}.sha256"));
        if let (true, Ok(want)) = (cached.is_file(), std::fs::read_to_string(&sum)) {
            steps.note("cached tarball; verifying its digest");
            if sha256_file(&cached)? == want.trim() {
                let packages = lock
                    .as_ref()
                    .map(|l| l.packages.clone())
                    .unwrap_or_default();
                return Ok((cached, packages, true, false));
            }
            steps.note("cached tarball is corrupt; rebuilding it");
            let _ = std::fs::remove_file(&cached);
        }
    }

    let out = work.join("mmdebstrap-out");
    std::fs::create_dir_all(&out).map_err(io("cannot create", &out))?;
    let digests_hook = format!(
        "dpkg-query --admindir=\"$1/var/lib/dpkg\" -W -f='${{Package}}=${{Version}}\\n' | sort > {out}/installed && \
         xargs -a {out}/installed apt-cache show --no-all-versions > {out}/avail",
        out = out.display()
    );
    let mut cmd = command("mmdebstrap", epoch);
    cmd.args([
        "--variant=essential",
        "--mode=root",
        "--format=tar",
        "--quiet",
    ])
    .arg(format!("--architectures={}", spec.spec.debian.architecture))
    .arg(format!("--include={}", includes.join(",")))
    .arg(format!("--essential-hook={ESSENTIAL_HOOK}"))
    .arg(format!("--customize-hook={digests_hook}"))
    .arg(&spec.spec.debian.suite)
    .arg(&tar)
    .arg(&spec.spec.debian.mirror);
    steps.note(&format!("{} packages requested", includes.len()));
    run(&mut cmd)?;

    let installed_text = std::fs::read_to_string(out.join("installed"))
        .map_err(io("cannot read", &out.join("installed")))?;
    let avail = std::fs::read_to_string(out.join("avail"))
        .map_err(io("cannot read", &out.join("avail")))?;
    let installed = lock::parse_installed(&installed_text);
    let packages = lock::packages_from_stanzas(&avail, &installed).map_err(BuildError::Lock)?;

    let mut lock_written = false;
    match &lock {
        Some(l) => {
            let diff = l.differences(&packages);
            if !diff.is_empty() {
                return Err(BuildError::Lock(format!(
                    "the packages installed differ from {}:\n  {}",
                    lock_path.display(),
                    diff.join("\n  ")
                )));
            }
        }
        None => {
            let new = Lock {
                version: LOCK_VERSION,
                suite: spec.spec.debian.suite.clone(),
                mirror: spec.spec.debian.mirror.clone(),
                architecture: spec.spec.debian.architecture.clone(),
                requested,
                packages: packages.clone(),
            };
            std::fs::write(&lock_path, new.to_toml()).map_err(io("cannot write", &lock_path))?;
            lock_written = true;
        }
    }

    // Cache what was built from (or has just become) the lock.
    if let Some(dir) = &opts.cache_dir {
        let pins: Vec<String> = packages.iter().map(LockedPackage::pin).collect();
        let key = cache_key(spec, &pins, epoch);
        if std::fs::create_dir_all(dir).is_ok() {
            let cached = dir.join(format!("packages-{key}.tar"));
            let tmp = dir.join(format!(".packages-{key}.tar.{}", std::process::id()));
            if std::fs::copy(&tar, &tmp).is_ok() {
                let sum = sha256_file(&tmp)?;
                let _ = std::fs::write(dir.join(format!("packages-{key}.sha256")), &sum);
                let _ = std::fs::rename(&tmp, &cached);
            }
        }
    }
    Ok((tar, packages, false, lock_written))
}

// ---------------------------------------------------------------------------------------------
// 2. customize

fn unpack(tar: &Path, root: &Path, epoch: u64) -> Result<(), BuildError> {
    std::fs::create_dir_all(root).map_err(io("cannot create", root))?;
    run(command("tar", epoch)
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(tar)
        .arg("-C")
        .arg(root))?;
    Ok(())
}

fn write_file(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<(), BuildError> {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    }
    if tools::exists(&path) {
        std::fs::remove_file(&path).map_err(io("cannot replace", &path))?;
    }
    std::fs::write(&path, bytes).map_err(io("cannot write", &path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot chmod", &path))?;
    Ok(())
}

fn symlink(root: &Path, rel: &str, target: &str) -> Result<(), BuildError> {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    }
    if tools::exists(&path) {
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path).map_err(io("cannot replace", &path))?;
        } else {
            std::fs::remove_file(&path).map_err(io("cannot replace", &path))?;
        }
    }
    std::os::unix::fs::symlink(target, &path).map_err(io("cannot link", &path))
}

fn customize(spec: &LoadedSpec, root: &Path, binary: &Path, epoch: u64) -> Result<(), BuildError> {
    // The files of the image's design (units, scripts, configs): runtime/image/rootfs/.
    for (rel, bytes, mode) in rootfs_files::FILES {
        write_file(root, rel, bytes, *mode)?;
    }

    // The node binary, stripped (a debug build shrinks from about 130 MiB to 50 MiB).
    let dest = root.join("usr/bin/beemesh");
    std::fs::copy(binary, &dest).map_err(io("cannot copy", binary))?;
    run(command("strip", epoch).arg(&dest))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(io("cannot chmod", &dest))?;

    // The baked host config: used when the config partition has none.
    let defaults = spec.resolve(&spec.spec.host.defaults);
    let text = std::fs::read(&defaults).map_err(io("cannot read", &defaults))?;
    write_file(root, "/etc/beemesh/host.toml", &text, 0o644)?;

    // The unprivileged user the node runs as: a regular uid (so useradd gives it a
    // subordinate id range for rootless Podman), home on the data partition, no shell, no
    // password, lingering (its user manager and podman.socket start at boot).
    run(command("chroot", epoch).arg(root).args([
        "useradd",
        "--uid",
        &BEEMESH_UID.to_string(),
        "--user-group",
        "--home-dir",
        "/var/home/beemesh",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "BeeMesh node",
        "beemesh",
    ]))?;
    for f in ["etc/subuid", "etc/subgid"] {
        let path = root.join(f);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.lines().any(|l| l.starts_with("beemesh:")) {
            std::fs::write(&path, format!("{text}beemesh:100000:65536\n"))
                .map_err(io("cannot write", &path))?;
        }
    }
    // No password logins: root has no usable password (and there is no SSH server).
    run(command("chroot", epoch)
        .arg(root)
        .args(["usermod", "--password", "!*", "root"]))?;

    let systemctl = |args: &[&str]| {
        run(command("systemctl", epoch)
            .arg(format!("--root={}", root.display()))
            .args(args))
    };
    systemctl(&[
        "enable",
        "beemesh.service",
        "beemesh-config.service",
        "beemesh-images.service",
        "systemd-networkd.service",
        "systemd-resolved.service",
    ])?;
    // Only the beemesh user's rootless Podman runs; the packages' root-level Podman units
    // (a root API socket, restart and auto-update jobs) and the dpkg database backup (the
    // database is not on the data partition) never start.
    systemctl(&[
        "mask",
        "podman.service",
        "podman.socket",
        "podman-restart.service",
        "podman-auto-update.service",
        "podman-auto-update.timer",
        "podman-clean-transient.service",
        "dpkg-db-backup.timer",
        "dpkg-db-backup.service",
    ])?;
    systemctl(&["--global", "enable", "podman.socket"])?;
    if spec.spec.debug.serial_console {
        write_file(
            root,
            "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
            b"# [debug] serial_console: a root shell on the serial console, for tests only.\n\
              [Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM\n",
            0o644,
        )?;
    } else {
        for unit in [
            "getty@.service",
            "serial-getty@.service",
            "console-getty.service",
            "container-getty@.service",
            "autovt@.service",
        ] {
            symlink(root, &format!("/etc/systemd/system/{unit}"), "/dev/null")?;
        }
    }

    // Per-boot identity is created at boot, never baked in: an empty machine-id makes
    // systemd generate one, and no random seed is shipped.
    write_file(root, "/etc/machine-id", b"", 0o444)?;
    for f in [
        "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
        "etc/hostname",
    ] {
        let p = root.join(f);
        if tools::exists(&p) {
            std::fs::remove_file(&p).map_err(io("cannot remove", &p))?;
        }
    }
    write_file(root, "/etc/hostname", b"beemesh\n", 0o644)?;

    // /var is the data partition, empty at first boot; systemd-tmpfiles creates what the
    // host needs there (usr/lib/tmpfiles.d/beemesh.conf: the linger flag, the beemesh home,
    // the journal). The packages' /var (the dpkg database) stays in the image, read-only, at
    // /usr/share/factory/var: `dpkg --admindir=/usr/share/factory/var/lib/dpkg -l` lists
    // what is installed.
    let var = root.join("var");
    let factory = root.join("usr/share/factory/var");
    std::fs::create_dir_all(factory.parent().unwrap_or(root))
        .map_err(io("cannot create", &factory))?;
    if tools::exists(&factory) {
        std::fs::remove_dir_all(&factory).map_err(io("cannot replace", &factory))?;
    }
    for dir in ["var/cache/apt", "var/lib/apt/lists", "var/log"] {
        // Caches and build logs: regenerated or irrelevant on a host.
        let p = root.join(dir);
        if p.is_dir() {
            for e in std::fs::read_dir(&p)
                .map_err(io("cannot read", &p))?
                .flatten()
            {
                let path = e.path();
                if path.is_dir() && !path.is_symlink() {
                    let _ = std::fs::remove_dir_all(&path);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    std::fs::rename(&var, &factory).map_err(io("cannot move", &var))?;
    std::fs::create_dir(&var).map_err(io("cannot create", &var))?;
    std::fs::set_permissions(&var, std::fs::Permissions::from_mode(0o755))
        .map_err(io("cannot chmod", &var))?;
    Ok(())
}

/// The one kernel and initramfs the packages installed.
fn boot_files(root: &Path) -> Result<(PathBuf, PathBuf), BuildError> {
    let boot = root.join("boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(io("cannot read", &boot))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let [kernel] = kernels.as_slice() else {
        return Err(BuildError::Other(format!(
            "expected exactly one kernel in /boot, found {kernels:?}"
        )));
    };
    let version = kernel
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.is_file() {
        return Err(BuildError::Other(format!(
            "no initramfs {} for kernel {version}",
            initrd.display()
        )));
    }
    Ok((kernel.clone(), initrd))
}

/// One line per file of the root file system (path, type, mode, owner, size, SHA-256 or
/// link target), sorted: what the reproducibility check compares to name a differing file.
fn file_list(root: &Path) -> Result<Vec<String>, BuildError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io("cannot read", &dir))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let m = p.symlink_metadata().map_err(io("cannot stat", &p))?;
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let kind = if m.is_symlink() {
                format!(
                    "-> {}",
                    std::fs::read_link(&p)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                )
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if m.is_file() {
                format!("{} {}", m.len(), sha256_file(&p)?)
            } else {
                format!("special {:x}", m.rdev())
            };
            out.push(format!(
                "/{rel} {:o} {}:{} {kind}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ));
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 3-5. file systems

/// (path on the ESP, local file) for systemd-boot, the kernel, the initramfs and the entry.
fn esp_contents(
    root: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    work: &Path,
) -> Result<Vec<(String, PathBuf)>, BuildError> {
    let sdboot = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !sdboot.is_file() {
        return Err(BuildError::Other(format!(
            "{} is missing: the image needs the systemd-boot-efi package",
            sdboot.display()
        )));
    }
    let loader = work.join("loader.conf");
    std::fs::write(
        &loader,
        "default beemesh.conf\ntimeout 0\nconsole-mode keep\neditor no\n",
    )
    .map_err(io("cannot write", &loader))?;
    let entry = work.join("beemesh.conf");
    std::fs::write(
        &entry,
        format!(
            "title BeeMesh\nlinux /beemesh/vmlinuz\ninitrd /beemesh/initrd.img\noptions {cmdline}\n"
        ),
    )
    .map_err(io("cannot write", &entry))?;
    Ok(vec![
        ("EFI/BOOT/BOOTX64.EFI".to_owned(), sdboot.clone()),
        ("EFI/systemd/systemd-bootx64.efi".to_owned(), sdboot),
        ("loader/loader.conf".to_owned(), loader),
        ("loader/entries/beemesh.conf".to_owned(), entry),
        ("beemesh/vmlinuz".to_owned(), kernel.to_owned()),
        ("beemesh/initrd.img".to_owned(), initrd.to_owned()),
    ])
}

/// A FAT file system image of `size` bytes holding `files`, every timestamp at `epoch`.
fn make_fat(
    img: &Path,
    size: u64,
    label: &str,
    volume_id: &str,
    epoch: u64,
    files: &[(String, PathBuf)],
) -> Result<(), BuildError> {
    let _ = std::fs::remove_file(img);
    let f = std::fs::File::create(img).map_err(io("cannot create", img))?;
    f.set_len(size).map_err(io("cannot size", img))?;
    drop(f);
    run(command("mkfs.fat", epoch)
        .args(["--invariant", "-i", volume_id, "-n", label])
        .arg(img))?;
    let target = img.display().to_string();
    let mut dirs: Vec<String> = Vec::new();
    for (dest, _) in files {
        let parts: Vec<&str> = dest.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    for d in &dirs {
        run(command("mmd", epoch)
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &target])
            .arg(format!("::/{d}")))?;
    }
    for (dest, src) in files {
        // mcopy -m keeps the source's modification time: pin it first.
        let copy = img.with_extension(format!("src.{}", dest.replace('/', "_")));
        std::fs::copy(src, &copy).map_err(io("cannot copy", src))?;
        let fh = std::fs::File::options()
            .write(true)
            .open(&copy)
            .map_err(io("cannot open", &copy))?;
        fh.set_modified(mtime)
            .map_err(io("cannot set the time of", &copy))?;
        drop(fh);
        run(command("mcopy", epoch)
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-m", "-i", &target])
            .arg(&copy)
            .arg(format!("::/{dest}")))?;
        let _ = std::fs::remove_file(&copy);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. disk

fn assemble(
    spec: &LoadedSpec,
    work: &Path,
    root_img: &Path,
    esp: &Path,
    config: &Path,
    raw: &Path,
    epoch: u64,
) -> Result<(), BuildError> {
    let defs = work.join("repart.d");
    std::fs::create_dir_all(&defs).map_err(io("cannot create", &defs))?;
    let partitions: BTreeMap<&str, String> = BTreeMap::from([
        (
            "10-esp.conf",
            format!(
                "[Partition]\nType=esp\nLabel={ESP_PARTITION_NAME}\nUUID={}\nCopyBlocks={}\n",
                spec.uuid("esp-partition"),
                esp.display()
            ),
        ),
        (
            "20-root.conf",
            format!(
                "[Partition]\nType=root\nLabel={ROOT_PARTITION_NAME}\nUUID={}\nCopyBlocks={}\nReadOnly=yes\n",
                spec.uuid("root-partition"),
                root_img.display()
            ),
        ),
        (
            "30-config.conf",
            format!(
                "[Partition]\nType={CONFIG_PARTITION_TYPE}\nLabel={}\nUUID={}\nCopyBlocks={}\n",
                crate::configure::CONFIG_LABEL,
                spec.uuid("config-partition"),
                config.display()
            ),
        ),
    ]);
    for (name, text) in &partitions {
        let p = defs.join(name);
        std::fs::write(&p, text).map_err(io("cannot write", &p))?;
    }
    let _ = std::fs::remove_file(raw);
    run(command("systemd-repart", epoch)
        .args(["--empty=create", "--dry-run=no", "--no-pager"])
        .arg(format!("--size={}", spec.spec.disk.size.bytes()))
        .arg(format!("--seed={}", spec.uuid("disk")))
        .arg(format!("--definitions={}", defs.display()))
        .arg(raw))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The reproducibility check

/// Compares two builds of one spec: `Ok(())` when the raw images are identical, else an
/// error naming the first differing partition and the first differing file inside.
pub fn compare(a: &BuildReport, b: &BuildReport) -> Result<(), String> {
    if a.raw_sha256 == b.raw_sha256 {
        return Ok(());
    }
    let mut msg = format!(
        "NOT REPRODUCIBLE: {} has sha256 {} but {} has {}",
        a.raw.display(),
        a.raw_sha256,
        b.raw.display(),
        b.raw_sha256
    );
    let pa = gpt::partitions(&a.raw).unwrap_or_default();
    let pb = gpt::partitions(&b.raw).unwrap_or_default();
    if pa != pb {
        msg.push_str(&format!(
            "\n  the partition tables differ: {pa:?} vs {pb:?}"
        ));
    } else {
        for p in &pa {
            let same = range_equal(&a.raw, &b.raw, p.offset, p.size).unwrap_or(false);
            if !same {
                msg.push_str(&format!(
                    "\n  first differing partition: {} (#{}, {} bytes at {})",
                    p.name, p.index, p.size, p.offset
                ));
                break;
            }
        }
    }
    let la = std::fs::read_to_string(&a.files).unwrap_or_default();
    let lb = std::fs::read_to_string(&b.files).unwrap_or_default();
    match la.lines().zip(lb.lines()).find(|(x, y)| x != y) {
        Some((x, y)) => msg.push_str(&format!("\n  first differing file:\n    {x}\n    {y}")),
        None if la.lines().count() != lb.lines().count() => msg.push_str(&format!(
            "\n  one file list is longer: {} vs {} entries",
            la.lines().count(),
            lb.lines().count()
        )),
        None => msg.push_str(
            "\n  every file (path, mode, owner, content) is identical: the difference is in \
             file system metadata (timestamps, layout) of the partition above",
        ),
    }
    Err(msg)
}

fn range_equal(a: &Path, b: &Path, offset: u64, size: u64) -> std::io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    fa.seek(SeekFrom::Start(offset))?;
    fb.seek(SeekFrom::Start(offset))?;
    let mut left = size;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}
