//! End-to-end tests of the `beemesh` binary: exit codes, messages and files, as an operator
//! sees them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use tempfile::TempDir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example(name: &str) -> PathBuf {
    repo().join("examples").join(name)
}

fn beemesh() -> Command {
    let mut c = Command::cargo_bin("beemesh").expect("binary is built");
    c.env_remove("BEEMESH_API");
    c
}

fn stdout_of(c: &mut Command) -> String {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Generates a key in `dir` and returns (path, public key).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let public = stdout_of(beemesh().args(["key", "gen", "--out"]).arg(&path));
    (path, public.trim().to_owned())
}

fn sign(manifest: &Path, key: &Path, out: &Path) {
    beemesh()
        .arg("sign")
        .arg(manifest)
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(out)
        .assert()
        .success();
}

/// A host config trusting `signers` with `threshold`.
fn host_config(dir: &Path, signers: &[&str], threshold: u32) -> PathBuf {
    let text = fs::read_to_string(example("host.toml")).expect("example host.toml");
    let list = signers
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("signers = ") {
            out.push_str(&format!("signers = [{list}]\n"));
        } else if line.starts_with("threshold = ") {
            out.push_str(&format!("threshold = {threshold}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join("host.toml");
    fs::write(&path, out).expect("write host.toml");
    path
}

#[test]
fn key_gen_writes_a_private_file_and_never_overwrites() {
    let dir = TempDir::new().expect("tempdir");
    let (path, public) = keygen(dir.path(), "op.key");
    assert!(public.starts_with("ed25519:"), "{public}");
    let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = fs::read(&path).expect("read");
    beemesh()
        .args(["key", "gen", "--out"])
        .arg(&path)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "already exists; refusing to overwrite",
        ));
    assert_eq!(fs::read(&path).expect("read"), before);
    let shown = stdout_of(beemesh().args(["key", "show"]).arg(&path));
    assert_eq!(shown.trim(), public);
    let json: serde_json::Value = serde_json::from_str(&stdout_of(
        beemesh().args(["key", "show", "-o", "json"]).arg(&path),
    ))
    .expect("json");
    assert_eq!(json["public_key"], public.as_str());
}

#[test]
fn sign_then_verify_with_signer_and_with_host_config() {
    let dir = TempDir::new().expect("tempdir");
    let (key, public) = keygen(dir.path(), "op.key");
    let signed = dir.path().join("hello.signed.toml");
    sign(&example("hello.toml"), &key, &signed);
    // The embedded manifest is the example's exact bytes.
    let envelope = fs::read_to_string(&signed).expect("read");
    assert!(envelope.starts_with("manifest = \"\"\"\n"));
    beemesh()
        .arg("verify")
        .arg(&signed)
        .arg("--signer")
        .arg(&key)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "ok: default/hello generation 1 (sha256:",
        ));
    let host = host_config(dir.path(), &[&public], 1);
    let out = stdout_of(
        beemesh()
            .args(["verify", "-o", "json", "--trust"])
            .arg(&host)
            .arg(&signed),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["valid"], true);
    assert_eq!(v["name"], "hello");
    let digest = v["content_id"].as_str().expect("content id");
    let expected = {
        use sha2::Digest;
        let sum = sha2::Sha256::digest(fs::read(example("hello.toml")).expect("read"));
        format!(
            "sha256:{}",
            sum.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    assert_eq!(
        digest, expected,
        "content id is the SHA-256 of the manifest bytes"
    );
}

#[test]
fn threshold_collects_signatures_from_distinct_keys() {
    let dir = TempDir::new().expect("tempdir");
    let (a, _) = keygen(dir.path(), "a.key");
    let (b, _) = keygen(dir.path(), "b.key");
    let signed = dir.path().join("s.toml");
    sign(&example("hello.toml"), &a, &signed);
    let verify2 = || {
        let mut c = beemesh();
        c.arg("verify")
            .arg(&signed)
            .arg("--signer")
            .arg(&a)
            .arg("--signer")
            .arg(&b)
            .args(["--threshold", "2"]);
        c
    };
    verify2().assert().code(1).stderr(predicate::str::contains(
        "1 valid signature(s) from trusted signers, 2 needed",
    ));
    // Signing again with the same key adds nothing.
    sign(&signed, &a, &signed);
    verify2().assert().code(1);
    // The second key completes the threshold; the file is updated in place.
    sign(&signed, &b, &signed);
    verify2()
        .assert()
        .success()
        .stdout(predicate::str::contains("2 of 2 required signature(s)"));
}

#[test]
fn tampered_or_foreign_signed_manifests_are_refused() {
    let dir = TempDir::new().expect("tempdir");
    let (a, _) = keygen(dir.path(), "a.key");
    let (stranger, _) = keygen(dir.path(), "stranger.key");
    let signed = dir.path().join("s.toml");
    sign(&example("hello.toml"), &a, &signed);

    let text = fs::read_to_string(&signed).expect("read");
    let tampered = dir.path().join("tampered.toml");
    fs::write(&tampered, text.replace("replicas = 3", "replicas = 9")).expect("write");
    beemesh()
        .arg("verify")
        .arg(&tampered)
        .arg("--signer")
        .arg(&a)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "signature does not verify (the manifest or the signature was altered)",
        ));

    beemesh()
        .arg("verify")
        .arg(&signed)
        .arg("--signer")
        .arg(&stranger)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "key is not among the trusted signers",
        ));

    // Adding a signature to a tampered file is refused, and the file is left as it was.
    beemesh()
        .arg("sign")
        .arg(&tampered)
        .arg("--key")
        .arg(&a)
        .arg("--out")
        .arg(&tampered)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "refusing to add a signature to a file that was altered",
        ));
    assert!(
        fs::read_to_string(&tampered)
            .expect("read")
            .contains("replicas = 9")
    );
}

