//! The last-known-good cache: the resources of the last snapshot built from etcd, on local
//! disk, so an agent that starts while etcd is away serves what it served before instead of
//! nothing. Written atomically (temporary file in the same folder, fsync, rename, fsync of the
//! folder): a crash leaves the old file or the new one, never half of one. Read back through
//! the same decoding and validation as etcd values; a cache that does not decode entirely is
//! refused as a whole (it stood for one consistent set).
//!
//! Format (JSON, `format: 1`):
//!
//! ```json
//! {"format": 1, "prefix": "/mesh/v1", "revision": 42, "savedAt": "2026-01-01T10:00:00Z",
//!  "contentHash": "9f0c...", "entries": [{"key": "/mesh/v1/agents/default/tools",
//!  "modRevision": 40, "resource": {"apiVersion": "...", "kind": "Agent", ...}}]}
//! ```

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::policy::Resource;

use super::codec;

const FORMAT: u32 = 1;

/// Problems reading or writing the cache file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the cache file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the cache file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cache file {path} is not usable: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// One cached resource and where it was in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResource {
    pub key: String,
    pub mod_revision: i64,
    pub resource: Resource,
}

/// What the cache holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub revision: i64,
    pub saved_at: SystemTime,
    pub resources: Vec<CachedResource>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    format: u32,
    prefix: String,
    revision: i64,
    saved_at: String,
    content_hash: String,
    entries: Vec<CacheEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheEntry {
    key: String,
    mod_revision: i64,
    resource: serde_json::Value,
}

/// Writes the cache atomically. `content_hash` is the snapshot's, for operators comparing
/// nodes. Blocking (file I/O).
pub fn write(
    path: &Path,
    prefix: &str,
    revision: i64,
    content_hash: u64,
    resources: &[CachedResource],
) -> Result<(), CacheError> {
    let write_error = |source| CacheError::Write {
        path: path.to_path_buf(),
        source,
    };
    let entries = resources
        .iter()
        .map(|cached| {
            Ok(CacheEntry {
                key: cached.key.clone(),
                mod_revision: cached.mod_revision,
                resource: codec::encode_value(&cached.resource)?,
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|error| write_error(std::io::Error::other(error)))?;
    let file = CacheFile {
        format: FORMAT,
        prefix: prefix.to_owned(),
        revision,
        saved_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        content_hash: format!("{content_hash:016x}"),
        entries,
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|e| write_error(e.into()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(write_error)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".to_owned());
    let temporary = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut out = std::fs::File::create(&temporary)?;
        out.write_all(&text)?;
        out.write_all(b"\n")?;
        out.sync_all()?;
        std::fs::rename(&temporary, path)?;
        // The rename is durable once the folder is synced.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(write_error)
}

/// Reads the cache. `Ok(None)` when there is no file.
pub fn read(path: &Path, prefix: &str) -> Result<Option<Cached>, CacheError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let invalid = |problem: String| CacheError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let file: CacheFile = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.format != FORMAT {
        return Err(invalid(format!(
            "format {} is not {FORMAT} (written by another version)",
            file.format
        )));
    }
    if file.prefix != prefix {
        return Err(invalid(format!(
            "it holds keys under {} but this agent reads {prefix}",
            file.prefix
        )));
    }
    let saved_at = humantime::parse_rfc3339_weak(&file.saved_at)
        .map_err(|e| invalid(format!("savedAt: {e}")))?;
    let mut resources = Vec::with_capacity(file.entries.len());
    for entry in file.entries {
        let value = serde_json::to_vec(&entry.resource).map_err(|e| invalid(e.to_string()))?;
        let resource = codec::decode(prefix, &entry.key, &value)
            .map_err(|errors| invalid(errors.join("; ")))?;
        resources.push(CachedResource {
            key: entry.key,
            mod_revision: entry.mod_revision,
            resource,
        });
    }
    Ok(Some(Cached {
        revision: file.revision,
        saved_at,
        resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::keys;
    use crate::policy::parse_documents;

    fn agent(name: &str) -> CachedResource {
        let text = format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {{name: {name}}}\nspec: {{endpoints: [{{address: '10.0.0.1:80'}}]}}\n"
        );
        let resource = parse_documents(&text, "t").resources.remove(0).resource;
        CachedResource {
            key: keys::resource_key(keys::DEFAULT_PREFIX, &resource.key()),
            mod_revision: 7,
            resource,
        }
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.json");
        assert!(read(&path, keys::DEFAULT_PREFIX).unwrap().is_none());
        write(&path, keys::DEFAULT_PREFIX, 9, 1, &[agent("a")]).unwrap();
        write(
            &path,
            keys::DEFAULT_PREFIX,
            12,
            2,
            &[agent("a"), agent("b")],
        )
        .unwrap();
        let cached = read(&path, keys::DEFAULT_PREFIX).unwrap().unwrap();
        assert_eq!(cached.revision, 12);
        assert_eq!(cached.resources, vec![agent("a"), agent("b")]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cache.json"]);
    }

    #[test]
    fn a_damaged_or_foreign_cache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        write(&path, keys::DEFAULT_PREFIX, 9, 1, &[agent("a")]).unwrap();
        let error = read(&path, "/other").unwrap_err().to_string();
        assert!(error.contains("/other"), "{error}");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("10.0.0.1:80", "10.0.0.1:0")).unwrap();
        let error = read(&path, keys::DEFAULT_PREFIX).unwrap_err().to_string();
        assert!(error.contains("spec.endpoints[0].address"), "{error}");
        std::fs::write(&path, "{").unwrap();
        assert!(read(&path, keys::DEFAULT_PREFIX).is_err());
    }
}
