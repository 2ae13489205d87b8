//! Errors of the datapath, each naming the cause and, where there is one, the fix.

use std::path::PathBuf;

/// Everything that can go wrong loading, attaching or using the kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "missing privileges: {missing}. The agent loads eBPF programs and attaches them to cgroups; \
         run it as root or grant these capabilities (Kubernetes: securityContext.capabilities.add)"
    )]
    MissingPrivileges { missing: String },
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo). Mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup`, or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error(
        "bpffs is not mounted and mounting it at {mount_point} failed: {source}. Mount it with \
         `mount -t bpf bpf /sys/fs/bpf` (Kubernetes: mount the host's /sys/fs/bpf into the pod)"
    )]
    NoBpffs {
        mount_point: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cgroup {path} does not exist; create it or fix the path (paths are relative to the cgroup2 mount)"
    )]
    CgroupNotFound { path: PathBuf },
    #[error("invalid cgroup path {path}: {reason}")]
    InvalidCgroupPath { path: PathBuf, reason: String },
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("process {pid} has no cgroup v2 membership (no `0::` line in /proc/{pid}/cgroup)")]
    NoCgroup2ForPid { pid: u32 },
    #[error(
        "cgroup {cgroup} is outside the attach cgroup {attach}: the kernel programs never see its \
         sockets. Move the workload below {attach} or set spec.datapath.attachCgroup higher"
    )]
    OutsideAttachCgroup { cgroup: PathBuf, attach: PathBuf },
    #[error(
        "refusing to enrol {cgroup}: the agent itself runs in it, and would capture its own traffic"
    )]
    SelfEnrolment { cgroup: PathBuf },
    #[error("the kernel refused the eBPF object: {source}")]
    Load { source: Box<aya::EbpfError> },
    #[error("the eBPF object has no program {name}: the agent binary is inconsistent; rebuild it")]
    MissingProgram { name: &'static str },
    #[error("the kernel refused program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "this kernel does not support the hook of {name} ({source}); the mesh needs Linux 5.8 or \
         later with CONFIG_CGROUP_BPF and CONFIG_BPF_STREAM_PARSER"
    )]
    UnsupportedHook {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("attaching {name} failed: {source}")]
    Attach {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("pinning {path} failed: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "pinned map {name} does not match this agent's layout ({source}); it was left by an \
         incompatible version: run `mesh-agent detach` and start again"
    )]
    PinnedMapMismatch {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "no datapath is pinned under {pin_dir}: start the agent first (or pass the --pin-dir it uses)"
    )]
    NotRunning { pin_dir: PathBuf },
    #[error(
        "the cgroup the datapath is attached to (id {cgroup_id}) no longer exists; run `mesh-agent detach`"
    )]
    AttachCgroupGone { cgroup_id: u64 },
    #[error(
        "another agent is running with pin folder {pin_dir}; stop it first, or give this one its \
         own spec.datapath.pinDir"
    )]
    PinDirInUse { pin_dir: PathBuf },
    #[error("invalid {setting}: {problem}")]
    InvalidSetting {
        setting: &'static str,
        problem: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}
