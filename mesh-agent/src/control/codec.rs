//! How resources are stored as etcd values: compact JSON of the validated resource with its
//! defaults filled in (so `unchanged` is a comparison of values, whatever the operator's file
//! left out), decoded on read through the same parser and [`Resource::validate`] as files, plus
//! a check that the value belongs under its key.

use crate::policy::{Resource, parse_documents};

use super::keys;

/// The stored form of a resource.
pub fn encode(resource: &Resource) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(resource)
}

/// The stored form as a JSON value (for comparing with what etcd holds).
pub fn encode_value(resource: &Resource) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(resource)
}

/// Decodes and validates the value stored under `key`. Every problem names the key and, for
/// a field, the field path.
pub fn decode(prefix: &str, key: &str, value: &[u8]) -> Result<Resource, Vec<String>> {
    let text = std::str::from_utf8(value).map_err(|_| vec![format!("{key}: not UTF-8 text")])?;
    if text.trim().is_empty() {
        return Err(vec![format!("{key}: empty value")]);
    }
    let mut report = parse_documents(text, key);
    if !report.is_clean() {
        return Err(report.errors.iter().map(ToString::to_string).collect());
    }
    if report.resources.len() != 1 {
        return Err(vec![format!(
            "{key}: holds {} resources; a key holds exactly one",
            report.resources.len()
        )]);
    }
    let resource = report.resources.remove(0).resource;
    let expected = keys::parse_resource_key(prefix, key);
    if expected.as_ref() != Some(&resource.key()) {
        return Err(vec![format!(
            "{key}: holds {} which belongs under {}",
            resource.key(),
            keys::resource_key(prefix, &resource.key())
        )]);
    }
    Ok(resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_file;
    use std::path::Path;

    const PREFIX: &str = keys::DEFAULT_PREFIX;

    #[test]
    fn every_example_resource_round_trips() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/policies/example.yaml");
        let report = load_file(&path);
        assert!(report.is_clean(), "{:?}", report.errors);
        for loaded in report.resources {
            let resource = loaded.resource;
            let key = keys::resource_key(PREFIX, &resource.key());
            let stored = encode(&resource).unwrap();
            let back = decode(PREFIX, &key, &stored).unwrap();
            assert_eq!(back, resource);
            assert_eq!(encode(&back).unwrap(), stored, "encoding is stable");
        }
    }

    #[test]
    fn invalid_values_are_rejected_with_the_key_and_field() {
        let key = "/mesh/v1/agents/default/tools";
        let errors = decode(
            PREFIX,
            key,
            br#"{"apiVersion":"mesh.agentmesh.dev/v1alpha1","kind":"Agent","metadata":{"name":"tools"},"spec":{"endpoints":[]}}"#,
        )
        .unwrap_err();
        assert!(errors[0].contains(key), "{errors:?}");
        assert!(errors[0].contains("spec.endpoints"), "{errors:?}");
        assert!(decode(PREFIX, key, b"").is_err());
        assert!(decode(PREFIX, key, b"\xff\xfe").is_err());
        assert!(decode(PREFIX, key, b"{not json").is_err());
    }

    #[test]
    fn a_value_under_the_wrong_key_is_rejected() {
        let value = br#"{"apiVersion":"mesh.agentmesh.dev/v1alpha1","kind":"Agent","metadata":{"name":"tools"},"spec":{"endpoints":[{"address":"10.0.0.1:80"}]}}"#;
        assert!(decode(PREFIX, "/mesh/v1/agents/default/tools", value).is_ok());
        for key in [
            "/mesh/v1/agents/default/other",
            "/mesh/v1/agents/team/tools",
            "/mesh/v1/accesspolicies/default/tools",
        ] {
            let errors = decode(PREFIX, key, value).unwrap_err();
            assert!(
                errors[0].contains("belongs under /mesh/v1/agents/default/tools"),
                "{errors:?}"
            );
        }
    }
}
