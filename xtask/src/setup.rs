//! `cargo xtask setup`: installs every prerequisite, idempotently and quickly when all is in
//! place: Debian packages, the nightly toolchain's `rust-src`, bpf-linker (linked against the
//! LLVM inside the nightly toolchain), cargo-nextest and the Python virtualenv for test clients.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{self, step, succeeds, workspace_root};

/// (command that proves the package is there, Debian package).
const DEBIAN_PACKAGES: [(&str, &[&str], &str); 14] = [
    ("etcd", &["--version"], "etcd-server"),
    ("etcdctl", &["version"], "etcd-client"),
    ("protoc", &["--version"], "protobuf-compiler"),
    // The well-known types (`google/protobuf/descriptor.proto`, ...) etcd-client's build imports.
    (
        "test",
        &["-f", "/usr/include/google/protobuf/descriptor.proto"],
        "libprotobuf-dev",
    ),
    ("bpftool", &["version"], "bpftool"),
    ("ip", &["-V"], "iproute2"),
    ("haproxy", &["-v"], "haproxy"),
    // The L7 benchmark's second reference proxy (`cargo xtask bench l7`).
    ("nginx", &["-v"], "nginx"),
    ("curl", &["--version"], "curl"),
    // The multi-node tests capture the wire between simulated nodes.
    ("tcpdump", &["--version"], "tcpdump"),
    ("python3", &["-m", "venv", "--help"], "python3-venv"),
    ("pkg-config", &["--version"], "pkg-config"),
    // The deployment tests: unit files and the bare-metal installer.
    ("systemd-analyze", &["--version"], "systemd"),
    ("shellcheck", &["--version"], "shellcheck"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    nextest()?;
    cargo_fuzz()?;
    python_venv()?;
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(program, args, _)| !succeeds(program, args))
        .map(|(_, _, package)| *package)
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    step(&format!(
        "Debian packages: installing {}",
        missing.join(" ")
    ));
    if !is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    util::run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed: check the network or the apt sources")?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        step("Rust nightly: installing (minimal profile)");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src"))
    {
        step("Rust nightly with rust-src: present");
        return Ok(());
    }
    step("Rust nightly: adding rust-src (needed for -Z build-std=core)");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// The nightly sysroot's shared LLVM library (e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`) and
/// its major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, u32)> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("cannot ask the nightly toolchain for its sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split('.')
                .next()
                .and_then(|major| major.parse().ok());
            if let Some(major) = major {
                return Ok((lib.join(&name), major));
            }
        }
    }
    bail!(
        "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
        lib.display()
    )
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn symlink_fresh(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// bpf-linker cannot be downloaded prebuilt and needs LLVM 21+: link it against the LLVM that
/// ships inside the nightly toolchain, through a prefix folder whose lib/ also serves as its
/// run-time library path.
fn bpf_linker() -> anyhow::Result<()> {
    let (llvm, major) = nightly_llvm()?;
    let prefix = cargo_home().join("agent-mesh-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    symlink_fresh(&llvm, &prefix_lib.join("libLLVM.so"))?;
    if let Some(soname) = llvm.file_name() {
        symlink_fresh(&llvm, &prefix_lib.join(soname))?;
    }
    let works = succeeds("bpf-linker", &["--version"])
        || succeeds("rustup", &["run", "nightly", "bpf-linker", "--version"]);
    if works {
        step("bpf-linker: present");
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against the nightly LLVM {major} (1-2 minutes)"
    ));
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed")
}

fn nextest() -> anyhow::Result<()> {
    if succeeds("cargo", &["nextest", "--version"]) {
        step("cargo-nextest: present");
        return Ok(());
    }
    step("cargo-nextest: installing");
    util::run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))
}

fn cargo_fuzz() -> anyhow::Result<()> {
    if succeeds("cargo", &["fuzz", "--version"]) {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("cargo-fuzz: installing");
    util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// A virtualenv for the Python test clients, refreshed when the requirements change.
fn python_venv() -> anyhow::Result<()> {
    let root = workspace_root();
    let venv = root.join(".venv");
    let requirements = root.join("tests/python/requirements.txt");
    let python = venv.join("bin/python");
    if !python.exists() {
        step("Python virtualenv: creating .venv");
        util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let wanted = fs::read_to_string(&requirements).unwrap_or_default();
    let stamp = venv.join(".requirements.installed");
    if fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        step("Python virtualenv: up to date");
        return Ok(());
    }
    let has_packages = wanted
        .lines()
        .any(|line| !line.trim().is_empty() && !line.trim().starts_with('#'));
    if has_packages {
        step("Python virtualenv: installing test clients");
        util::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(&requirements),
        )?;
    }
    fs::write(&stamp, wanted).context("writing the requirements stamp")
}
