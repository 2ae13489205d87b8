//! Loading resources from text and from a directory: multi-document YAML (or JSON) parsing,
//! per-resource validation, duplicate detection, and the directory fingerprint the store polls.
//! One bad resource never discards the good ones: the report carries both.

use std::{
    collections::HashMap,
    fmt,
    hash::{Hash, Hasher},
    io,
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use serde::Deserialize;

use super::{
    Fnv64, PolicyError,
    resources::{AccessPolicy, Agent, AgentInstance, Kind, Resource, ResourceKey, TrafficPolicy},
};

/// At most this many documents are read from one text; the rest is reported as an error.
const MAX_DOCUMENTS: usize = 10_000;

/// Where a resource came from: a file (or other source name) and its document number, from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file, self.document)
    }
}

/// A valid resource and its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub resource: Resource,
    pub origin: Origin,
}

/// A rejected resource (or unreadable file): where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {error}", document.map(|d| format!(" (document {d})")).unwrap_or_default())]
pub struct LoadError {
    pub file: String,
    /// Document number from 1; `None` when the whole file or directory failed.
    pub document: Option<usize>,
    pub error: PolicyError,
}

/// What a load produced: the good resources and one error per rejected resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub resources: Vec<Loaded>,
    pub errors: Vec<LoadError>,
}

impl LoadReport {
    /// True when nothing was rejected.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    /// The good resources, without origins (for [`super::PolicySnapshot::compile`]).
    pub fn resources(&self) -> Vec<Resource> {
        self.resources.iter().map(|l| l.resource.clone()).collect()
    }

    fn merge(&mut self, other: LoadReport) {
        self.resources.extend(other.resources);
        self.errors.extend(other.errors);
    }

    /// Rejects every resource whose kind/namespace/name was already seen, naming both places.
    fn reject_duplicates(&mut self) {
        let mut first: HashMap<ResourceKey, Origin> = HashMap::new();
        let mut kept = Vec::with_capacity(self.resources.len());
        for loaded in std::mem::take(&mut self.resources) {
            let key = loaded.resource.key();
            if let Some(previous) = first.get(&key) {
                self.errors.push(LoadError {
                    file: loaded.origin.file.clone(),
                    document: Some(loaded.origin.document),
                    error: PolicyError::Duplicate {
                        resource: key.to_string(),
                        first: previous.to_string(),
                    },
                });
            } else {
                first.insert(key, loaded.origin.clone());
                kept.push(loaded);
            }
        }
        self.resources = kept;
    }
}

/// Parses every document of `text` (YAML, possibly several documents separated by `---`, or
/// JSON), validates each resource and rejects duplicates. `file` names the source in errors.
/// Empty documents are skipped. A syntax error ends the text: later documents cannot be
/// delimited reliably and are not read.
pub fn parse_documents(text: &str, file: &str) -> LoadReport {
    let mut report = parse_unchecked_duplicates(text, file);
    report.reject_duplicates();
    report
}

