//! Fuzzes the /proc mountinfo and cgroup parsers and the cgroup path normaliser: no input may
//! panic them, and a normalised path never climbs out of the hierarchy.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use mesh_agent::datapath::cgroup;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mounts = cgroup::parse_mountinfo(&text);
    let _ = cgroup::find_mount(&mounts, "cgroup2");
    let _ = cgroup::parse_proc_cgroup(&text);
    if let Ok(path) =
        cgroup::relative_cgroup_path(Path::new("/sys/fs/cgroup"), Path::new(text.as_ref()))
    {
        assert!(path.is_absolute());
        assert!(!path.components().any(|part| part == Component::ParentDir));
    }
});
