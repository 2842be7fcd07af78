//! The lock file (`images/node.lock`): the exact package set of an image, with the SHA-256 of
//! every package archive as the Debian archive's signed indexes give it.

use std::collections::BTreeMap;
use std::path::Path;

use beemesh_manifest::Invalid;
use serde::{Deserialize, Serialize};

pub const LOCK_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    pub suite: String,
    pub mirror: String,
    pub architecture: String,
    /// The package list this lock resolves (required plus the spec's). A spec that asks for
    /// another list needs a new resolution.
    pub requested: Vec<String>,
    #[serde(rename = "package")]
    pub packages: Vec<LockedPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub sha256: String,
}

impl LockedPackage {
    /// `name=version`, as apt takes it.
    pub fn pin(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

impl Lock {
    pub fn from_toml(source: &str, text: &str) -> Result<Self, Invalid> {
        beemesh_manifest::diag::from_toml(source, text)
    }

    pub fn load(path: &Path) -> Result<Option<Self>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&path.display().to_string(), &text)
                .map(Some)
                .map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"));
        format!(
            "# The exact packages of this image: written by `beemesh image build` when the spec's\n\
             # package list changes (or with --update-lock); `--locked` builds exactly these.\n\
             # sha256 is the digest of each .deb as the archive's signed index lists it.\n{body}"
        )
    }

    /// What differs between this lock and an installed set, one line per package.
    pub fn differences(&self, installed: &[LockedPackage]) -> Vec<String> {
        let want: BTreeMap<&str, &LockedPackage> =
            self.packages.iter().map(|p| (p.name.as_str(), p)).collect();
        let have: BTreeMap<&str, &LockedPackage> =
            installed.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut out = Vec::new();
        for (name, w) in &want {
            match have.get(name) {
                None => out.push(format!("{name}: locked at {} but not installed", w.version)),
                Some(h) if h != w => out.push(format!(
                    "{name}: locked {} ({}) but installed {} ({})",
                    w.version, w.sha256, h.version, h.sha256
                )),
                Some(_) => {}
            }
        }
        for (name, h) in &have {
            if !want.contains_key(name) {
                out.push(format!(
                    "{name}: installed {} but not in the lock",
                    h.version
                ));
            }
        }
        out
    }
}

/// Parses `apt-cache show` output (RFC 822 stanzas) into packages with their digests. Only
/// stanzas whose `name=version` is in `installed` are kept.
pub fn packages_from_stanzas(
    text: &str,
    installed: &[(String, String)],
) -> Result<Vec<LockedPackage>, String> {
    let wanted: BTreeMap<&str, &str> = installed
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut found: BTreeMap<String, LockedPackage> = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim(), v.trim());
            }
        }
        let (Some(name), Some(version)) = (fields.get("Package"), fields.get("Version")) else {
            continue;
        };
        if wanted.get(name) != Some(version) {
            continue;
        }
        let sha256 = fields
            .get("SHA256")
            .ok_or_else(|| format!("{name} {version}: the archive index lists no SHA256"))?;
        found.insert(
            (*name).to_owned(),
            LockedPackage {
                name: (*name).to_owned(),
                version: (*version).to_owned(),
                architecture: fields.get("Architecture").unwrap_or(&"").to_string(),
                sha256: (*sha256).to_owned(),
            },
        );
    }
    let missing: Vec<_> = installed
        .iter()
        .filter(|(n, _)| !found.contains_key(n))
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no archive digest for installed package(s) {}",
            missing.join(", ")
        ));
    }
    Ok(found.into_values().collect())
}

/// Parses `name=version` lines (dpkg-query output).
pub fn parse_installed(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "Package: adduser\nVersion: 3.134\nArchitecture: all\nDescription: add users\n continuation: not a field\nSHA256: aaaa\n\nPackage: bash\nVersion: 5.2.15-2+b2\nArchitecture: amd64\nSHA256: bbbb\n\nPackage: bash\nVersion: 5.1-1\nArchitecture: amd64\nSHA256: old\n";

    #[test]
    fn stanzas_give_digests_of_installed_versions() {
        let installed = parse_installed("adduser=3.134\nbash=5.2.15-2+b2\n");
        let p = packages_from_stanzas(SHOW, &installed).expect("all found");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].sha256, "bbbb");
        assert_eq!(p[1].pin(), "bash=5.2.15-2+b2");
        let missing = packages_from_stanzas(SHOW, &parse_installed("zsh=1\n"));
        assert!(missing.expect_err("missing").contains("zsh=1"));
    }

    #[test]
    fn lock_round_trips_and_reports_differences() {
        let installed = parse_installed("adduser=3.134\nbash=5.2.15-2+b2\n");
        let packages = packages_from_stanzas(SHOW, &installed).expect("found");
        let lock = Lock {
            version: LOCK_VERSION,
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            architecture: "amd64".into(),
            requested: vec!["bash".into()],
            packages: packages.clone(),
        };
        let again = Lock::from_toml("l", &lock.to_toml()).expect("parses");
        assert_eq!(again, lock);
        assert!(lock.differences(&packages).is_empty());
        let mut changed = packages;
        changed[1].version = "5.1-1".into();
        changed.pop();
        changed.push(LockedPackage {
            name: "zsh".into(),
            version: "5.9".into(),
            architecture: "amd64".into(),
            sha256: "z".into(),
        });
        let d = lock.differences(&changed);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("bash: locked at"), "{d:?}");
        assert!(d[1].starts_with("zsh: installed"), "{d:?}");
    }
}
