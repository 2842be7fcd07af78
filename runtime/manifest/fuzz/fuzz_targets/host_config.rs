//! `HostConfig::from_toml` on arbitrary UTF-8.
//!
//! A config that parses and validates must also give a usable trust policy (a node starts from
//! it) and survive `to_toml`: the written text reads back to an equal config.

#![no_main]

use beemesh_manifest::{HostConfig, TrustPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = HostConfig::from_toml("fuzz.toml", text) else {
        return;
    };
    if let Err(e) = TrustPolicy::from_host(&config.trust) {
        panic!("a validated host config has no usable trust policy: {e}");
    }
    let written = config.to_toml();
    let again = match HostConfig::from_toml("written.toml", &written) {
        Ok(c) => c,
        Err(e) => panic!(
            "to_toml wrote a host config that does not read back: {e}\n--- written ---\n{written}"
        ),
    };
    assert_eq!(
        config, again,
        "round trip changed the host config\n--- written ---\n{written}"
    );
});