fn parse_unchecked_duplicates(text: &str, file: &str) -> LoadReport {
    let mut report = LoadReport::default();
    let error = |document: usize, error: PolicyError| LoadError {
        file: file.to_owned(),
        document: Some(document),
        error,
    };

    // Pass 1: generic values, to learn each document's kind and name (and catch syntax errors).
    let mut headers: Vec<Option<Result<(Kind, String), PolicyError>>> = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        if index >= MAX_DOCUMENTS {
            report.errors.push(error(
                index + 1,
                PolicyError::Parse {
                    resource: "document".to_owned(),
                    message: format!("more than {MAX_DOCUMENTS} documents; the rest is ignored"),
                },
            ));
            break;
        }
        match serde_yaml::Value::deserialize(document) {
            Ok(value) => headers.push(header(&value)),
            Err(source) => {
                report.errors.push(error(
                    index + 1,
                    PolicyError::Parse {
                        resource: "document".to_owned(),
                        message: source.to_string(),
                    },
                ));
                break;
            }
        }
    }

    // Pass 2: typed, so serde_yaml's errors carry the field path and the line.
    let documents = serde_yaml::Deserializer::from_str(text);
    for (index, (document, header)) in documents.zip(headers).enumerate() {
        let number = index + 1;
        let (kind, label) = match header {
            None => continue,
            Some(Ok(header)) => header,
            Some(Err(problem)) => {
                report.errors.push(error(number, problem));
                continue;
            }
        };
        let parsed = match kind {
            Kind::Agent => Agent::deserialize(document).map(Resource::Agent),
            Kind::AccessPolicy => AccessPolicy::deserialize(document).map(Resource::AccessPolicy),
            Kind::TrafficPolicy => {
                TrafficPolicy::deserialize(document).map(Resource::TrafficPolicy)
            }
            Kind::AgentInstance => {
                AgentInstance::deserialize(document).map(Resource::AgentInstance)
            }
        };
        let resource = match parsed {
            Ok(resource) => resource,
            Err(source) => {
                report.errors.push(error(
                    number,
                    PolicyError::Parse {
                        resource: label,
                        message: source.to_string(),
                    },
                ));
                continue;
            }
        };
        match resource.validate() {
            Ok(()) => report.resources.push(Loaded {
                resource,
                origin: Origin {
                    file: file.to_owned(),
                    document: number,
                },
            }),
            Err(problems) => {
                report
                    .errors
                    .extend(problems.into_iter().map(|problem| error(number, problem)));
            }
        }
    }
    report
}

/// Reads kind and name from a generic document. `None` for an empty document.
fn header(value: &serde_yaml::Value) -> Option<Result<(Kind, String), PolicyError>> {
    use serde_yaml::Value;
    if value.is_null() {
        return None;
    }
    let parse = |resource: &str, message: String| {
        Some(Err(PolicyError::Parse {
            resource: resource.to_owned(),
            message,
        }))
    };
    let Value::Mapping(map) = value else {
        return parse("document", "a resource must be a mapping".to_owned());
    };
    let kind = match map.get("kind") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return parse("document", "kind: must be a string".to_owned()),
        None => return parse("document", "kind: missing".to_owned()),
    };
    let metadata = map.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let name = field("name").unwrap_or_else(|| "<unnamed>".to_owned());
    let namespace = field("namespace").unwrap_or_else(|| super::DEFAULT_NAMESPACE.to_owned());
    let label = format!("{kind} {namespace}/{name}");
    match Kind::parse(kind) {
        Some(kind) => Some(Ok((kind, label))),
        None => parse(
            &label,
            format!(
                "kind: unknown kind `{kind}` (expected Agent, AccessPolicy, TrafficPolicy or AgentInstance)"
            ),
        ),
    }
}

/// Loads one file.
pub fn load_file(path: &Path) -> LoadReport {
    let file = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => parse_documents(&text, &file),
            Err(_) => read_error(&file, "not valid UTF-8".to_owned()),
        },
        Err(source) => read_error(&file, source.to_string()),
    }
}