#[test]
fn expiry_is_enforced() {
    let dir = TempDir::new().expect("tempdir");
    let (a, _) = keygen(dir.path(), "a.key");
    let manifest = dir.path().join("m.toml");
    let text = fs::read_to_string(example("hello.toml"))
        .expect("read")
        .replace(
            "generation = 1 ",
            "expires = \"2020-01-01T00:00:00Z\"\ngeneration = 1 ",
        );
    fs::write(&manifest, text).expect("write");
    let signed = dir.path().join("s.toml");
    sign(&manifest, &a, &signed);
    beemesh()
        .arg("verify")
        .arg(&signed)
        .arg("--signer")
        .arg(&a)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("expired at 2020-01-01T00:00:00Z"));
    beemesh()
        .arg("verify")
        .arg(&signed)
        .arg("--signer")
        .arg(&a)
        .args(["--at", "2019-12-31T23:00:00Z"])
        .assert()
        .success();
}

#[test]
fn sign_refuses_an_invalid_manifest_with_file_line_and_key() {
    let dir = TempDir::new().expect("tempdir");
    let (a, _) = keygen(dir.path(), "a.key");
    let manifest = dir.path().join("bad.toml");
    let text = fs::read_to_string(example("hello.toml"))
        .expect("read")
        .replace("replicas = 3", "replicas = 0")
        .replace("memory = \"32Mi\"", "memory = \"lots\"");
    fs::write(&manifest, text).expect("write");
    let out = dir.path().join("out.toml");
    beemesh()
        .arg("sign")
        .arg(&manifest)
        .arg("--key")
        .arg(&a)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("bad.toml:26:").and(predicate::str::contains(
                "container[0].resources.memory: \"lots\" is not a valid memory quantity",
            )),
        );
    assert!(!out.exists(), "nothing is written on failure");
}

#[test]
fn config_check_accepts_the_example_and_locates_every_problem() {
    beemesh()
        .args(["config", "check"])
        .arg(example("host.toml"))
        .assert()
        .success()
        .stdout(predicate::str::contains("ok (node edge-01"));

    let dir = TempDir::new().expect("tempdir");
    let bad = dir.path().join("host.toml");
    let text = fs::read_to_string(example("host.toml"))
        .expect("read")
        .replace("name = \"edge-01\"", "name = \"edge 01\"")
        .replace("threshold = 1", "threshold = 3");
    fs::write(&bad, text).expect("write");
    let assert = beemesh()
        .args(["config", "check"])
        .arg(&bad)
        .assert()
        .code(1);
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).expect("utf8");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines[0].starts_with("beemesh: error: "), "{stderr}");
    assert!(lines[0].ends_with("(and 1 more problem)"), "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("host.toml:5:8: node.name: \"edge 01\" contains ' '")),
        "{stderr}"
    );
    assert!(
        lines.iter().any(|l| l.contains("host.toml:17:13: trust.threshold: 3 signatures can never be collected from 1 distinct signer")),
        "{stderr}"
    );

    let json = beemesh()
        .args(["config", "check", "-o", "json"])
        .arg(&bad)
        .assert()
        .code(1);
    let v: serde_json::Value = serde_json::from_slice(&json.get_output().stdout).expect("json");
    assert_eq!(v["valid"], false);
    assert_eq!(v["diagnostics"][0]["key"], "node.name");
    assert_eq!(v["diagnostics"][0]["line"], 5);
}

#[test]
fn bad_input_gives_actionable_errors_not_panics() {
    let dir = TempDir::new().expect("tempdir");
    let cases: &[(&str, &str, &str)] = &[
        ("malformed.toml", "[trust\ndomain = 1", "malformed.toml:1:"),
        (
            "unknown.toml",
            "[trust]\ndomain = \"a.org\"\nsigners = []\nsigner = 1\n",
            "unknown field `signer`",
        ),
        (
            "types.toml",
            "[trust]\ndomain = 7\nsigners = []\n",
            "trust.domain: invalid type: integer `7`, expected a string",
        ),
        (
            "quantity.toml",
            "[trust]\ndomain = \"a.org\"\nsigners = [\"ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU=\"]\n[resources]\nreserve = { cpu = \"half\" }\n",
            "resources.reserve.cpu: \"half\" is not a valid CPU quantity",
        ),
        ("binary.toml", "\u{0}\u{1}\u{2}", "binary.toml:1:"),
    ];
    for (name, text, expect) in cases {
        let path = dir.path().join(name);
        fs::write(&path, text).expect("write");
        beemesh()
            .args(["config", "check"])
            .arg(&path)
            .assert()
            .code(1)
            .stderr(
                predicate::str::contains(*expect).and(predicate::str::contains("panicked").not()),
            );
    }
    let not_utf8 = dir.path().join("latin1.toml");
    fs::write(&not_utf8, b"name = \"caf\xe9\"").expect("write");
    beemesh()
        .args(["config", "check"])
        .arg(&not_utf8)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "not valid UTF-8 (first bad byte at offset 11)",
        ));
}

#[test]
fn oversized_input_is_refused_by_a_limit() {
    let dir = TempDir::new().expect("tempdir");
    let (a, _) = keygen(dir.path(), "a.key");
    // A sparse 100 MiB file: refused from its size without reading it.
    let big = dir.path().join("big.toml");
    fs::File::create(&big)
        .expect("create")
        .set_len(100 << 20)
        .expect("grow");
    for args in [
        vec!["config", "check"],
        vec!["kube", "convert"],
        vec![
            "verify",
            "--signer",
            "ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU=",
        ],
    ] {
        beemesh()
            .args(&args)
            .arg(&big)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("larger than the limit"));
    }
    beemesh()
        .arg("sign")
        .arg(&big)
        .arg("--key")
        .arg(&a)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("larger than the limit"));
    // An endless stream is cut off at the limit too.
    beemesh()
        .args(["config", "check", "/dev/zero"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "/dev/zero: larger than the limit of 262144 bytes",
        ));
}

