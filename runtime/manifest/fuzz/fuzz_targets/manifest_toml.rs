//! `Manifest::from_toml` on arbitrary UTF-8.
//!
//! Beyond "never panics": a manifest that parses and validates must survive `to_toml` — the
//! written text parses and validates again, to an equal manifest, and writing that one gives
//! the same text (the canonical form is a fixed point).

#![no_main]

use beemesh_manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Operator files reach the parser only through `input::read_bounded`, which refuses
    // anything that is not UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::from_toml("fuzz.toml", text) else {
        return;
    };
    let written = manifest.to_toml();
    let again = match Manifest::from_toml("written.toml", &written) {
        Ok(m) => m,
        Err(e) => panic!(
            "to_toml wrote a manifest that does not read back: {e}\n--- written ---\n{written}"
        ),
    };
    assert_eq!(
        manifest, again,
        "round trip changed the manifest\n--- written ---\n{written}"
    );
    assert_eq!(written, again.to_toml(), "to_toml is not a fixed point");
});
