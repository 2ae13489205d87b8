//! cgroup v2 plumbing: finding the cgroup2 and bpffs mounts from `/proc/self/mountinfo`,
//! resolving cgroup paths and pids to cgroup ids, and checking where a cgroup sits in the tree.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use super::DatapathError;

/// One line of `/proc/self/mountinfo`, reduced to what the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The directory of the filesystem this mount shows (`/` unless it is a bind mount of a
    /// subdirectory).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses `/proc/<pid>/mountinfo` text. Lines that do not parse are skipped: the file is
/// written by the kernel and the agent only needs the mount point and filesystem type.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            // Optional fields end at a lone "-", then comes the filesystem type.
            let mut rest = fields.skip_while(|field| *field != "-");
            rest.next()?;
            let fs_type = rest.next()?;
            Some(MountEntry {
                root: unescape_mount_path(root),
                mount_point: PathBuf::from(unescape_mount_path(mount_point)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && let Some(value) = raw
                .get(index + 1..index + 4)
                .filter(|octal| octal.bytes().all(|digit| (b'0'..=b'7').contains(&digit)))
                .and_then(|octal| u8::from_str_radix(octal, 8).ok())
        {
            out.push(value);
            index += 4;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_mountinfo() -> Result<Vec<MountEntry>, DatapathError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| DatapathError::Io {
        what: "reading /proc/self/mountinfo".into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup2 mount point (e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    find_mount(&read_mountinfo()?, "cgroup2").ok_or(DatapathError::NoCgroup2)
}

/// The mount of a filesystem type that shows the whole filesystem (root `/`), in mount order;
/// a bind mount of a subdirectory only if nothing else is there.
pub fn find_mount(mounts: &[MountEntry], fs_type: &str) -> Option<PathBuf> {
    let mut matching = mounts.iter().filter(|entry| entry.fs_type == fs_type);
    let first = matching.clone().next()?;
    let whole = matching.find(|entry| entry.root == "/").unwrap_or(first);
    Some(whole.mount_point.clone())
}

/// Whether `path` is a mount point of the given filesystem type.
pub fn is_mounted_as(path: &Path, fs_type: &str) -> Result<bool, DatapathError> {
    Ok(read_mountinfo()?
        .iter()
        .any(|entry| entry.mount_point == path && entry.fs_type == fs_type))
}

/// A cgroup in the cgroup2 hierarchy: its path below the mount and its id (the inode number,
/// which is what `bpf_get_current_cgroup_id` returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Path relative to the cgroup2 mount, always starting with `/`.
    pub path: PathBuf,
    /// Absolute path of the cgroup directory.
    pub dir: PathBuf,
    pub id: u64,
}

/// Normalises a cgroup path given by a user: relative to the cgroup2 mount, `/` for the root.
/// Absolute paths under the mount are accepted too. `..` is refused.
pub fn relative_cgroup_path(mount: &Path, given: &Path) -> Result<PathBuf, DatapathError> {
    let below = given.strip_prefix(mount).unwrap_or(given);
    let mut normalised = PathBuf::from("/");
    for component in below.components() {
        match component {
            Component::Normal(part) => normalised.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(DatapathError::InvalidCgroupPath {
                    path: given.to_path_buf(),
                    reason: "`..` is not allowed".into(),
                });
            }
        }
    }
    Ok(normalised)
}

/// The absolute directory of a cgroup path (relative to the mount, or absolute under it).
pub fn cgroup_dir(mount: &Path, given: &Path) -> Result<PathBuf, DatapathError> {
    let path = relative_cgroup_path(mount, given)?;
    Ok(mount.join(path.strip_prefix("/").unwrap_or(&path)))
}

/// Resolves a cgroup path (relative to the mount, or absolute under it) to its id.
pub fn resolve(mount: &Path, given: &Path) -> Result<Cgroup, DatapathError> {
    let path = relative_cgroup_path(mount, given)?;
    let dir = cgroup_dir(mount, &path)?;
    let metadata = fs::metadata(&dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DatapathError::CgroupNotFound { path: dir.clone() },
        _ => DatapathError::Io {
            what: format!("reading cgroup {}", dir.display()),
            source,
        },
    })?;
    if !metadata.is_dir() || !dir.join("cgroup.procs").exists() {
        return Err(DatapathError::InvalidCgroupPath {
            path: dir,
            reason: "not a cgroup v2 directory (no cgroup.procs)".into(),
        });
    }
    Ok(Cgroup {
        path,
        dir,
        id: metadata.ino(),
    })
}

/// The cgroup2 path of a process, from the `0::` line of `/proc/<pid>/cgroup`.
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf, DatapathError> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DatapathError::NoSuchProcess { pid },
        _ => DatapathError::Io {
            what: format!("reading {file}"),
            source,
        },
    })?;
    parse_proc_cgroup(&text).ok_or(DatapathError::NoCgroup2ForPid { pid })
}

