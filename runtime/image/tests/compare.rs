//! The reproducibility check's diagnosis: two "builds" that differ name the first differing
//! partition and the first differing file. No tools needed: the disks are written here.

use std::path::{Path, PathBuf};

use beemesh_image::BuildReport;
use beemesh_image::build::{compare, sha256_file};

/// A 4 MiB disk with a GPT of two partitions ("esp" at 1 MiB, "root" at 2 MiB, 1 MiB each);
/// `root_byte` is written inside "root".
fn disk(path: &Path, root_byte: u8) {
    let mut img = vec![0u8; 4 << 20];
    let hdr = &mut img[512..1024];
    hdr[0..8].copy_from_slice(b"EFI PART");
    hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
    hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
    hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
    for (i, (name, first)) in [("esp", 2048u64), ("root", 4096u64)].iter().enumerate() {
        let e = &mut img[1024 + i * 128..1024 + (i + 1) * 128];
        e[0..16].copy_from_slice(&[0x11; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&(first + 2047).to_le_bytes());
        for (j, u) in name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    img[(2 << 20) + 100] = root_byte;
    std::fs::write(path, img).expect("write disk");
}

fn report(dir: &Path, root_byte: u8, files: &str) -> BuildReport {
    std::fs::create_dir_all(dir).expect("mkdir");
    let raw = dir.join("x.raw");
    disk(&raw, root_byte);
    let list = dir.join("x.files");
    std::fs::write(&list, files).expect("write list");
    BuildReport {
        name: "x".into(),
        raw_sha256: sha256_file(&raw).expect("sha"),
        raw,
        qcow2: PathBuf::new(),
        manifest: PathBuf::new(),
        files: list,
        qcow2_sha256: String::new(),
        raw_size: 4 << 20,
        raw_allocated: 0,
        qcow2_size: 0,
        packages: 0,
        cache_hit: false,
        lock_written: false,
        seconds: 0.0,
        steps: Vec::new(),
    }
}

#[test]
fn identical_builds_pass() {
    let d = tempfile::tempdir().expect("tempdir");
    let list = "/etc/a 644 0:0 1 aa\n";
    let a = report(&d.path().join("a"), 0, list);
    let b = report(&d.path().join("b"), 0, list);
    compare(&a, &b).expect("identical");
}

#[test]
fn a_difference_names_the_partition_and_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let a = report(
        &d.path().join("a"),
        1,
        "/etc/a 644 0:0 1 aa\n/etc/shadow 640 0:42 9 s1\n",
    );
    let b = report(
        &d.path().join("b"),
        2,
        "/etc/a 644 0:0 1 aa\n/etc/shadow 640 0:42 9 s2\n",
    );
    let msg = compare(&a, &b).expect_err("differs");
    assert!(msg.starts_with("NOT REPRODUCIBLE"), "{msg}");
    assert!(msg.contains("first differing partition: root (#2"), "{msg}");
    assert!(msg.contains("/etc/shadow 640 0:42 9 s1"), "{msg}");
    assert!(msg.contains("/etc/shadow 640 0:42 9 s2"), "{msg}");

    // Same files, different bytes: the metadata of the partition differs.
    let c = report(&d.path().join("c"), 3, "/etc/a 644 0:0 1 aa\n");
    let e = report(&d.path().join("e"), 4, "/etc/a 644 0:0 1 aa\n");
    let msg = compare(&c, &e).expect_err("differs");
    assert!(msg.contains("file system metadata"), "{msg}");
}