fn read_error(file: &str, message: String) -> LoadReport {
    LoadReport {
        resources: Vec::new(),
        errors: vec![LoadError {
            file: file.to_owned(),
            document: None,
            error: PolicyError::Read {
                path: file.to_owned(),
                message,
            },
        }],
    }
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive; hidden files, such
/// as editor swap files and Kubernetes ConfigMap `..data` entries, are skipped), in file name
/// order. A duplicate kind/namespace/name is rejected with both places named; the first wins.
pub fn load_dir(dir: &Path) -> LoadReport {
    let files = match policy_files(dir) {
        Ok(files) => files,
        Err(source) => return read_error(&dir.display().to_string(), source.to_string()),
    };
    let mut report = LoadReport::default();
    for file in files {
        report.merge(load_file(&file));
    }
    report.reject_duplicates();
    report
}

/// The resource files of `dir`, sorted by name.
pub(crate) fn policy_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Some((_, extension)) = name.rsplit_once('.') else {
            continue;
        };
        let extension = extension.to_ascii_lowercase();
        if !matches!(extension.as_str(), "yaml" | "yml" | "json") {
            continue;
        }
        // Follows symlinks (ConfigMap mounts); skips directories and dangling links.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// A fingerprint of the resource files of `dir`: names, sizes and modification times. It
/// changes when a file is added, removed, renamed or rewritten.
pub fn dir_fingerprint(dir: &Path) -> io::Result<u64> {
    let mut hasher = Fnv64::default();
    for file in policy_files(dir)? {
        file.hash(&mut hasher);
        match std::fs::metadata(&file) {
            Ok(meta) => {
                meta.len().hash(&mut hasher);
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .unwrap_or_default();
                modified.as_nanos().hash(&mut hasher);
            }
            // Removed between listing and stat: fold that state in; the next poll settles it.
            Err(_) => u64::MAX.hash(&mut hasher),
        }
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::resources::{Action, Protocol};

    const GOOD: &str = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: tools
  labels:
    team: platform
spec:
  hosts: [tools, tools.mesh.local]
  endpoints:
    - address: 10.0.0.5:8080
    - address: 10.0.0.6:8080
      weight: 0
  protocol: Mcp
  capabilities:
    mcpTools: [fs_read, fs_write]
---
# a comment-only document is skipped
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: planner-tools
  namespace: agents
spec:
  targetAgent: tools
  rules:
    - from: [planner]
      mcp:
        tools: ["fs_*"]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: tools-traffic}
spec:
  targetAgent: tools
  timeouts: {request: 10s}
  rateLimits:
    - {from: "*", requestsPerSecond: 5, burst: 10}
"#;

    fn single_error(text: &str) -> String {
        let report = parse_documents(text, "test.yaml");
        assert!(
            report.resources.is_empty(),
            "unexpected resources: {report:?}"
        );
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        report.errors[0].to_string()
    }

    #[test]
    fn parses_good_multi_document_yaml() {
        let report = parse_documents(GOOD, "good.yaml");
        assert!(report.is_clean(), "{:?}", report.errors);
        assert_eq!(report.resources.len(), 3);
        let Resource::Agent(agent) = &report.resources[0].resource else {
            panic!("first is not an agent")
        };
        assert_eq!(agent.metadata.namespace, "default");
        assert_eq!(agent.metadata.labels["team"], "platform");
        assert_eq!(agent.spec.protocol, Protocol::Mcp);
        assert_eq!(agent.spec.endpoints[0].weight, 1);
        assert_eq!(agent.spec.endpoints[1].weight, 0);
        let Resource::AccessPolicy(policy) = &report.resources[1].resource else {
            panic!("second is not an access policy")
        };
        assert_eq!(policy.spec.action, Action::Allow);
        assert_eq!(report.resources[1].origin.document, 3);
        let Resource::TrafficPolicy(traffic) = &report.resources[2].resource else {
            panic!("third is not a traffic policy")
        };
        assert_eq!(traffic.spec.timeouts.request.as_secs(), 10);
        assert_eq!(traffic.spec.timeouts.connect.as_secs(), 5);
        assert_eq!(traffic.spec.retries.attempts, 2);
    }

    #[test]
    fn parses_json() {
        let json = r#"{"apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "a"}, "spec": {"endpoints": [{"address": "127.0.0.1:80"}]}}"#;
        let report = parse_documents(json, "a.json");
        assert!(report.is_clean(), "{:?}", report.errors);
        assert_eq!(report.resources.len(), 1);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let text = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: p}
spec:
  targetAgent: tools
  rules:
    - from: ["*"]
      mcp: {tool: [x]}
"#;
        let message = single_error(text);
        assert!(message.contains("AccessPolicy default/p"), "{message}");
        assert!(message.contains("spec.rules[0].mcp"), "{message}");
        assert!(message.contains("unknown field `tool`"), "{message}");
        assert!(message.contains("test.yaml (document 1)"), "{message}");
    }

    #[test]
    fn unknown_kind_and_missing_kind_are_rejected() {
        let message = single_error("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n");
        assert!(message.contains("unknown kind `Pod`"), "{message}");
        let message = single_error("apiVersion: v1\nmetadata: {name: x}\n");
        assert!(message.contains("kind: missing"), "{message}");
        let message = single_error("- 1\n- 2\n");
        assert!(message.contains("mapping"), "{message}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "kind: AccessPolicy\nmetadata: {name: planner-tools}\nspec:\n  targetAgent: t\n  rules:\n    - from: [a]\n      mcp: {tools: [fs_read, '']}\n",
                "AccessPolicy default/planner-tools: spec.rules[0].mcp.tools[1]: empty pattern",
            ),
            (
                "kind: AccessPolicy\nmetadata: {name: p}\nspec:\n  targetAgent: t\n  rules:\n    - from: []\n",
                "spec.rules[0].from: at least one source",
            ),
            (
                "kind: AccessPolicy\nmetadata: {name: p}\nspec:\n  targetAgent: t\n  rules:\n    - from: ['a*b']\n",
                "spec.rules[0].from[0]: `*` is only allowed",
            ),
            (
                "kind: AccessPolicy\nmetadata: {name: p}\nspec:\n  targetAgent: t\n  rules:\n    - from: ['*']\n      http: {paths: [api]}\n",
                "spec.rules[0].http.paths[0]: a path pattern must start with `/`",
            ),
            (
                "kind: AccessPolicy\nmetadata: {name: p}\nspec:\n  targetAgent: Bad_Name\n",
                "spec.targetAgent:",
            ),
            (
                "kind: Agent\nmetadata: {name: a}\nspec:\n  endpoints: []\n",
                "Agent default/a: spec.endpoints: at least one endpoint",
            ),
            (
                "kind: Agent\nmetadata: {name: a}\nspec:\n  hosts: ['tools:80']\n  endpoints: [{address: '10.0.0.1:80'}]\n",
                "spec.hosts[0]: `tools:80` must not include a port",
            ),
            (
                "kind: Agent\nmetadata: {name: a}\nspec:\n  endpoints: [{address: '10.0.0.1:80'}, {address: '10.0.0.1:80'}]\n",
                "spec.endpoints[1].address: duplicate endpoint",
            ),
            (
                "kind: Agent\nmetadata: {name: a}\nspec:\n  endpoints: [{address: '10.0.0.1:80'}]\n  fallback: a\n",
                "spec.fallback: an agent cannot fall back to itself",
            ),
            (
                "kind: Agent\nmetadata: {name: a}\nspec:\n  endpoints: [{address: '10.0.0.1:80'}]\n  capabilities: {mcpTools: ['']}\n",
                "spec.capabilities.mcpTools[0]: empty name",
            ),
            (
                "kind: Agent\nmetadata: {name: A, namespace: x}\nspec:\n  endpoints: [{address: '10.0.0.1:80'}]\n",
                "Agent x/A: metadata.name: `A` is not a valid name",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  retries: {attempts: 11}\n",
                "TrafficPolicy default/t: spec.retries.attempts: 11 is more than the maximum of 10",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  retries: {budgetPercent: 101}\n",
                "spec.retries.budgetPercent: must be between 0 and 100",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  retries: {backoffBase: 2s, backoffMax: 1s}\n",
                "spec.retries.backoffMax: must be at least",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  timeouts: {connect: 0s}\n",
                "spec.timeouts.connect: must be greater than zero",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  rateLimits: [{requestsPerSecond: 0, burst: 1}]\n",
                "spec.rateLimits[0].requestsPerSecond: must be a finite number greater than zero",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  rateLimits: [{requestsPerSecond: 1, burst: 0}]\n",
                "spec.rateLimits[0].burst: must be at least 1",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  rateLimits: [{requestsPerSecond: 1, burst: 1, tool: ''}]\n",
                "spec.rateLimits[0].tool: empty tool name",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  priority: {maxQueue: 0}\n",
                "spec.priority.maxQueue: must be at least 1",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  circuitBreaker: {maxEjectedPercent: 200}\n",
                "spec.circuitBreaker.maxEjectedPercent: must be between 0 and 100",
            ),
            (
                "kind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  maxRequestBodyBytes: 0\n",
                "spec.maxRequestBodyBytes: must be greater than zero",
            ),
        ];
        for (body, expected) in cases {
            let text = format!("apiVersion: mesh.agentmesh.dev/v1alpha1\n{body}");
            let report = parse_documents(&text, "t.yaml");
            assert!(report.resources.is_empty(), "accepted: {body}");
            let messages: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            assert!(
                messages.iter().any(|m| m.contains(expected)),
                "expected `{expected}` in {messages:#?}"
            );
        }
    }

    #[test]
    fn wrong_api_version_is_rejected() {
        let text = "apiVersion: v1\nkind: Agent\nmetadata: {name: a}\nspec:\n  endpoints: [{address: '10.0.0.1:80'}]\n";
        let message = single_error(text);
        assert!(
            message.contains("Agent default/a: apiVersion: `v1` is not supported"),
            "{message}"
        );
    }

    #[test]
    fn bad_type_error_names_path_and_line() {
        let text = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetAgent: a\n  timeouts:\n    request: soon\n";
        let message = single_error(text);
        assert!(message.contains("spec.timeouts.request"), "{message}");
        assert!(message.contains("line 7"), "{message}");
    }

    #[test]
    fn one_bad_document_keeps_the_others() {
        let text = format!(
            "{GOOD}---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {{name: bad}}\nspec: {{endpoints: []}}\n"
        );
        let report = parse_documents(&text, "mixed.yaml");
        assert_eq!(report.resources.len(), 3);
        assert_eq!(report.errors.len(), 1);
        assert_eq!(report.errors[0].document, Some(5));
    }

    #[test]
    fn syntax_error_stops_but_keeps_earlier_documents() {
        let text = format!("{GOOD}---\nkind: [unclosed\n---\nkind: Agent\n");
        let report = parse_documents(&text, "broken.yaml");
        assert_eq!(report.resources.len(), 3);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    }

    #[test]
    fn duplicate_within_text_is_rejected() {
        let text = format!(
            "{GOOD}---\n{}",
            GOOD.split("---").next().unwrap_or_default()
        );
        let report = parse_documents(&text, "dup.yaml");
        assert_eq!(report.resources.len(), 3);
        let message = report.errors[0].to_string();
        assert!(
            message.contains("Agent default/tools: defined again"),
            "{message}"
        );
    }

    #[test]
    fn empty_text_is_empty() {
        for text in ["", "---\n", "# nothing\n", "---\n---\n"] {
            let report = parse_documents(text, "e.yaml");
            assert!(
                report.is_clean() && report.resources.is_empty(),
                "{text:?}: {report:?}"
            );
        }
    }

    #[test]
    fn directory_with_one_bad_file_keeps_the_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10-good.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("20-bad.yml"), "kind: Agent\nspec: [\n").unwrap();
        std::fs::write(
            dir.path().join("30-dup.json"),
            r#"{"apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Agent",
                "metadata": {"name": "tools"}, "spec": {"endpoints": [{"address": "127.0.0.1:80"}]}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a resource").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
        let report = load_dir(dir.path());
        assert_eq!(report.resources.len(), 3, "{report:?}");
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(report.errors[0].file.ends_with("20-bad.yml"));
        let duplicate = report.errors[1].to_string();
        assert!(duplicate.contains("30-dup.json"), "{duplicate}");
        assert!(
            duplicate.contains("10-good.yaml (document 1)"),
            "{duplicate}"
        );
    }

    #[test]
    fn missing_directory_is_one_error() {
        let report = load_dir(Path::new("/nonexistent/policies"));
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].document.is_none());
    }

    #[test]
    fn fingerprint_changes_with_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir_fingerprint(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let one = dir_fingerprint(dir.path()).unwrap();
        assert_ne!(empty, one);
        assert_eq!(one, dir_fingerprint(dir.path()).unwrap());
        std::fs::write(dir.path().join("a.yaml"), format!("{GOOD}\n")).unwrap();
        assert_ne!(one, dir_fingerprint(dir.path()).unwrap());
    }

    #[test]
    fn example_file_in_deploy_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/policies/example.yaml");
        let report = load_file(&path);
        assert!(report.is_clean(), "{:?}", report.errors);
        let kinds: Vec<Kind> = report.resources.iter().map(|l| l.resource.kind()).collect();
        assert_eq!(
            kinds,
            [Kind::Agent, Kind::AccessPolicy, Kind::TrafficPolicy]
        );
        let snapshot = crate::policy::PolicySnapshot::compile(&report.resources(), Action::Allow);
        assert!(snapshot.is_ok(), "{:?}", snapshot.err());
    }
}
