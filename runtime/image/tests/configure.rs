//! `configure` on a small disk image made here (a hand-written GPT around a mkfs.fat file
//! system): no VM, no root, no mount. Needs mkfs.fat (dosfstools) and mtools; without them
//! the tests print SKIPPED, unless BEEMESH_REQUIRE_IMAGE_TOOLS=1 (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use beemesh_image::configure::{ConfigureError, ConfigureOptions, configure, read_file};
use beemesh_image::gpt;

const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

fn tools_present() -> bool {
    let ok = ["mkfs.fat", "mcopy", "mdir", "mtype"]
        .iter()
        .all(|t| beemesh_image::tools::which(t).is_some());
    if !ok {
        assert!(
            std::env::var("BEEMESH_REQUIRE_IMAGE_TOOLS").is_err(),
            "mkfs.fat and mtools are required (apt-get install dosfstools mtools)"
        );
        eprintln!("SKIPPED: mkfs.fat or mtools missing (apt-get install dosfstools mtools)");
    }
    ok
}

/// A 10 MiB disk: GPT with one partition named BEEMESH (8 MiB FAT at 1 MiB).
fn disk(dir: &Path) -> PathBuf {
    let fat = dir.join("fat.img");
    std::fs::File::create(&fat)
        .and_then(|f| f.set_len(8 << 20))
        .expect("fat file");
    let st = Command::new(beemesh_image::tools::which("mkfs.fat").expect("mkfs.fat"))
        .args(["-n", "BEEMESH"])
        .arg(&fat)
        .output()
        .expect("mkfs.fat runs");
    assert!(st.status.success(), "{st:?}");
    let mut img = vec![0u8; 10 << 20];
    let hdr = &mut img[512..1024];
    hdr[0..8].copy_from_slice(b"EFI PART");
    hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
    hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
    hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
    let e = &mut img[1024..1024 + 128];
    e[0..16].copy_from_slice(&[0x2c; 16]);
    e[32..40].copy_from_slice(&2048u64.to_le_bytes());
    e[40..48].copy_from_slice(&(2048u64 + (8 << 20) / 512 - 1).to_le_bytes());
    for (i, u) in "BEEMESH".encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let fat_bytes = std::fs::read(&fat).expect("read fat");
    img[1 << 20..(1 << 20) + fat_bytes.len()].copy_from_slice(&fat_bytes);
    let path = dir.join("disk.raw");
    std::fs::write(&path, img).expect("write disk");
    path
}

fn host(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("host.toml");
    std::fs::write(
        &p,
        format!("[trust]\ndomain = \"example.org\"\nsigners = [\"{KEY}\"]\nadmission = \"{KEY}\"\n{extra}"),
    )
    .expect("write host");
    p
}

fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn gpt_reader_finds_the_partition() {
    if !tools_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let img = disk(d.path());
    let p = gpt::find(&img, "BEEMESH").expect("found");
    assert_eq!((p.offset, p.size, p.index), (1 << 20, 8 << 20, 1));
    let e = gpt::find(&img, "nope").expect_err("absent");
    assert!(e.contains("\"BEEMESH\""), "{e}");
    let not_gpt = file(d.path(), "plain", &"x".repeat(4096));
    assert!(
        gpt::partitions(&not_gpt)
            .expect_err("no gpt")
            .contains("no GPT")
    );
}

#[test]
fn configure_writes_exactly_the_hosts_files() {
    if !tools_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let img = disk(d.path());
    let h = host(
        d.path(),
        "[api]\nlisten = \"0.0.0.0:7420\"\ntoken_file = \"/run/beemesh-config/token\"\n",
    );
    let opts = ConfigureOptions {
        host: h.clone(),
        ticket: Some(file(d.path(), "ticket", "TICKET-1")),
        bootstrap: Some(file(
            d.path(),
            "peers",
            "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWPeer\n",
        )),
        token: Some(file(d.path(), "token", "0123456789abcdef0123")),
        network: vec![file(d.path(), "10-mesh.network", "[Match]\nName=en*\n")],
        images: vec![file(d.path(), "app.tar", "not really a tar")],
    };
    let done = configure(&img, &opts).expect("configured");
    assert_eq!(
        done.files,
        [
            "host.toml",
            "ticket",
            "token",
            "network/10-mesh.network",
            "images/app.tar",
            "README.txt"
        ]
    );
    assert_eq!(read_file(&img, "ticket").expect("ticket"), b"TICKET-1");
    assert_eq!(
        read_file(&img, "network/10-mesh.network").expect("net"),
        b"[Match]\nName=en*\n"
    );
    let written = String::from_utf8(read_file(&img, "host.toml").expect("host")).expect("utf8");
    assert!(
        written.contains("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWPeer"),
        "{written}"
    );
    beemesh_manifest::HostConfig::from_toml("written", &written).expect("still valid");

    // Configuring again replaces everything: no stale ticket, token or network file stays.
    let again = ConfigureOptions {
        host: host(d.path(), ""),
        ..Default::default()
    };
    let done = configure(&img, &again).expect("configured again");
    assert_eq!(done.files, ["host.toml", "README.txt"]);
    assert!(
        done.notes.iter().any(|n| n.contains("--ticket")),
        "{:?}",
        done.notes
    );
    assert!(read_file(&img, "ticket").is_err());
    assert!(read_file(&img, "network/10-mesh.network").is_err());
    assert!(read_file(&img, "images/app.tar").is_err());
}

#[test]
fn configure_refuses_an_invalid_host_config_and_a_missing_token() {
    if !tools_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let img = disk(d.path());
    let bad = file(
        d.path(),
        "bad.toml",
        "[trust]\ndomain = \"example.org\"\nsigners = []\n",
    );
    let e = configure(
        &img,
        &ConfigureOptions {
            host: bad,
            ..Default::default()
        },
    )
    .expect_err("invalid");
    let chain = format!("{:?}", anyhow_chain(&e));
    assert!(chain.contains("trust.signers"), "{chain}");
    assert!(chain.contains("bad.toml:3"), "{chain}");

    let needs_token = host(
        d.path(),
        "[api]\nlisten = \"0.0.0.0:7420\"\ntoken_file = \"/run/beemesh-config/token\"\n",
    );
    let e = configure(
        &img,
        &ConfigureOptions {
            host: needs_token,
            ..Default::default()
        },
    )
    .expect_err("token missing");
    assert!(
        matches!(e, ConfigureError::Usage(ref m) if m.contains("--token")),
        "{e}"
    );
    // Nothing was written by the refused calls.
    assert!(read_file(&img, "host.toml").is_err());
}

fn anyhow_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}
