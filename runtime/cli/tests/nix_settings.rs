//! Keeps the Nix side and the daemon in step: every host.toml key that the NixOS module sets
//! by default (`modules/settings-defaults.nix`, which `services.beemesh` imports) and every key
//! of the image host defaults (`images/host-defaults.toml`, which both image builders read) is
//! accepted by `beemesh config check`, alone and combined as the NixOS images combine them.
//!
//! The Nix files are evaluated with `nix-instantiate --eval --strict --json` (they are pure: no
//! nixpkgs). Without `nix-instantiate` those tests print `SKIPPED` and pass, unless
//! `BEEMESH_REQUIRE_NIX=1` (CI: `.ci/check-nix` installs Debian's nix-bin first). The host
//! defaults are TOML and are checked everywhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};
use tempfile::TempDir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn beemesh() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beemesh"));
    c.env_remove("BEEMESH_API");
    c
}

/// `beemesh key gen` in `dir`: the public key.
fn public_key(dir: &Path, name: &str) -> String {
    let out = beemesh()
        .args(["key", "gen", "--out"])
        .arg(dir.join(name))
        .output()
        .expect("run beemesh key gen");
    assert!(
        out.status.success(),
        "beemesh key gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// A [trust] section as the module's users write it (the one part no default can supply).
fn trust(dir: &Path) -> Map<String, Value> {
    let mut t = Map::new();
    t.insert("domain".into(), "nix.test".into());
    t.insert(
        "signers".into(),
        Value::Array(vec![public_key(dir, "operator.key").into()]),
    );
    t.insert("admission".into(), public_key(dir, "admission.key").into());
    t
}

/// Runs `beemesh config check` on `text`, written to `dir/name`; panics with its diagnostics.
fn config_check(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write host config");
    let out = beemesh()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run beemesh config check");
    assert!(
        out.status.success(),
        "beemesh config check rejects {name}:\n{}\n--- {name}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Nix

/// `nix-instantiate` is there, or the test is skipped (or fails, in CI).
fn nix_available(test: &str) -> bool {
    let found = Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var_os("BEEMESH_REQUIRE_NIX").is_some_and(|v| v == "1") {
        panic!(
            "{test}: nix-instantiate is not installed and BEEMESH_REQUIRE_NIX=1; \
             .ci/check-nix installs it (Debian: apt-get install nix-bin)"
        );
    }
    eprintln!(
        "SKIPPED {test}: nix-instantiate is not installed (BEEMESH_REQUIRE_NIX=1 fails instead)"
    );
    false
}

/// Evaluates a pure Nix expression in the repository root and returns it as JSON.
fn nix_eval(expr: &str) -> Value {
    let out = Command::new("nix-instantiate")
        .current_dir(repo())
        .args([
            "--readonly-mode",
            "--eval",
            "--strict",
            "--json",
            "--expr",
            expr,
        ])
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "nix-instantiate --eval --expr '{expr}' failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON")
}

/// The arguments of settings-defaults.nix; every combination is evaluated.
const FLAGS: [&str; 4] = ["podman", "ticket", "apiToken", "ticketKey"];

fn module_defaults(flags: u32) -> Value {
    let args: Vec<String> = FLAGS
        .iter()
        .enumerate()
        .map(|(i, f)| format!("{f} = {};", flags & (1 << i) != 0))
        .collect();
    nix_eval(&format!(
        "import ./modules/settings-defaults.nix {{ {} }}",
        args.join(" ")
    ))
}

// ---------------------------------------------------------------------------------------------
// JSON (what Nix evaluates to) to TOML (what pkgs.formats.toml renders)

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

fn toml_value(v: &Value) -> String {
    match v {
        // A JSON string is a valid TOML basic string (the same escapes).
        Value::String(_) | Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Null => panic!("null has no TOML form (and pkgs.formats.toml rejects it)"),
    }
}

/// Top-level objects become tables; objects below them, inline tables.
fn to_toml(doc: &Value) -> String {
    let doc = doc.as_object().expect("host settings are an attribute set");
    let mut out = String::new();
    for (k, v) in doc.iter().filter(|(_, v)| !v.is_object()) {
        out += &format!("{} = {}\n", toml_key(k), toml_value(v));
    }
    for (k, v) in doc.iter().filter(|(_, v)| v.is_object()) {
        out += &format!("\n[{}]\n", toml_key(k));
        for (k, v) in v.as_object().into_iter().flatten() {
            out += &format!("{} = {}\n", toml_key(k), toml_value(v));
        }
    }
    out
}

/// `base` with `extra` merged in, as the NixOS module system merges two mkDefault definitions
/// of `services.beemesh.settings`: attribute sets recursively, and a value defined by both
/// must be the same (two different values are an evaluation error there).
fn merge(base: &Value, extra: &Value, at: &str) -> Value {
    match (base, extra) {
        (Value::Object(a), Value::Object(b)) => {
            let mut m = a.clone();
            for (k, v) in b {
                let here = format!("{at}.{k}");
                let merged = match a.get(k) {
                    Some(old) => merge(old, v, &here),
                    None => v.clone(),
                };
                m.insert(k.clone(), merged);
            }
            Value::Object(m)
        }
        (a, b) => {
            assert_eq!(
                a, b,
                "{at}: the NixOS module and the image host defaults disagree (the module system \
                 refuses two different mkDefault values)"
            );
            a.clone()
        }
    }
}

fn with_trust(settings: &Value, trust: &Map<String, Value>) -> Value {
    let mut t = trust.clone();
    // The module may set trust.ticket and trust.ticket_key itself (services.beemesh.ticketFile,
    // ticketKeyFile).
    if let Some(Value::Object(own)) = settings.get("trust") {
        t.extend(own.clone());
    }
    let mut doc = settings.as_object().expect("an attribute set").clone();
    doc.insert("trust".into(), Value::Object(t));
    Value::Object(doc)
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn image_host_defaults_are_a_host_config_but_for_trust() {
    let dir = TempDir::new().expect("tempdir");
    let path = repo().join("images/host-defaults.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("[trust")),
        "{}: [trust] belongs to a fleet, never to the image defaults",
        path.display()
    );
    let trust = trust(dir.path());
    let section = to_toml(&serde_json::json!({ "trust": trust }));
    config_check(
        dir.path(),
        "host-defaults.toml",
        &format!("{text}\n{section}"),
    );
}

#[test]
fn nixos_module_default_settings_are_accepted() {
    if !nix_available("nixos_module_default_settings_are_accepted") {
        return;
    }
    let dir = TempDir::new().expect("tempdir");
    let trust = trust(dir.path());
    for flags in 0..(1 << FLAGS.len()) {
        let settings = module_defaults(flags);
        // What the module renders (with the user's [trust]) must pass the daemon's check.
        let doc = with_trust(&settings, &trust);
        config_check(dir.path(), &format!("module-{flags}.toml"), &to_toml(&doc));
    }
    // The flags do what their names say.
    let all = module_defaults(0b1111);
    assert_eq!(all["runtime"]["driver"], "podman");
    assert_eq!(
        all["runtime"]["podman_socket"],
        "/run/user/7420/podman/podman.sock"
    );
    assert_eq!(
        all["trust"]["ticket"],
        "/run/credentials/beemesh.service/ticket"
    );
    assert_eq!(
        all["trust"]["ticket_key"],
        "/run/credentials/beemesh.service/ticket.key"
    );
    assert_eq!(
        all["api"]["token_file"],
        "/run/credentials/beemesh.service/api-token"
    );
    let none = module_defaults(0);
    assert_eq!(none["runtime"]["driver"], "process");
    assert!(none.get("trust").is_none(), "{none}");
}

#[test]
fn nixos_images_combine_module_and_host_defaults() {
    if !nix_available("nixos_images_combine_module_and_host_defaults") {
        return;
    }
    let dir = TempDir::new().expect("tempdir");
    let trust = trust(dir.path());
    // images/common.nix: the module's defaults plus builtins.fromTOML of the host defaults.
    let host = nix_eval("builtins.fromTOML (builtins.readFile ./images/host-defaults.toml)");
    for flags in [0b001, 0b011] {
        let combined = merge(&module_defaults(flags), &host, "settings");
        let doc = with_trust(&combined, &trust);
        config_check(dir.path(), &format!("image-{flags}.toml"), &to_toml(&doc));
    }
}

#[test]
fn json_to_toml_renders_what_config_check_reads() {
    // The converter itself: nested tables, lists, escapes.
    let doc = serde_json::json!({
        "node": { "name": "a", "labels": { "zone": "eu-1", "odd key": "x\"y" } },
        "mesh": { "listen": ["/ip4/0.0.0.0/tcp/4001"], "mdns": false },
    });
    let text = to_toml(&doc);
    assert!(text.contains("[node]\n"), "{text}");
    assert!(text.contains("labels = { "), "{text}");
    assert!(text.contains(r#""odd key" = "x\"y""#), "{text}");
    assert!(text.contains("mdns = false\n"), "{text}");
}
