//! Desired state: the signed manifests this node has verified and accepted.
//!
//! Every manifest, whether it came from the API, from gossip or from an anti-entropy sync,
//! goes through [`DesiredStore::submit`]: parse the envelope, verify it against the trust
//! policy (threshold of operator signatures, expiry), apply the rollback rule against the
//! persisted generation store, then persist the exact signed text. Nothing unverified is ever
//! stored, listed or forwarded.
//!
//! On disk (under `data_dir`): `manifests/<namespace>/<name>.toml` holds the signed text of
//! the accepted generation, written atomically; `generations.json` is the rollback store. The
//! manifest file is written before the generation is recorded, so a crash between the two
//! leaves a file that is re-admitted at the next start rather than a recorded generation whose
//! manifest is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use beemesh_manifest::generations::{
    Admission, AdmitError, FileStore, GenerationStore, StoreError,
};
use beemesh_manifest::input::{MAX_SIGNED_BYTES, write_atomically};
use beemesh_manifest::trust::VerifyError;
use beemesh_manifest::{ContentId, Invalid, Manifest, SignedManifest, TrustPolicy};
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("signed manifest is larger than {MAX_SIGNED_BYTES} bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("not a signed manifest")]
    Envelope(#[from] Invalid),
    #[error(transparent)]
    Untrusted(#[from] VerifyError),
    #[error(transparent)]
    Rollback(AdmitError),
    #[error("cannot persist {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write did not run to its end (the node is shutting down).
    #[error("the desired-state write did not complete: {0}")]
    Interrupted(String),
}

impl SubmitError {
    /// Whether the sender is at fault (as opposed to this node's storage).
    pub fn is_rejection(&self) -> bool {
        !matches!(
            self,
            SubmitError::Io { .. } | SubmitError::Store(_) | SubmitError::Interrupted(_)
        )
    }
}

impl From<AdmitError> for SubmitError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Store(s) => SubmitError::Store(s),
            other => SubmitError::Rollback(other),
        }
    }
}

/// One accepted workload.
#[derive(Debug, Clone)]
pub struct Entry {
    pub signed_text: String,
    pub manifest: Manifest,
    pub content_id: ContentId,
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new generation was accepted and stored.
    Accepted,
    /// This exact manifest was already accepted: nothing changed.
    Unchanged,
}

/// A compact summary for anti-entropy: what a node has, without the manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Have {
    pub namespace: String,
    pub name: String,
    pub generation: u64,
    pub content_id: ContentId,
}

#[derive(Debug)]
pub struct DesiredStore {
    dir: PathBuf,
    policy: TrustPolicy,
    generations: FileStore,
    entries: BTreeMap<(String, String), Entry>,
}

impl DesiredStore {
    /// Opens the store under `data_dir` and re-verifies every manifest found on disk; a file
    /// that no longer verifies (tampered, expired, or signed by a key no longer trusted) is
    /// skipped and reported in the returned list.
    pub fn open(
        data_dir: &Path,
        policy: TrustPolicy,
        now: OffsetDateTime,
    ) -> Result<(Self, Vec<String>), SubmitError> {
        let dir = data_dir.join("manifests");
        std::fs::create_dir_all(&dir).map_err(|cause| SubmitError::Io {
            path: dir.clone(),
            cause,
        })?;
        let generations = FileStore::open(data_dir.join("generations.json"))?;
        let mut store = Self {
            dir,
            policy,
            generations,
            entries: BTreeMap::new(),
        };
        let mut skipped = Vec::new();
        for path in store.files()? {
            let text = match beemesh_manifest::input::read_file(
                &path,
                MAX_SIGNED_BYTES,
                "a signed manifest",
            ) {
                Ok(t) => t,
                Err(e) => {
                    skipped.push(e.to_string());
                    continue;
                }
            };
            if let Err(e) = store.submit(&path.display().to_string(), &text, now) {
                skipped.push(format!("{}: {e}", path.display()));
            }
        }
        Ok((store, skipped))
    }

