//! Running commands with visible progress, and the build, lint and test tasks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Prints a step header on stderr.
pub fn step(message: &str) {
    eprintln!("\x1b[1m==>\x1b[0m {message}");
}

/// Runs a command in the workspace root with inherited output; fails with the command line.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let line = format!("{command:?}");
    let status = command
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot start {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

/// Whether a command runs and exits 0 (output discarded).
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Builds the agent (with its embedded eBPF object) and the test binaries.
pub fn build(release: bool) -> anyhow::Result<()> {
    step(&format!(
        "building mesh-agent and test binaries ({})",
        if release { "release" } else { "debug" }
    ));
    let mut cargo = Command::new("cargo");
    cargo.args(["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)
}

/// fmt and clippy on the host workspace, clippy on the eBPF crate for its own target.
pub fn lint() -> anyhow::Result<()> {
    step("cargo fmt --check");
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy (workspace, -D warnings)");
    run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("cargo clippy (mesh-ebpf on bpfel-unknown-none, -D warnings)");
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "mesh-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-lint", "--", "-D", "warnings"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO"))
}

/// Fuzz targets under `fuzz/`, each with committed seeds in `fuzz/seeds/<target>`.
pub const FUZZ_TARGETS: [&str; 10] = [
    "http1_l7",
    "h1_upstream_response",
    "h1_client_request",
    "agent_config",
    "mountinfo",
    "protocol_sniff",
    "policy_resources",
    "jsonrpc_extract",
    "sse_parse",
    "kube_watch_event",
];

/// Runs every fuzz target for `seconds` (new inputs go to a scratch corpus under target/).
pub fn fuzz(seconds: u32) -> anyhow::Result<()> {
    for target in FUZZ_TARGETS {
        step(&format!("cargo fuzz run {target} ({seconds} s)"));
        let scratch = workspace_root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        run(Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                target,
            ])
            .arg(&scratch)
            .arg(format!("fuzz/seeds/{target}"))
            .args(["--", &format!("-max_total_time={seconds}")])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"))?;
    }
    Ok(())
}

/// Lint, build, every test through nextest, then a short run of each fuzz target.
pub fn test(nextest_args: &[String]) -> anyhow::Result<()> {
    lint()?;
    build(false)?;
    step("cargo nextest run (unit and end-to-end tests)");
    run(Command::new("cargo")
        .args(["nextest", "run", "--no-fail-fast"])
        .args(nextest_args))?;
    if nextest_args.is_empty() {
        fuzz(10)?;
    }
    Ok(())
}