#[test]
fn kube_convert_examples_and_refuse_unsupported_fields() {
    for file in ["deployment.yaml", "statefulset.yaml"] {
        let out = stdout_of(
            beemesh()
                .args(["kube", "convert"])
                .arg(example(&format!("kube/{file}"))),
        );
        assert!(out.contains("api = \"beemesh/v1\""), "{out}");
    }
    let sts = stdout_of(
        beemesh()
            .args(["kube", "convert", "-o", "json"])
            .arg(example("kube/statefulset.yaml")),
    );
    let v: serde_json::Value = serde_json::from_str(&sts).expect("json");
    let manifest = v[0]["manifest"].as_str().expect("manifest text");
    assert!(manifest.contains("mode = \"strong\""), "{manifest}");

    let dir = TempDir::new().expect("tempdir");
    let bad = dir.path().join("hostpath.yaml");
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    image: busybox\n  volumes:\n  - name: h\n    hostPath:\n      path: /etc\n",
    )
    .expect("write");
    beemesh()
        .args(["kube", "convert"])
        .arg(&bad)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("spec.volumes[0].hostPath"));

    // --out-dir writes one file per manifest, each of which can be signed as it is.
    let out_dir = dir.path().join("out");
    beemesh()
        .args(["kube", "convert", "--generation", "7", "--out-dir"])
        .arg(&out_dir)
        .arg(example("kube/deployment.yaml"))
        .assert()
        .success();
    let (key, _) = keygen(dir.path(), "k.key");
    let mut files: Vec<_> = fs::read_dir(&out_dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in &files {
        let text = fs::read_to_string(f).expect("read");
        assert!(text.contains("generation = 7"), "{text}");
        sign(f, &key, &dir.path().join("x.signed.toml"));
    }
    // A second run refuses to overwrite and writes nothing.
    beemesh()
        .args(["kube", "convert", "--out-dir"])
        .arg(&out_dir)
        .arg(example("kube/deployment.yaml"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("refusing to overwrite"));
}

#[test]
fn usage_errors_exit_2() {
    beemesh().assert().code(2);
    beemesh().arg("frobnicate").assert().code(2);
    beemesh().args(["key", "gen"]).assert().code(2);
    beemesh()
        .args(["verify", "x.toml"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--trust"));
    beemesh()
        .args(["verify", "x.toml", "--signer", "k", "--threshold", "0"])
        .assert()
        .code(2);
    beemesh()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("First steps"));
}

#[test]
fn ticket_issue_writes_fleet_and_peer_tickets() {
    let dir = TempDir::new().expect("tempdir");
    let (adm, public) = keygen(dir.path(), "adm.key");
    let fleet = dir.path().join("fleet.ticket");
    beemesh()
        .args(["ticket", "issue", "--expires", "720h", "--key"])
        .arg(&adm)
        .arg("--out")
        .arg(&fleet)
        .assert()
        .success()
        .stderr(predicate::str::contains("fleet ticket written"));
    let text = fs::read_to_string(&fleet).expect("read");
    assert!(text.contains(&format!("key = \"{public}\"")), "{text}");
    assert!(text.contains("expires = "), "{text}");
    assert!(!text.contains("peer = "), "{text}");
    // The fleet ticket is bound to a ticket key, whose secret half is beside it (0600).
    let key_file = dir.path().join("fleet.ticket.key");
    let holder = stdout_of(beemesh().args(["key", "show"]).arg(&key_file));
    assert!(
        text.contains(&format!("holder = \"{}\"", holder.trim())),
        "{text}"
    );
    for f in [&fleet, &key_file] {
        let mode = fs::metadata(f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // Never overwritten: neither the ticket, nor a key where the new ticket's would go.
    let key_before = fs::read(&key_file).expect("key");
    beemesh()
        .args(["ticket", "issue", "--key"])
        .arg(&adm)
        .arg("--out")
        .arg(&fleet)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists"));
    assert_eq!(fs::read(&key_file).expect("key"), key_before);
    let lone_key = dir.path().join("lone.ticket");
    fs::write(dir.path().join("lone.ticket.key"), "someone's key").expect("write");
    beemesh()
        .args(["ticket", "issue", "--key"])
        .arg(&adm)
        .arg("--out")
        .arg(&lone_key)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("lone.ticket.key: already exists"));
    assert!(!lone_key.exists(), "no ticket without its key");
    assert_eq!(
        fs::read_to_string(dir.path().join("lone.ticket.key")).expect("read"),
        "someone's key"
    );
    let peer = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    let bound = dir.path().join("peer.ticket");
    let v: serde_json::Value = serde_json::from_str(&stdout_of(
        beemesh()
            .args(["ticket", "issue", "-o", "json", "--peer", peer, "--key"])
            .arg(&adm)
            .arg("--out")
            .arg(&bound),
    ))
    .expect("json");
    assert_eq!(v["fleet"], false);
    assert_eq!(v["peer"], peer);
    // A peer ticket needs no key: noise authenticates the PeerId it names.
    assert!(v["key_file"].is_null() && v["ticket_key"].is_null(), "{v}");
    assert!(!dir.path().join("peer.ticket.key").exists());
    for (args, err) in [
        (vec!["--peer", "not-a-peer"], "is not a libp2p PeerId"),
        (vec!["--expires", "2001-01-01T00:00:00Z"], "in the past"),
    ] {
        beemesh()
            .args(["ticket", "issue"])
            .args(&args)
            .arg("--key")
            .arg(&adm)
            .arg("--out")
            .arg(dir.path().join("x.ticket"))
            .assert()
            .code(1)
            .stderr(predicate::str::contains(err));
    }
    beemesh()
        .args(["ticket", "issue", "--expires", "soon", "--key"])
        .arg(&adm)
        .arg("--out")
        .arg(dir.path().join("y.ticket"))
        .assert()
        .code(2);
}

/// A fleet ticket of format version 1 (no ticket key: a bearer credential), as releases before
/// the ticket key wrote it; built here from that format's signing rule.
fn bearer_ticket(admission: &Path) -> String {
    use time::format_description::well_known::Rfc3339;
    let adm = beemesh_manifest::SecretKey::load(admission).expect("admission key");
    let issued = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("time");
    let mut msg = b"beemesh/v1/admission-ticket\0".to_vec();
    for field in [
        &b""[..],
        &issued.unix_timestamp().to_be_bytes()[..],
        &b""[..],
    ] {
        msg.extend_from_slice(&(field.len() as u32).to_be_bytes());
        msg.extend_from_slice(field);
    }
    format!(
        "version = 1\nissued = \"{}\"\nkey = \"{}\"\nsig = \"{}\"\n",
        issued.format(&Rfc3339).expect("format"),
        adm.public(),
        beemesh_manifest::keys::encode_signature(&adm.sign(&msg)),
    )
}

#[test]
fn a_node_refuses_a_fleet_ticket_it_cannot_prove() {
    let dir = TempDir::new().expect("tempdir");
    let (_, op_pub) = keygen(dir.path(), "op.key");
    let (adm, adm_pub) = keygen(dir.path(), "adm.key");
    let (stranger, _) = keygen(dir.path(), "stranger.key");
    let issue = |name: &str| {
        let ticket = dir.path().join(name);
        beemesh()
            .args(["ticket", "issue", "--key"])
            .arg(&adm)
            .arg("--out")
            .arg(&ticket)
            .assert()
            .success();
        ticket
    };
    let without_key = issue("lost.ticket");
    fs::remove_file(dir.path().join("lost.ticket.key")).expect("remove");
    let bearer = dir.path().join("old.ticket");
    fs::write(&bearer, bearer_ticket(&adm)).expect("write");
    let cases = [
        (
            "missing key",
            &without_key,
            None,
            vec![
                "cannot read ticket key",
                "lost.ticket.key",
                "set trust.ticket_key",
            ],
        ),
        (
            "another key",
            &issue("good.ticket"),
            Some(&stranger),
            vec!["is not this ticket's key"],
        ),
        (
            "format 1 fleet ticket",
            &bearer,
            None,
            vec!["no ticket key (format version 1)", "beemesh ticket issue"],
        ),
    ];
    for (case, ticket, key, expect) in cases {
        let root = dir.path().join(case.replace(' ', "-"));
        let host = root.join("host.toml");
        fs::create_dir_all(&root).expect("dir");
        let key_line = key
            .map(|k| format!("ticket_key = \"{}\"\n", k.display()))
            .unwrap_or_default();
        fs::write(
            &host,
            format!(
                "[node]\ndata_dir = \"{}\"\n[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n\
                 [trust]\ndomain = \"example.org\"\nsigners = [\"{op_pub}\"]\nadmission = \"{adm_pub}\"\n\
                 ticket = \"{}\"\n{key_line}\
                 [runtime]\ndriver = \"process\"\n[api]\nsocket = \"{}\"\n[sandbox]\nlandlock = \"off\"\n",
                root.join("data").display(),
                ticket.display(),
                root.join("run/api.sock").display(),
            ),
        )
        .expect("host.toml");
        let out = beemesh()
            .args(["node", "--config"])
            .arg(&host)
            .timeout(std::time::Duration::from_secs(60))
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{case}: expected {e:?} in {stderr}");
        }
    }
}

/// A `beemesh node` process, killed when dropped.
struct NodeProcess(std::process::Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn remote_commands_against_a_running_node() {
    let dir = TempDir::new().expect("tempdir");
    let mesh = test_mesh(dir.path());
    let op = mesh.op.clone();
    let (_node, sock) = start_node(dir.path(), &mesh, "solo", None, "required");
    let api = |c: &mut Command| {
        c.arg("--api").arg(&sock);
    };

    let mut c = beemesh();
    api(&mut c);
    let status: serde_json::Value =
        serde_json::from_str(&stdout_of(c.args(["status", "-o", "json"]))).expect("json");
    assert_eq!(status["name"], "solo");
    assert_eq!(status["peers"], 0);
    // The daemon confined itself before serving: Landlock (this kernel has it), no_new_privs,
    // no capabilities.
    let sandbox = &status["sandbox"];
    assert_eq!(sandbox["mode"], "required", "{sandbox}");
    assert!(
        sandbox["landlock"]["abi"]
            .as_i64()
            .is_some_and(|abi| abi >= 1),
        "{sandbox}"
    );
    assert_eq!(sandbox["no_new_privs"], true, "{sandbox}");
    assert_eq!(
        sandbox["capabilities"]["effective"],
        serde_json::json!([]),
        "{sandbox}"
    );
    assert!(
        status["peer_id"]
            .as_str()
            .is_some_and(|p| p.starts_with("12D3KooW")),
        "{status}"
    );

    let signed = dir.path().join("hello.signed.toml");
    sign(&example("hello.toml"), &op, &signed);
    let mut c = beemesh();
    api(&mut c);
    c.arg("apply")
        .arg(&signed)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "default/hello generation 1 accepted",
        ));
    let mut c = beemesh();
    api(&mut c);
    let list: serde_json::Value =
        serde_json::from_str(&stdout_of(c.args(["get", "workloads", "-o", "json"]))).expect("json");
    assert_eq!(list[0]["name"], "hello");
    assert_eq!(list[0]["generation"], 1);
    assert_eq!(list[0]["replicas"], 3);
    assert!(list[0]["placements"].is_array());

    // A manifest signed by a stranger is refused with the reason.
    let (stranger, _) = keygen(dir.path(), "stranger.key");
    let foreign = dir.path().join("foreign.toml");
    let text = fs::read_to_string(example("hello.toml"))
        .expect("read")
        .replace("generation = 1 ", "generation = 5 ");
    let unsigned = dir.path().join("m.toml");
    fs::write(&unsigned, text).expect("write");
    sign(&unsigned, &stranger, &foreign);
    let mut c = beemesh();
    api(&mut c);
    c.arg("apply").arg(&foreign).assert().code(1).stderr(
        predicate::str::contains("403")
            .and(predicate::str::contains("not among the trusted signers")),
    );

    // delete signs a tombstone one generation up.
    let mut c = beemesh();
    api(&mut c);
    c.args(["delete", "default/hello", "--key"])
        .arg(&op)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "default/hello deleted (generation 2)",
        ));
    let mut c = beemesh();
    api(&mut c);
    c.args(["get", "workloads"])
        .assert()
        .success()
        .stdout(predicate::str::contains("deleted"));
    let mut c = beemesh();
    api(&mut c);
    c.args(["get", "peers", "-o", "json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("[]"));

    // No node at the given socket: a clear error.
    beemesh()
        .args(["status", "--api"])
        .arg(dir.path().join("nothing.sock"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot reach the node API"));
}

/// `beemesh dev` as a new user meets it: start it, follow the printed commands.
#[test]
fn dev_mesh_runs_the_printed_commands() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("beemesh"))
        .args(["dev", "--nodes", "2"])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("beemesh dev starts");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = NodeProcess(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("Ctrl-C");
            let _ = tx.send(line);
            if done {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while lines
        .last()
        .is_none_or(|l: &String| !l.starts_with("Ctrl-C"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("beemesh dev printed no instructions; so far: {lines:#?}"));
        lines.push(line);
    }
    let api = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("export BEEMESH_API="))
        .expect("an export line")
        .to_owned();
    // Run every printed `beemesh ...` command as written, with BEEMESH_API exported.
    let commands: Vec<Vec<String>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("  beemesh "))
        .map(|c| c.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert!(commands.iter().any(|c| c[0] == "apply"), "{lines:#?}");
    let mut last = String::new();
    for c in &commands {
        let out = beemesh()
            .env("BEEMESH_API", &api)
            .current_dir(repo())
            .args(c)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "`beemesh {}` failed: {}",
            c.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    assert!(
        last.contains("default/hello"),
        "get workloads lists the example: {last}"
    );
}

#[test]
fn logs_and_apply_wait_usage_errors_exit_2() {
    beemesh()
        .args(["logs", "--help"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("--follow")
                .and(predicate::str::contains("--tail"))
                .and(predicate::str::contains("--replica")),
        );
    beemesh()
        .args(["apply", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--wait").and(predicate::str::contains("--timeout")));
    beemesh().arg("logs").assert().code(2);
    beemesh()
        .args(["logs", "hello"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("expected NAMESPACE/NAME"));
    beemesh()
        .args(["logs", "Default/hello"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("namespace"));
    beemesh()
        .args(["logs", "default/hello", "--tail", "20000"])
        .assert()
        .code(2);
    beemesh()
        .args(["logs", "default/hello", "--replica", "-1"])
        .assert()
        .code(2);
    // --timeout belongs to --wait, and must be a duration.
    beemesh()
        .args(["apply", "x.toml", "--timeout", "5m"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--wait"));
    beemesh()
        .args(["apply", "x.toml", "--wait", "--timeout", "soon"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not a duration"));
    beemesh()
        .args(["apply", "x.toml", "--wait", "--timeout", "0s"])
        .assert()
        .code(2);
    beemesh()
        .args(["delete", "default/x", "--key", "k", "--out", "f", "--wait"])
        .assert()
        .code(2);
    // No node: a clear error, exit 1.
    let dir = TempDir::new().expect("tempdir");
    beemesh()
        .args(["logs", "default/hello", "--api"])
        .arg(dir.path().join("nothing.sock"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot reach the node API"));
}

/// Keys and a fleet ticket for a test mesh.
struct TestMesh {
    op: PathBuf,
    op_pub: String,
    adm_pub: String,
    ticket: PathBuf,
    ticket_key: PathBuf,
}

fn test_mesh(dir: &Path) -> TestMesh {
    let (op, op_pub) = keygen(dir, "op.key");
    let (adm, adm_pub) = keygen(dir, "adm.key");
    let ticket = dir.join("ticket");
    beemesh()
        .args(["ticket", "issue", "--key"])
        .arg(&adm)
        .arg("--out")
        .arg(&ticket)
        .assert()
        .success();
    // Kept elsewhere than beside the ticket, so that `[trust] ticket_key` is what finds it.
    let ticket_key = dir.join("secret").join("fleet-ticket.key");
    fs::create_dir_all(dir.join("secret")).expect("dir");
    fs::rename(dir.join("ticket.key"), &ticket_key).expect("move the ticket key");
    TestMesh {
        op,
        op_pub,
        adm_pub,
        ticket,
        ticket_key,
    }
}

/// Starts `beemesh node` (process driver) named `name` and waits until its API answers;
/// returns the process and its API socket.
fn start_node(
    dir: &Path,
    mesh: &TestMesh,
    name: &str,
    bootstrap: Option<&str>,
    landlock: &str,
) -> (NodeProcess, PathBuf) {
    let root = dir.join(name);
    fs::create_dir_all(&root).expect("node dir");
    // The API socket in a directory of its own: the daemon may write there, and must not be
    // able to write its config (the sandbox refuses a config beneath a writable directory).
    let sock = root.join("run/api.sock");
    let host = root.join("host.toml");
    fs::write(
        &host,
        format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\n[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n\
             bootstrap = [{}]\n\
             [trust]\ndomain = \"example.org\"\nsigners = [\"{}\"]\nadmission = \"{}\"\nticket = \"{}\"\nticket_key = \"{}\"\n\
             [runtime]\ndriver = \"process\"\n[api]\nsocket = \"{}\"\n[sandbox]\nlandlock = \"{landlock}\"\n",
            root.join("data").display(),
            bootstrap.map(|b| format!("{b:?}")).unwrap_or_default(),
            mesh.op_pub,
            mesh.adm_pub,
            mesh.ticket.display(),
            mesh.ticket_key.display(),
            sock.display()
        ),
    )
    .expect("host.toml");
    let log = fs::File::create(root.join("node.log")).expect("log");
    let node = NodeProcess(
        std::process::Command::new(assert_cmd::cargo::cargo_bin("beemesh"))
            .args(["node", "--config"])
            .arg(&host)
            .stderr(log)
            .spawn()
            .expect("node starts"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !beemesh()
        .arg("--api")
        .arg(&sock)
        .arg("status")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node API never answered: {}",
            fs::read_to_string(root.join("node.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (node, sock)
}

/// `beemesh status -o json` of the node at `sock`.
fn status_of(sock: &Path) -> serde_json::Value {
    let out = stdout_of(
        beemesh()
            .arg("--api")
            .arg(sock)
            .args(["status", "-o", "json"]),
    );
    serde_json::from_str(&out).expect("status JSON")
}

/// Two nodes, "one" and "two" (the second bootstrapped from the first), once each sees the
/// other; with their API sockets.
fn start_pair(
    dir: &Path,
    mesh: &TestMesh,
    landlock: &str,
) -> (NodeProcess, PathBuf, NodeProcess, PathBuf) {
    let (one, sock) = start_node(dir, mesh, "one", None, landlock);
    let status = status_of(&sock);
    let boot = format!(
        "{}/p2p/{}",
        status["listen"][0].as_str().expect("a listen address"),
        status["peer_id"].as_str().expect("a peer id")
    );
    let (two, sock_two) = start_node(dir, mesh, "two", Some(&boot), landlock);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while status_of(&sock)["peers"] != 1 || status_of(&sock_two)["peers"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two nodes never saw each other"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (one, sock, two, sock_two)
}

#[test]
fn apply_wait_logs_and_delete_wait_against_a_running_node() {
    let dir = TempDir::new().expect("tempdir");
    let mesh = test_mesh(dir.path());
    let op = mesh.op.clone();
    let (_one, sock, _two, _sock_two) = start_pair(dir.path(), &mesh, "best-effort");
    let api = |c: &mut Command| {
        c.arg("--api").arg(&sock);
    };
    let manifest = dir.path().join("talker.toml");
    fs::write(
        &manifest,
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"talker\"\ngeneration = 1\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\n\
         command = [\"sh\", \"-c\", \"echo hello-from-replica; echo second; exec sleep 3600\"]\n\
         resources = { cpu = \"10m\", memory = \"16Mi\" }\n",
    )
    .expect("manifest");
    let signed = dir.path().join("talker.signed.toml");
    sign(&manifest, &op, &signed);

    // --wait returns once the replica runs: progress on stderr, a summary on stdout.
    let mut c = beemesh();
    api(&mut c);
    let out = c
        .args(["apply", "--wait", "--timeout", "60s"])
        .arg(&signed)
        .output()
        .expect("runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("default/talker generation 1 accepted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("default/talker generation 1: 1/1 running (one)")
            || stdout.contains("default/talker generation 1: 1/1 running (two)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("talker: 1/1 placed, 1/1 running (one running)")
            || stderr.contains("talker: 1/1 placed, 1/1 running (two running)"),
        "{stderr}"
    );

    // The replica's output; its first lines are written as it starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut c = beemesh();
        api(&mut c);
        let out = c.args(["logs", "default/talker"]).output().expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("main | second") {
            assert!(text.contains("main | hello-from-replica\n"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "logs never showed the replica's lines: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut c = beemesh();
    api(&mut c);
    let json = stdout_of(c.args(["logs", "default/talker", "--tail", "1", "-o", "json"]));
    let line: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON line");
    assert_eq!(line["container"], "main");
    assert_eq!(line["line"], "second");
    let mut c = beemesh();
    api(&mut c);
    c.args(["logs", "default/talker", "--replica", "4"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("there is no replica 4"));
    let mut c = beemesh();
    api(&mut c);
    c.args(["logs", "default/nobody"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no workload default/nobody"));

    // A workload no node can take: --wait gives up after its timeout, naming what is missing.
    let nowhere = dir.path().join("nowhere.toml");
    fs::write(
        &nowhere,
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"nowhere\"\ngeneration = 1\n\
         [placement]\nreplicas = 1\nselector = { zone = \"mars\" }\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"600\"]\n",
    )
    .expect("manifest");
    let signed_nowhere = dir.path().join("nowhere.signed.toml");
    sign(&nowhere, &op, &signed_nowhere);
    let mut c = beemesh();
    api(&mut c);
    c.args(["apply", "--wait", "--timeout", "3s"])
        .arg(&signed_nowhere)
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("timed out after 3s waiting for default/nowhere generation 1")
                .and(predicate::str::contains(
                    "0/1 running; missing: replica 0 not placed",
                )),
        );

    // delete --wait returns once no replica is left.
    let mut c = beemesh();
    api(&mut c);
    c.args([
        "delete",
        "default/talker",
        "--wait",
        "--timeout",
        "60s",
        "--key",
    ])
    .arg(&op)
    .assert()
    .success()
    .stdout(predicate::str::contains("default/talker: no replica left"));
    let mut c = beemesh();
    api(&mut c);
    c.args(["logs", "default/talker"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("was deleted"));
}

/// Polls `beemesh logs NS/NAME` of the node at `sock` until a line contains `needle`;
/// returns the whole output.
fn wait_for_logs(sock: &Path, workload: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = beemesh()
            .arg("--api")
            .arg(sock)
            .args(["logs", workload])
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "logs of {workload} never showed {needle:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_process_driver_workload_cannot_reach_the_node_api_of_a_confined_daemon() {
    let dir = TempDir::new().expect("tempdir");
    let mesh = test_mesh(dir.path());
    // Two nodes (a lone node places nothing it has no record of), both confined.
    let (_one, sock, _two, sock_two) = start_pair(dir.path(), &mesh, "required");
    assert_ne!(
        status_of(&sock)["sandbox"]["landlock"]["enforcement"],
        "not-enforced"
    );

    // A replica that tries its own node's API socket (<node dir>/run/api.sock; HOME is
    // <node dir>/data/process/<replica>/data) with the program a user would use.
    let manifest = dir.path().join("prober.toml");
    fs::write(
        &manifest,
        format!(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"prober\"\ngeneration = 1\n\
             [[container]]\nname = \"main\"\nimage = \"none\"\n\
             command = [\"/bin/sh\", \"-c\", '''{}''']\n\
             resources = {{ cpu = \"10m\", memory = \"32Mi\" }}\n",
            r#"SOCK="${HOME%/data/process/*}/run/api.sock"; echo "socket=$SOCK"; perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]); print $s ? "api=connected\n" : "api=failed: $!\n"' "$SOCK"; exec sleep 3600"#,
        ),
    )
    .expect("manifest");
    let signed = dir.path().join("prober.signed.toml");
    sign(&manifest, &mesh.op, &signed);
    beemesh()
        .arg("--api")
        .arg(&sock)
        .args(["apply", "--wait", "--timeout", "60s"])
        .arg(&signed)
        .assert()
        .success();
    let logs = wait_for_logs(&sock, "default/prober", "api=");
    assert!(
        logs.contains(&format!("socket={}", sock.display()))
            || logs.contains(&format!("socket={}", sock_two.display())),
        "the replica must have tried its node's socket: {logs}"
    );
    assert!(
        logs.contains("main | api=failed: No such file or directory"),
        "the workload must not find the API socket: {logs}"
    );
    // The same program outside the driver connects to either node's API.
    for s in [&sock, &sock_two] {
        let control = std::process::Command::new("perl")
            .args([
                "-MIO::Socket::UNIX",
                "-e",
                r#"$s = IO::Socket::UNIX->new(Peer => $ARGV[0]); print $s ? "api=connected\n" : "api=failed: $!\n""#,
            ])
            .arg(s)
            .output()
            .expect("perl runs");
        assert_eq!(String::from_utf8_lossy(&control.stdout), "api=connected\n");
    }
    // Replicas outlive their node by design (a restarted node adopts them): remove it.
    beemesh()
        .arg("--api")
        .arg(&sock)
        .args([
            "delete",
            "default/prober",
            "--wait",
            "--timeout",
            "60s",
            "--key",
        ])
        .arg(&mesh.op)
        .assert()
        .success();
}

#[test]
fn node_key_leftovers_do_not_stop_a_start_and_a_cut_short_key_is_refused_clearly() {
    let dir = TempDir::new().expect("tempdir");
    let mesh = test_mesh(dir.path());
    // What a power cut while the node key was being written leaves: temporary files, no
    // node.key.
    let data = dir.path().join("one/data");
    fs::create_dir_all(&data).expect("data dir");
    fs::write(data.join(".node.key.tmp.0123456789abcdef"), "").expect("empty leftover");
    fs::write(
        data.join(".node.key.tmp.fedcba9876543210"),
        "-----BEGIN PRIVATE KEY-----\nMC4C",
    )
    .expect("partial leftover");
    {
        let (_node, sock) = start_node(dir.path(), &mesh, "one", None, "best-effort");
        assert!(status_of(&sock)["peer_id"].is_string());
    }
    let key = data.join("node.key");
    assert!(
        fs::read_to_string(&key)
            .expect("node.key")
            .contains("-----END PRIVATE KEY-----")
    );

    // A node.key cut short (by an older version, another tool or a damaged disk) is not
    // replaced by a new identity behind the operator's back: the node refuses, naming the
    // file and what to do.
    fs::write(&key, "").expect("truncate");
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("beemesh"))
        .args(["node", "--config"])
        .arg(dir.path().join("one/host.toml"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&key.display().to_string())
            && stderr.contains("empty or cut short")
            && stderr.contains("remove the file"),
        "{stderr}"
    );
}

#[test]
fn kv_teaches_and_refuses_bad_arguments() {
    // What is signed, by whom, and for how long (whatever the terminal's width).
    let help = stdout_of(beemesh().args(["kv", "--help"]));
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "signed with your operator key (--key FILE)",
        "[trust] signers: one signature is enough",
        "a random nonce, and the peer id of the node that is to carry it out",
        "only within 5 minutes of the time it was signed",
        "and only once",
        "beemesh kv put default/ledger greeting hello --key operator.key",
    ] {
        assert!(help.contains(want), "{want:?} not in {help}");
    }
    beemesh()
        .args(["kv", "put", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--if-revision").and(predicate::str::contains("`-`")));
    // Usage errors: exit 2.
    for args in [
        &["kv"][..],
        &["kv", "get", "default/x", "k"],
        &["kv", "get", "default/x", "--key", "op.key"],
        &["kv", "get", "hello", "k", "--key", "op.key"],
        &["kv", "put", "Default/x", "k", "v", "--key", "op.key"],
        &["kv", "put", "default/x", "k", "--key", "op.key"],
        &[
            "kv",
            "put",
            "default/x",
            "k",
            "v",
            "--if-revision",
            "-1",
            "--key",
            "op.key",
        ],
        &["kv", "ls", "default/x", "--limit", "0", "--key", "op.key"],
        &[
            "kv",
            "ls",
            "default/x",
            "--limit",
            "1001",
            "--key",
            "op.key",
        ],
    ] {
        beemesh().args(args).assert().code(2);
    }
    // The key file is read before anything is sent; a value that cannot be stored is refused
    // before anything is sent.
    let dir = TempDir::new().expect("tempdir");
    beemesh()
        .args(["kv", "get", "default/x", "k", "--key"])
        .arg(dir.path().join("missing.key"))
        .arg("--api")
        .arg(dir.path().join("nothing.sock"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("as the operator key (--key)"));
    let (op, _) = keygen(dir.path(), "op.key");
    beemesh()
        .args(["kv", "put", "default/x", "k", "-", "--key"])
        .arg(&op)
        .arg("--api")
        .arg(dir.path().join("nothing.sock"))
        .write_stdin(vec![b'x'; 64 * 1024 + 1])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("the limit of a value"));
    beemesh()
        .args(["kv", "get", "default/x", "k", "--key"])
        .arg(&op)
        .arg("--api")
        .arg(dir.path().join("nothing.sock"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot reach the node API"));
}

#[test]
fn kv_reads_and_writes_a_workloads_state_against_a_running_node() {
    let dir = TempDir::new().expect("tempdir");
    let mesh = test_mesh(dir.path());
    let op = mesh.op.clone();
    // Two nodes (a node alone places nothing): the replica runs on either, and the CLI talks
    // to the first, which forwards the requests when the replica is on the second.
    let (_one, sock, _two, sock_two) = start_pair(dir.path(), &mesh, "best-effort");
    let kv = |args: &[&str]| {
        let mut c = beemesh();
        c.arg("--api")
            .arg(&sock)
            .arg("kv")
            .args(args)
            .arg("--key")
            .arg(&op);
        c
    };
    let manifest = dir.path().join("notes.toml");
    fs::write(
        &manifest,
        "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"notes\"\ngeneration = 1\n\
         [[container]]\nname = \"main\"\nimage = \"none\"\ncommand = [\"sleep\", \"3600\"]\n\
         resources = { cpu = \"10m\", memory = \"16Mi\" }\n",
    )
    .expect("manifest");
    let signed = dir.path().join("notes.signed.toml");
    sign(&manifest, &op, &signed);
    beemesh()
        .arg("--api")
        .arg(&sock)
        .args(["apply", "--wait", "--timeout", "60s"])
        .arg(&signed)
        .assert()
        .success();

    kv(&["put", "default/notes", "greeting", "hello"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "default/notes: \"greeting\" written at revision",
        ));
    // A value is bytes, exactly: from standard input, not UTF-8, and one that looks like a flag.
    kv(&["put", "default/notes", "bin", "-"])
        .write_stdin(vec![0xff, 0, 1])
        .assert()
        .success();
    kv(&["put", "default/notes", "dash", "-5"])
        .assert()
        .success();
    let out = kv(&["get", "default/notes", "bin"]).output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, vec![0xff, 0, 1]);
    kv(&["get", "default/notes", "greeting"])
        .assert()
        .success()
        .stdout("hello");
    // Through the other node as well: one of the two forwards the request to the host.
    beemesh()
        .arg("--api")
        .arg(&sock_two)
        .args(["kv", "get", "default/notes", "greeting", "--key"])
        .arg(&op)
        .assert()
        .success()
        .stdout("hello");
    kv(&["get", "default/notes", "dash"])
        .assert()
        .success()
        .stdout("-5");
    let json: serde_json::Value = serde_json::from_str(&stdout_of(&mut kv(&[
        "get",
        "default/notes",
        "greeting",
        "-o",
        "json",
    ])))
    .expect("json");
    assert_eq!(json["value"], "hello");
    assert!(
        json["node_name"] == "one" || json["node_name"] == "two",
        "{json}"
    );
    assert!(json["revision"].as_u64().is_some_and(|r| r > 0), "{json}");
    kv(&["ls", "default/notes"]).assert().success().stdout(
        predicate::str::contains("greeting")
            .and(predicate::str::contains("hello"))
            .and(predicate::str::contains("(3 bytes, not UTF-8)")),
    );
    // A page of one, and where to go on.
    kv(&["ls", "default/notes", "--limit", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("bin"))
        .stderr(predicate::str::contains("continue with --after \"bin\""));
    let page: serde_json::Value = serde_json::from_str(&stdout_of(&mut kv(&[
        "ls",
        "default/notes",
        "--after",
        "bin",
        "-o",
        "json",
    ])))
    .expect("json");
    let keys: Vec<&str> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["key"].as_str())
        .collect();
    assert_eq!(keys, ["dash", "greeting"], "{page}");

    // Refusals say why.
    kv(&[
        "put",
        "default/notes",
        "greeting",
        "x",
        "--if-revision",
        "1",
    ])
    .assert()
    .code(1)
    .stderr(predicate::str::contains(
        "conditional writes need strong consistency",
    ));
    kv(&["get", "default/notes", "absent"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "default/notes has no key \"absent\"",
        ));
    kv(&["get", "default/nobody", "k"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no workload default/nobody"));
    let (stranger, _) = keygen(dir.path(), "stranger.key");
    beemesh()
        .arg("--api")
        .arg(&sock)
        .args(["kv", "get", "default/notes", "greeting", "--key"])
        .arg(&stranger)
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("403").and(predicate::str::contains(
                "not among this node's trusted signers",
            )),
        );

    kv(&["del", "default/notes", "greeting"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"greeting\" deleted at revision"));
    kv(&["get", "default/notes", "greeting"]).assert().code(1);
}