    fn files(&self) -> Result<Vec<PathBuf>, SubmitError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |cause| SubmitError::Io { path, cause }
        };
        let mut out = Vec::new();
        for ns in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let ns = ns.map_err(io(&self.dir))?.path();
            if !ns.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&ns).map_err(io(&ns))? {
                let f = f.map_err(io(&ns))?.path();
                if f.extension().is_some_and(|e| e == "toml") {
                    out.push(f);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Verifies, admits and persists a signed manifest.
    pub fn submit(
        &mut self,
        source: &str,
        text: &str,
        now: OffsetDateTime,
    ) -> Result<(Outcome, Entry), SubmitError> {
        if text.len() as u64 > MAX_SIGNED_BYTES {
            return Err(SubmitError::TooLarge(text.len()));
        }
        let signed = SignedManifest::parse(source, text)?;
        let verified = self.policy.verify(&signed, now)?;
        let key = (
            verified.manifest.namespace.clone(),
            verified.manifest.name.clone(),
        );
        let entry = Entry {
            signed_text: signed.to_toml(),
            manifest: verified.manifest.clone(),
            content_id: verified.content_id,
        };
        // Check the rollback rule before touching the disk.
        self.generations.check(&verified)?;
        if self
            .entries
            .get(&key)
            .is_some_and(|e| e.content_id == verified.content_id)
        {
            return Ok((Outcome::Unchanged, entry));
        }
        let path = self.path_of(&key.0, &key.1);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|cause| SubmitError::Io {
                path: parent.to_owned(),
                cause,
            })?;
        }
        write_atomically(&path, entry.signed_text.as_bytes()).map_err(|cause| SubmitError::Io {
            path: path.clone(),
            cause,
        })?;
        let outcome = match self.generations.admit(&verified)? {
            Admission::New { .. } => Outcome::Accepted,
            // Recorded before, but the manifest itself was missing here (a crash, or the
            // store was restored from elsewhere): now it is stored again.
            Admission::AlreadyAccepted => Outcome::Accepted,
        };
        self.entries.insert(key, entry.clone());
        Ok((outcome, entry))
    }

    fn path_of(&self, namespace: &str, name: &str) -> PathBuf {
        // Both are validated DNS-1123 labels, so they are safe path components.
        self.dir.join(namespace).join(format!("{name}.toml"))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.entries.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What this node has, for anti-entropy.
    pub fn have(&self) -> Vec<Have> {
        self.entries
            .values()
            .map(|e| Have {
                namespace: e.manifest.namespace.clone(),
                name: e.manifest.name.clone(),
                generation: e.manifest.generation,
                content_id: e.content_id,
            })
            .collect()
    }

    /// The entries a peer lacks or holds an older generation of, given its `have` list.
    pub fn newer_than(&self, theirs: &[Have]) -> Vec<&Entry> {
        let theirs: BTreeMap<(&str, &str), u64> = theirs
            .iter()
            .map(|h| ((h.namespace.as_str(), h.name.as_str()), h.generation))
            .collect();
        self.entries
            .values()
            .filter(|e| {
                theirs
                    .get(&(e.manifest.namespace.as_str(), e.manifest.name.as_str()))
                    .is_none_or(|g| *g < e.manifest.generation)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beemesh_manifest::SecretKey;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);

    fn signed(key: &SecretKey, generation: u64, image: &str) -> String {
        let text = format!(
            "api = \"beemesh/v1\"\nkind = \"Workload\"\nname = \"hello\"\ngeneration = {generation}\n[[container]]\nname = \"web\"\nimage = \"{image}\"\n"
        );
        let mut s = SignedManifest::new(text);
        s.add_signature("t", key).expect("sign");
        s.to_toml()
    }

    fn open(dir: &Path, key: &SecretKey) -> DesiredStore {
        let policy = TrustPolicy::new([key.public()], 1).expect("policy");
        DesiredStore::open(dir, policy, NOW).expect("open").0
    }

    #[test]
    fn accepts_persists_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = SecretKey::from_seed([1; 32]);
        let mut s = open(dir.path(), &k);
        assert_eq!(
            s.submit("api", &signed(&k, 1, "a"), NOW).expect("ok").0,
            Outcome::Accepted
        );
        assert_eq!(
            s.submit("api", &signed(&k, 1, "a"), NOW).expect("ok").0,
            Outcome::Unchanged
        );
        assert_eq!(
            s.submit("api", &signed(&k, 2, "b"), NOW).expect("ok").0,
            Outcome::Accepted
        );
        drop(s);
        let mut s = open(dir.path(), &k);
        assert_eq!(
            s.get("default", "hello").map(|e| e.manifest.generation),
            Some(2)
        );
        assert!(matches!(
            s.submit("gossip", &signed(&k, 1, "a"), NOW),
            Err(SubmitError::Rollback(_))
        ));
    }

    #[test]
    fn untrusted_is_neither_stored_nor_listed() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = SecretKey::from_seed([1; 32]);
        let stranger = SecretKey::from_seed([2; 32]);
        let mut s = open(dir.path(), &k);
        assert!(matches!(
            s.submit("x", &signed(&stranger, 1, "a"), NOW),
            Err(SubmitError::Untrusted(_))
        ));
        assert!(matches!(
            s.submit("x", "manifest = 3", NOW),
            Err(SubmitError::Envelope(_))
        ));
        assert!(s.is_empty());
        assert!(s.files().expect("ls").is_empty());
    }

    #[test]
    fn a_tampered_file_on_disk_is_skipped_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = SecretKey::from_seed([1; 32]);
        let mut s = open(dir.path(), &k);
        s.submit("api", &signed(&k, 1, "a"), NOW).expect("ok");
        let path = dir.path().join("manifests/default/hello.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(
            &path,
            text.replace("image = \\\"a\\\"", "image = \\\"evil\\\""),
        )
        .expect("write");
        let policy = TrustPolicy::new([k.public()], 1).expect("policy");
        let (s, skipped) = DesiredStore::open(dir.path(), policy, NOW).expect("open");
        assert!(s.is_empty());
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("does not verify"), "{skipped:?}");
    }

    #[test]
    fn anti_entropy_lists_what_a_peer_lacks() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = SecretKey::from_seed([1; 32]);
        let mut s = open(dir.path(), &k);
        s.submit("api", &signed(&k, 3, "a"), NOW).expect("ok");
        assert_eq!(s.newer_than(&[]).len(), 1);
        let mut have = s.have();
        assert!(s.newer_than(&have).is_empty());
        have[0].generation = 2;
        assert_eq!(s.newer_than(&have).len(), 1);
    }
}
