//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, and hands the object to the agent, which embeds it.
//!
//! `MESH_EBPF_OBJECT=/path/to/object` embeds a prebuilt object instead (packaging, cross builds).
//! `cargo xtask setup` installs what this needs (nightly `rust-src`, bpf-linker).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let embedded = out_dir.join("mesh-ebpf.o");

    if let Some(prebuilt) = env::var_os("MESH_EBPF_OBJECT") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        copy_object(&prebuilt, &embedded);
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    for watched in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-common/src",
        "mesh-common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let target_root = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    // A directory of its own: the outer cargo holds the lock on its build directory.
    let ebpf_target_dir = target_root.join("ebpf");

    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "mesh-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&ebpf_target_dir)
        .current_dir(&workspace);
    // The outer build's toolchain, wrappers (clippy-driver) and flags must not leak into the
    // nested nightly build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        cargo.env_remove(key);
    }
    for (key, _) in env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_CFG_"))
        {
            cargo.env_remove(key);
        }
    }
    let status = cargo.status().unwrap_or_else(|error| {
        fail(&format!("cannot run `rustup run nightly cargo`: {error}"));
    });
    if !status.success() {
        fail(&format!("building mesh-ebpf failed ({status})"));
    }
    copy_object(
        &ebpf_target_dir.join("bpfel-unknown-none/release/mesh-ebpf"),
        &embedded,
    );
}

fn copy_object(from: &Path, to: &Path) {
    if let Err(error) = fs::copy(from, to) {
        fail(&format!(
            "cannot copy the eBPF object {}: {error}",
            from.display()
        ));
    }
}

fn fail(message: &str) -> ! {
    println!(
        "cargo:warning={message}. The agent embeds its kernel programs; run `cargo xtask setup` \
         (nightly rust-src and bpf-linker) or point MESH_EBPF_OBJECT at a prebuilt object."
    );
    std::process::exit(1);
}