/// Extracts the unified-hierarchy path from `/proc/<pid>/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::").map(PathBuf::from))
}

/// Whether `inner` is `outer` or lies below it (both relative cgroup paths).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// Finds the relative path of a cgroup id by walking the hierarchy (for display only; bounded
/// to `max_dirs` directories).
pub fn path_of_id(mount: &Path, id: u64, max_dirs: usize) -> Option<PathBuf> {
    let mut stack = vec![mount.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > max_dirs {
            return None;
        }
        let Ok(metadata) = fs::metadata(&dir) else {
            continue;
        };
        if metadata.ino() == id {
            let below = dir.strip_prefix(mount).ok()?;
            return Some(Path::new("/").join(below));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
40 24 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime - bpf bpf rw,mode=700
41 29 0:36 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw
42 29 0:36 / /mnt/second rw - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(
            find_mount(&mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_mount(&mounts, "bpf"),
            Some(PathBuf::from("/sys/fs/bpf"))
        );
        assert_eq!(find_mount(&mounts, "xfs"), None);
    }

    #[test]
    fn unescapes_octal_mount_points() {
        let mounts = parse_mountinfo(HYBRID);
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/mnt/with space"))
        );
        assert_eq!(unescape_mount_path("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_path("trailing\\"), "trailing\\");
        assert_eq!(unescape_mount_path("bad\\9zz"), "bad\\9zz");
    }

    #[test]
    fn garbage_mountinfo_lines_are_skipped() {
        let mounts = parse_mountinfo("nonsense\n1 2 3\n\n31 30 0:27 / /x rw - cgroup2 c rw\n");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].fs_type, "cgroup2");
    }

    #[test]
    fn proc_cgroup_picks_the_unified_line() {
        let text = "12:cpu,cpuacct:/user.slice\n1:name=systemd:/init.scope\n0::/mesh/demo\n";
        assert_eq!(parse_proc_cgroup(text), Some(PathBuf::from("/mesh/demo")));
        assert_eq!(parse_proc_cgroup("1:name=systemd:/\n"), None);
    }

    #[test]
    fn cgroup_paths_are_normalised_and_dotdot_refused() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative_cgroup_path(mount, Path::new("a/b")).ok(),
            Some(PathBuf::from("/a/b"))
        );
        assert_eq!(
            relative_cgroup_path(mount, Path::new("/sys/fs/cgroup/a/./b")).ok(),
            Some(PathBuf::from("/a/b"))
        );
        assert_eq!(
            relative_cgroup_path(mount, Path::new("/")).ok(),
            Some(PathBuf::from("/"))
        );
        assert!(relative_cgroup_path(mount, Path::new("/a/../../etc")).is_err());
        // Both forms name the same directory.
        for given in ["a/b", "/a/b", "/sys/fs/cgroup/a/b"] {
            assert_eq!(
                cgroup_dir(mount, Path::new(given)).ok(),
                Some(PathBuf::from("/sys/fs/cgroup/a/b")),
                "{given}"
            );
        }
    }

    #[test]
    fn within_is_component_wise() {
        assert!(is_within(Path::new("/mesh/agent"), Path::new("/mesh")));
        assert!(is_within(Path::new("/mesh"), Path::new("/")));
        assert!(!is_within(Path::new("/mesh-other"), Path::new("/mesh")));
    }
}
