//! `configure` on a small disk image made here (a hand-written GPT around a mkfs.fat file
//! system): no VM, no root, no mount. Needs mkfs.fat (dosfstools) and mtools; without them
//! the tests print SKIPPED, unless BEEMESH_REQUIRE_IMAGE_TOOLS=1 (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use beemesh_image::configure::{ConfigureError, ConfigureOptions, configure, read_file};
use beemesh_image::gpt;
use beemesh_manifest::SecretKey;
use beemesh_manifest::ticket::{Binding, Ticket, default_key_path};
use time::OffsetDateTime;

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

/// A fleet ticket and its ticket key, as `beemesh ticket issue` writes them (FILE, FILE.key).
fn fleet_ticket(dir: &Path, name: &str) -> (PathBuf, String, String) {
    let adm = SecretKey::from_seed([1; 32]);
    let (ticket, key) = Ticket::issue_fleet(&adm, OffsetDateTime::now_utc(), None).expect("random");
    let path = dir.join(name);
    std::fs::write(&path, ticket.to_toml()).expect("write ticket");
    key.save_new(&default_key_path(&path)).expect("write key");
    let pem = std::fs::read_to_string(default_key_path(&path)).expect("read key");
    (path, ticket.to_toml(), pem)
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
    let (ticket, ticket_text, key_pem) = fleet_ticket(d.path(), "fleet.ticket");
    let opts = ConfigureOptions {
        host: h.clone(),
        ticket: Some(ticket),
        ticket_key: None,
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
            "ticket.key",
            "token",
            "network/10-mesh.network",
            "images/app.tar",
            "README.txt"
        ]
    );
    assert_eq!(
        read_file(&img, "ticket").expect("ticket"),
        ticket_text.as_bytes()
    );
    assert_eq!(
        read_file(&img, "ticket.key").expect("ticket key"),
        key_pem.as_bytes()
    );
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
    assert!(read_file(&img, "ticket.key").is_err());
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

#[test]
fn a_ticket_travels_with_its_key_and_only_a_usable_one_is_written() {
    if !tools_present() {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let img = disk(d.path());
    let h = host(d.path(), "");
    let with = |ticket: &Path, key: Option<&Path>| {
        configure(
            &img,
            &ConfigureOptions {
                host: h.clone(),
                ticket: Some(ticket.to_owned()),
                ticket_key: key.map(Path::to_owned),
                ..Default::default()
            },
        )
    };

    // The key kept elsewhere, named with --ticket-key.
    let (fleet, _, pem) = fleet_ticket(d.path(), "fleet.ticket");
    let moved = d.path().join("vault.key");
    std::fs::rename(default_key_path(&fleet), &moved).expect("move");
    let e = with(&fleet, None).expect_err("no key beside it");
    assert!(
        e.to_string().contains("fleet.ticket.key") && e.to_string().contains("--ticket-key"),
        "{e}"
    );
    let done = with(&fleet, Some(&moved)).expect("configured");
    assert_eq!(
        done.files,
        ["host.toml", "ticket", "ticket.key", "README.txt"]
    );
    assert_eq!(read_file(&img, "ticket.key").expect("key"), pem.as_bytes());

    // Another ticket's key.
    let (_, _, _) = fleet_ticket(d.path(), "other.ticket");
    let e = with(
        &fleet,
        Some(&default_key_path(&d.path().join("other.ticket"))),
    )
    .expect_err("wrong key");
    assert!(e.to_string().contains("but the ticket is bound to"), "{e}");

    // A peer ticket has no key, and takes none.
    let adm = SecretKey::from_seed([1; 32]);
    let peer = Ticket::issue(
        &adm,
        Binding::Peer("12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into()),
        OffsetDateTime::now_utc(),
        None,
    );
    let peer_ticket = file(d.path(), "peer.ticket", &peer.to_toml());
    let done = with(&peer_ticket, None).expect("configured");
    assert_eq!(done.files, ["host.toml", "ticket", "README.txt"]);
    assert!(read_file(&img, "ticket.key").is_err(), "no stale key stays");
    let e = with(&peer_ticket, Some(&moved)).expect_err("a key for a peer ticket");
    assert!(matches!(e, ConfigureError::Usage(_)), "{e}");

    // A fleet ticket of format 1 (a bearer credential), and something that is no ticket.
    let issued = 1_767_225_600_i64; // 2026-01-01T00:00:00Z
    let mut msg = b"beemesh/v1/admission-ticket\0".to_vec();
    for field in [&b""[..], &issued.to_be_bytes()[..], &b""[..]] {
        msg.extend_from_slice(&(field.len() as u32).to_be_bytes());
        msg.extend_from_slice(field);
    }
    let bearer = file(
        d.path(),
        "old.ticket",
        &format!(
            "version = 1\nissued = \"2026-01-01T00:00:00Z\"\nkey = \"{}\"\nsig = \"{}\"\n",
            adm.public(),
            beemesh_manifest::keys::encode_signature(&adm.sign(&msg))
        ),
    );
    let e = with(&bearer, None).expect_err("bearer");
    assert!(
        e.to_string().contains("old.ticket") && e.to_string().contains("beemesh ticket issue"),
        "{e}"
    );
    let e = with(&file(d.path(), "junk", "TICKET-1"), None).expect_err("junk");
    assert!(e.to_string().contains("not an admission ticket"), "{e}");
    // The refused calls left the last good configuration alone.
    assert_eq!(
        read_file(&img, "ticket").expect("ticket"),
        peer.to_toml().as_bytes()
    );
}
