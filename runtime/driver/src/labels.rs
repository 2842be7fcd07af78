//! Labels that mark a replica's objects, so that a restarted daemon finds (and adopts or
//! removes) what it already runs.

use std::collections::{BTreeMap, HashMap};

use crate::error::DriverError;
use crate::types::ReplicaId;

/// Present (value [`MANAGED_BY_VALUE`]) on every object a BeeMesh driver creates.
pub const MANAGED_BY: &str = "io.beemesh.managed-by";
pub const MANAGED_BY_VALUE: &str = "beemesh";
pub const NAMESPACE: &str = "io.beemesh.namespace";
pub const WORKLOAD: &str = "io.beemesh.workload";
pub const REPLICA: &str = "io.beemesh.replica";
pub const CONTENT_ID: &str = "io.beemesh.content-id";
pub const NODE: &str = "io.beemesh.node";
/// On containers only: the manifest's container name.
pub const CONTAINER: &str = "io.beemesh.container";

/// The identity a replica's objects carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLabels {
    pub id: ReplicaId,
    pub content_id: String,
    pub node: String,
}

impl ReplicaLabels {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (NAMESPACE.to_owned(), self.id.namespace.clone()),
            (WORKLOAD.to_owned(), self.id.name.clone()),
            (REPLICA.to_owned(), self.id.index.to_string()),
            (CONTENT_ID.to_owned(), self.content_id.clone()),
            (NODE.to_owned(), self.node.clone()),
        ])
    }

    /// Reads the labels of `object`. `Ok(None)` when the object is not managed by BeeMesh;
    /// an error when it claims to be but its labels are damaged.
    pub fn parse(
        object: &str,
        labels: &HashMap<String, String>,
    ) -> Result<Option<Self>, DriverError> {
        if labels.get(MANAGED_BY).map(String::as_str) != Some(MANAGED_BY_VALUE) {
            return Ok(None);
        }
        let get = |key: &'static str| -> Result<&String, DriverError> {
            labels.get(key).ok_or_else(|| DriverError::BadLabel {
                object: object.to_owned(),
                key,
                value: String::new(),
                reason: "missing".into(),
            })
        };
        let index_text = get(REPLICA)?;
        let index = index_text
            .parse::<u32>()
            .map_err(|e| DriverError::BadLabel {
                object: object.to_owned(),
                key: REPLICA,
                value: index_text.clone(),
                reason: e.to_string(),
            })?;
        let id = ReplicaId::new(get(NAMESPACE)?.clone(), get(WORKLOAD)?.clone(), index);
        id.validate().map_err(|e| DriverError::BadLabel {
            object: object.to_owned(),
            key: WORKLOAD,
            value: id.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(Self {
            id,
            content_id: get(CONTENT_ID)?.clone(),
            node: get(NODE)?.clone(),
        }))
    }
}

/// Label values end up in Podman filters and file names: keep them printable and short.
pub fn check_label_value(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if v.len() > 253 {
        return Err(format!("{what} {v:?} is longer than 253 bytes"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "{what} {v:?} contains {c:?}; only ASCII letters, digits, '-', '_', '.' and ':' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplicaLabels {
        ReplicaLabels {
            id: ReplicaId::new("default", "hello", 2),
            content_id: "sha256:abcd".into(),
            node: "edge-01".into(),
        }
    }

    #[test]
    fn labels_round_trip() {
        let map: HashMap<String, String> = sample().to_map().into_iter().collect();
        assert_eq!(
            ReplicaLabels::parse("pod x", &map).ok().flatten(),
            Some(sample())
        );
    }

    #[test]
    fn foreign_objects_are_ignored() {
        let map = HashMap::from([("app".to_owned(), "x".to_owned())]);
        assert_eq!(ReplicaLabels::parse("c", &map).ok().flatten(), None);
    }

    #[test]
    fn damaged_labels_name_key_and_value() {
        let mut map: HashMap<String, String> = sample().to_map().into_iter().collect();
        map.insert(REPLICA.into(), "two".into());
        let err = ReplicaLabels::parse("container abc", &map)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("io.beemesh.replica=\"two\""), "{err}");
        assert!(err.contains("container abc"), "{err}");
        map.remove(REPLICA);
        let err = ReplicaLabels::parse("c", &map)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn label_values_are_checked() {
        assert!(check_label_value("node", "edge-01.eu").is_ok());
        assert!(check_label_value("node", "").is_err());
        let e = check_label_value("node", "a b").expect_err("must fail");
        assert!(e.contains("' '"), "{e}");
    }
}
