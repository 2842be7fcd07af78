//! `kube::convert` on arbitrary UTF-8 (Kubernetes YAML).
//!
//! Every manifest the converter produces must validate and survive `to_toml`: the written text
//! parses and validates again, to an equal manifest.

#![no_main]

use beemesh_manifest::Manifest;
use beemesh_manifest::kube::{self, KubeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(converted) = kube::convert("fuzz.yaml", yaml, &KubeOptions::default()) else {
        return;
    };
    for c in &converted {
        let manifest = &c.manifest;
        let problems = manifest.validate();
        assert!(
            problems.is_empty(),
            "convert produced an invalid manifest: {problems:?}\n{manifest:#?}"
        );
        let written = manifest.to_toml();
        let again = match Manifest::from_toml("written.toml", &written) {
            Ok(m) => m,
            Err(e) => {
                panic!("a converted manifest does not read back: {e}\n--- written ---\n{written}")
            }
        };
        assert_eq!(
            manifest, &again,
            "round trip changed a converted manifest\n--- written ---\n{written}"
        );
    }
});
