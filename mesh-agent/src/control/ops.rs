//! What `meshctl` does to etcd: apply files (validated first, one transaction per file,
//! guarded by the revisions read so a concurrent writer is never overwritten unseen), read
//! resources back (validated again), delete, list node records, and load everything for a
//! dry-run authorization check.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};

use crate::policy::{Action, Kind, Loaded, PolicySnapshot, Resource, ResourceKey, parse_documents};

use super::{
    ControlError, codec,
    etcd::{Etcd, RawEntry},
    keys,
    node::{NodeRecord, decode_node},
};

/// etcd's default `--max-txn-ops`: a file with more resources cannot be one transaction.
pub const MAX_TXN_OPS: usize = 128;

/// Resources of one file (or standard input), validated.
#[derive(Debug, Clone)]
pub struct FileResources {
    pub file: String,
    pub resources: Vec<Resource>,
}

/// What `apply` did to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One line of `apply`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub file: String,
    pub key: ResourceKey,
    pub outcome: Outcome,
}

/// Files named by `-f`: a file as is, a folder's `*.yaml`, `*.yml` and `*.json` (not hidden,
/// not recursive, sorted), `-` for standard input.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ControlError> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" || path.is_file() {
            files.push(path.clone());
            continue;
        }
        if !path.is_dir() {
            return Err(ControlError::Usage(format!(
                "{}: no such file or folder",
                path.display()
            )));
        }
        let entries = std::fs::read_dir(path).map_err(|error| {
            ControlError::Usage(format!(
                "cannot read the folder {}: {error}",
                path.display()
            ))
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|file| {
                let name = file
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                file.is_file()
                    && !name.starts_with('.')
                    && [".yaml", ".yml", ".json"]
                        .iter()
                        .any(|extension| name.ends_with(extension))
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Reads and validates every file; any problem (in any file, or a resource defined twice
/// across files) refuses the whole set.
pub fn read_files(files: &[PathBuf]) -> Result<Vec<FileResources>, ControlError> {
    let mut problems = Vec::new();
    let mut read = Vec::new();
    let mut first: HashMap<ResourceKey, String> = HashMap::new();
    for path in files {
        let (name, text) = if path.as_os_str() == "-" {
            let mut text = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                Ok(_) => ("<stdin>".to_owned(), text),
                Err(error) => {
                    problems.push(format!("<stdin>: cannot read: {error}"));
                    continue;
                }
            }
        } else {
            let name = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => (name, text),
                Err(error) => {
                    problems.push(format!("{name}: cannot read: {error}"));
                    continue;
                }
            }
        };
        let report = parse_documents(&text, &name);
        problems.extend(report.errors.iter().map(ToString::to_string));
        for loaded in &report.resources {
            let key = loaded.resource.key();
            if key.kind == Kind::AgentInstance {
                problems.push(format!(
                    "{}: {key}: instance records are written by node agents for the workloads \
                     that register with them (registration API), not applied",
                    loaded.origin
                ));
                continue;
            }
            if let Some(previous) = first.get(&key) {
                problems.push(format!(
                    "{}: {key}: defined again (first defined in {previous})",
                    loaded.origin
                ));
            } else {
                first.insert(key, loaded.origin.to_string());
            }
        }
        read.push(FileResources {
            file: name,
            resources: report
                .resources
                .into_iter()
                .map(|l: Loaded| l.resource)
                .collect(),
        });
    }
    if problems.is_empty() {
        Ok(read)
    } else {
        Err(ControlError::Invalid {
            context: "nothing was written; fix these resources".to_owned(),
            problems,
        })
    }
}

/// Resources read from etcd: the valid ones by key, and one problem per invalid value.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub revision: i64,
    pub resources: BTreeMap<String, (RawEntry, Resource)>,
    pub invalid: Vec<String>,
    pub raw: HashMap<String, RawEntry>,
}

impl Stored {
    /// The valid resources.
    pub fn resources(&self) -> Vec<Resource> {
        self.resources
            .values()
            .map(|(_, resource)| resource.clone())
            .collect()
    }
}

fn decode_all(prefix: &str, revision: i64, entries: Vec<RawEntry>) -> Stored {
    let mut stored = Stored {
        revision,
        ..Stored::default()
    };
    for entry in entries {
        match codec::decode(prefix, &entry.key, &entry.value) {
            Ok(resource) => {
                stored
                    .resources
                    .insert(entry.key.clone(), (entry.clone(), resource));
            }
            Err(errors) => stored.invalid.extend(errors),
        }
        stored.raw.insert(entry.key.clone(), entry);
    }
    stored
}

/// Every resource of the synced kinds, at one revision.
pub async fn load_all(etcd: &Etcd) -> Result<Stored, ControlError> {
    let listing = etcd.list_kinds(&keys::SYNCED_KINDS).await?;
    Ok(decode_all(etcd.prefix(), listing.revision, listing.entries))
}

/// Resources of one kind: all namespaces (`namespace` `None`) or one, optionally one name.
pub async fn get(
    etcd: &Etcd,
    kind: Kind,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<Stored, ControlError> {
    let prefix = etcd.prefix().to_owned();
    match (namespace, name) {
        (Some(namespace), Some(name)) => {
            let key = keys::resource_key(
                &prefix,
                &ResourceKey {
                    kind,
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                },
            );
            match etcd.get(&key).await? {
                Some(entry) => Ok(decode_all(&prefix, entry.mod_revision, vec![entry])),
                None => Err(ControlError::NotFound(format!(
                    "{kind} {namespace}/{name} not found (key {key})"
                ))),
            }
        }
        (namespace, _) => {
            let range = match namespace {
                Some(namespace) => keys::namespace_prefix(&prefix, kind, namespace),
                None => keys::kind_prefix(&prefix, kind),
            };
            let listing = etcd.list_prefix(&range).await?;
            let mut stored = decode_all(&prefix, listing.revision, listing.entries);
            if let Some(name) = name {
                stored
                    .resources
                    .retain(|_, (_, resource)| resource.metadata().name == name);
                if stored.resources.is_empty() && stored.invalid.is_empty() {
                    return Err(ControlError::NotFound(format!(
                        "{kind} {name} not found in any namespace"
                    )));
                }
            }
            Ok(stored)
        }
    }
}

/// Deletes one resource. `NotFound` when it does not exist; refused (nothing deleted) when
/// the resources left would not compile (e.g. an agent another one falls back to).
pub async fn delete(etcd: &Etcd, key: &ResourceKey) -> Result<(), ControlError> {
    let path = keys::resource_key(etcd.prefix(), key);
    let stored = load_all(etcd).await?;
    if stored.resources.contains_key(&path) {
        let rest: Vec<Resource> = stored
            .resources
            .iter()
            .filter(|(stored_key, _)| **stored_key != path)
            .map(|(_, (_, resource))| resource.clone())
            .collect();
        if let Err(errors) = PolicySnapshot::compile(&rest, Action::Allow) {
            return Err(ControlError::Invalid {
                context: format!(
                    "{key} was not deleted: without it, every agent would refuse the resources"
                ),
                problems: errors.iter().map(ToString::to_string).collect(),
            });
        }
    }
    let target = path.clone();
    let response = etcd
        .call("deleting a resource", |mut client| async move {
            client.delete(target, None::<DeleteOptions>).await
        })
        .await?;
    if response.deleted() == 0 {
        return Err(ControlError::NotFound(format!(
            "{key} not found (key {path})"
        )));
    }
    Ok(())
}

/// Node records, by name; an undecodable record is reported as a problem.
pub async fn nodes(etcd: &Etcd) -> Result<(Vec<NodeRecord>, Vec<String>), ControlError> {
    let listing = etcd.list_prefix(&keys::nodes_prefix(etcd.prefix())).await?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for entry in listing.entries {
        match decode_node(&entry.value) {
            Ok(record) => records.push(record),
            Err(problem) => problems.push(format!("{}: {problem}", entry.key)),
        }
    }
    records.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok((records, problems))
}

/// Applies validated files: checks that the result compiles together with what etcd holds
/// (nothing is written otherwise), then writes each file in one transaction. Returns what
/// happened to every resource, and the compiler's warnings.
pub async fn apply(
    etcd: &Etcd,
    files: &[FileResources],
) -> Result<(Vec<Applied>, Vec<String>), ControlError> {
    for file in files {
        if file.resources.len() > MAX_TXN_OPS {
            return Err(ControlError::Invalid {
                context: "nothing was written".to_owned(),
                problems: vec![format!(
                    "{}: {} resources; one file is one etcd transaction of at most {MAX_TXN_OPS} \
                     operations (etcd's --max-txn-ops): split the file",
                    file.file,
                    file.resources.len()
                )],
            });
        }
    }
    let prefix = etcd.prefix().to_owned();
    let stored = load_all(etcd).await?;
    // The set the agents will compile once every file is written.
    let mut merged: BTreeMap<String, Resource> = stored
        .resources
        .iter()
        .map(|(key, (_, resource))| (key.clone(), resource.clone()))
        .collect();
    for file in files {
        for resource in &file.resources {
            merged.insert(
                keys::resource_key(&prefix, &resource.key()),
                resource.clone(),
            );
        }
    }
    let merged: Vec<Resource> = merged.into_values().collect();
    let warnings = match PolicySnapshot::compile(&merged, Action::Allow) {
        Ok(snapshot) => snapshot.warnings().to_vec(),
        Err(errors) => {
            return Err(ControlError::Invalid {
                context: "nothing was written: together with the resources in etcd, these \
                          would be refused by every agent"
                    .to_owned(),
                problems: errors.iter().map(ToString::to_string).collect(),
            });
        }
    };
    let mut applied = Vec::new();
    for file in files {
        applied.extend(apply_file(etcd, file, &stored.raw).await?);
    }
    Ok((applied, warnings))
}

/// Writes one file's resources in one transaction, guarded by the revisions read; on a
/// concurrent change, reads again and retries (three times).
async fn apply_file(
    etcd: &Etcd,
    file: &FileResources,
    known: &HashMap<String, RawEntry>,
) -> Result<Vec<Applied>, ControlError> {
    let prefix = etcd.prefix().to_owned();
    let mut current: HashMap<String, Option<RawEntry>> = file
        .resources
        .iter()
        .map(|resource| {
            let key = keys::resource_key(&prefix, &resource.key());
            let entry = known.get(&key).cloned();
            (key, entry)
        })
        .collect();
    for _attempt in 0..3 {
        let mut compares = Vec::new();
        let mut puts = Vec::new();
        let mut report = Vec::new();
        for resource in &file.resources {
            let key = keys::resource_key(&prefix, &resource.key());
            let value = codec::encode(resource).map_err(|error| {
                ControlError::Failed(format!("cannot encode {}: {error}", resource.key()))
            })?;
            let existing = current.get(&key).cloned().flatten();
            let outcome = match &existing {
                None => Outcome::Created,
                Some(entry) => {
                    let same = serde_json::from_slice::<serde_json::Value>(&entry.value)
                        .ok()
                        .zip(codec::encode_value(resource).ok())
                        .is_some_and(|(stored, new)| stored == new);
                    if same {
                        Outcome::Unchanged
                    } else {
                        Outcome::Configured
                    }
                }
            };
            match (&existing, outcome) {
                (_, Outcome::Unchanged) => {}
                (None, _) => {
                    compares.push(Compare::version(key.clone(), CompareOp::Equal, 0));
                    puts.push(TxnOp::put(key.clone(), value, None));
                }
                (Some(entry), _) => {
                    compares.push(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        entry.mod_revision,
                    ));
                    puts.push(TxnOp::put(key.clone(), value, None));
                }
            }
            report.push(Applied {
                file: file.file.clone(),
                key: resource.key(),
                outcome,
            });
        }
        if puts.is_empty() {
            return Ok(report);
        }
        let response = etcd
            .call("applying resources", |mut client| async move {
                client.txn(Txn::new().when(compares).and_then(puts)).await
            })
            .await?;
        if response.succeeded() {
            return Ok(report);
        }
        // Someone else wrote one of these keys since we read it: read them again.
        for (key, entry) in current.iter_mut() {
            *entry = etcd.get(key).await?;
        }
    }
    Err(ControlError::Conflict(format!(
        "{}: the resources kept changing in etcd while applying (another writer?); nothing \
         of this file was written, try again",
        file.file
    )))
}
