//! The configured workloads (`spec.workloads`), kept enrolled for as long as the agent runs.
//!
//! A workload is named by its cgroup's path, but capture follows the cgroup's id, and a cgroup
//! that is removed and created again gets a new one: a systemd service that restarts, or a
//! process supervisor that recreates its group, would otherwise leave the mesh silently until
//! the agent restarted. So would a workload whose cgroup did not exist yet when the agent
//! started. This module enrols a configured path whenever its directory is there under a new
//! id, and unenrols the old id (whose accounting links go with it) when the directory goes.
//! Changes are seen through inotify on each workload's parent directory, with a periodic check
//! behind it (a parent that does not exist yet cannot be watched). Between a cgroup's creation
//! and its enrolment (a few milliseconds) its connections are not captured.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, error, info, warn};

use crate::datapath::{Datapath, DatapathError};

/// How often every workload is checked again, whatever inotify said.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What the keeper needs of the datapath (a trait so that its decisions can be tested
/// without the kernel).
pub trait Enrolment {
    /// The id of the cgroup at `path` (relative to the cgroup2 mount), `None` when it does not
    /// exist.
    fn current_id(&self, path: &Path) -> Result<Option<u64>, DatapathError>;
    /// Enrols the cgroup at `path`; its id.
    fn enrol(&self, path: &Path) -> Result<u64, DatapathError>;
    /// Unenrols a cgroup by id (its directory may be gone).
    fn unenrol_id(&self, id: u64) -> Result<(), DatapathError>;
    /// The absolute directory of `path`.
    fn directory(&self, path: &Path) -> Result<PathBuf, DatapathError>;
}

impl Enrolment for Datapath {
    fn current_id(&self, path: &Path) -> Result<Option<u64>, DatapathError> {
        match crate::datapath::cgroup::resolve(self.cgroup_mount(), path) {
            Ok(cgroup) => Ok(Some(cgroup.id)),
            Err(DatapathError::CgroupNotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn enrol(&self, path: &Path) -> Result<u64, DatapathError> {
        self.enrol_cgroup(path).map(|cgroup| cgroup.id)
    }

    fn unenrol_id(&self, id: u64) -> Result<(), DatapathError> {
        Datapath::unenrol_id(self, id)
    }

    fn directory(&self, path: &Path) -> Result<PathBuf, DatapathError> {
        crate::datapath::cgroup::cgroup_dir(self.cgroup_mount(), path)
    }
}

/// One configured workload: its name (for logs and metrics) and cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredWorkload {
    pub name: String,
    pub cgroup: PathBuf,
}

/// What one check did to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    /// Enrolled where it was not (its cgroup appeared).
    Enrolled(u64),
    /// Its cgroup was created again: the old id unenrolled, the new one enrolled.
    Replaced {
        old: u64,
        new: u64,
    },
    /// Its cgroup went: the old id unenrolled.
    Removed(u64),
}

#[derive(Debug)]
struct Tracked {
    workload: ConfiguredWorkload,
    enrolled: Option<u64>,
    /// The last failure logged, so that a lasting one is logged once, not on every check.
    last_failure: Option<String>,
    /// Whether the cgroup's absence was logged since it was last enrolled.
    absence_logged: bool,
}

impl Tracked {
    fn check(&mut self, enrolment: &impl Enrolment) -> Result<Change, DatapathError> {
        let path = &self.workload.cgroup;
        let current = enrolment.current_id(path)?;
        let old = match (self.enrolled, current) {
            (Some(old), Some(now)) if old == now => return Ok(Change::Unchanged),
            (None, None) => return Ok(Change::Unchanged),
            (old, _) => old,
        };
        if let Some(old) = old {
            enrolment.unenrol_id(old)?;
            self.enrolled = None;
        }
        if current.is_none() {
            return Ok(old.map_or(Change::Unchanged, Change::Removed));
        }
        let new = enrolment.enrol(path)?;
        self.enrolled = Some(new);
        Ok(match old {
            Some(old) => Change::Replaced { old, new },
            None => Change::Enrolled(new),
        })
    }
}

/// The keeper's state and counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct WorkloadKeeperStatus {
    enrolled: AtomicU64,
    missing: AtomicU64,
    failing: AtomicU64,
    enrolments: AtomicU64,
    removals: AtomicU64,
}

/// A point-in-time copy of [`WorkloadKeeperStatus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadKeeperSample {
    /// Configured workloads whose cgroup is enrolled.
    pub enrolled: u64,
    /// Configured workloads whose cgroup does not exist.
    pub missing: u64,
    /// Configured workloads whose cgroup exists but could not be enrolled.
    pub failing: u64,
    /// Enrolments of a configured workload's cgroup (at start, late, or created anew).
    pub enrolments: u64,
    /// Ids unenrolled because their cgroup went or was created anew.
    pub removals: u64,
}

impl WorkloadKeeperStatus {
    pub fn sample(&self) -> WorkloadKeeperSample {
        WorkloadKeeperSample {
            enrolled: self.enrolled.load(Ordering::Relaxed),
            missing: self.missing.load(Ordering::Relaxed),
            failing: self.failing.load(Ordering::Relaxed),
            enrolments: self.enrolments.load(Ordering::Relaxed),
            removals: self.removals.load(Ordering::Relaxed),
        }
    }
}

/// Told each newly enrolled cgroup id with its workload's name.
type OnEnrolled = Box<dyn Fn(u64, &str) + Send + Sync>;

/// Keeps the configured workloads enrolled; `on_enrolled` learns each new id with its
/// workload's name.
pub struct WorkloadKeeper<E> {
    enrolment: Arc<E>,
    tracked: Vec<Tracked>,
    on_enrolled: OnEnrolled,
    status: Arc<WorkloadKeeperStatus>,
}

impl<E> std::fmt::Debug for WorkloadKeeper<E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WorkloadKeeper")
            .field("tracked", &self.tracked)
            .finish_non_exhaustive()
    }
}

impl<E: Enrolment + Send + Sync + 'static> WorkloadKeeper<E> {
    pub fn new(
        enrolment: Arc<E>,
        workloads: impl IntoIterator<Item = ConfiguredWorkload>,
        on_enrolled: impl Fn(u64, &str) + Send + Sync + 'static,
    ) -> Self {
        Self {
            enrolment,
            tracked: workloads
                .into_iter()
                .map(|workload| Tracked {
                    workload,
                    enrolled: None,
                    last_failure: None,
                    absence_logged: false,
                })
                .collect(),
            on_enrolled: Box::new(on_enrolled),
            status: Arc::default(),
        }
    }

    /// The keeper's state and counters, shared with `/metrics`.
    pub fn status(&self) -> Arc<WorkloadKeeperStatus> {
        Arc::clone(&self.status)
    }

    /// Checks every workload once: enrols those whose cgroup is there under an id not
    /// enrolled yet, unenrols the ids of those whose cgroup went. A failure is logged (once
    /// while it lasts) and tried again at the next check; the other workloads go on.
    pub fn check_all(&mut self) -> Vec<Change> {
        let mut changes = Vec::with_capacity(self.tracked.len());
        for tracked in &mut self.tracked {
            let checked = tracked.check(self.enrolment.as_ref());
            let name = tracked.workload.name.as_str();
            let cgroup = tracked.workload.cgroup.display();
            match checked {
                Ok(change) => {
                    tracked.last_failure = None;
                    let (enrolments, removals) = match change {
                        Change::Unchanged if tracked.enrolled.is_some() => (0, 0),
                        Change::Unchanged => {
                            if !tracked.absence_logged {
                                warn!(workload = name, %cgroup, "configured workload's cgroup does not exist yet: enrolled when it appears");
                                tracked.absence_logged = true;
                            }
                            (0, 0)
                        }
                        Change::Enrolled(id) => {
                            tracked.absence_logged = false;
                            (self.on_enrolled)(id, name);
                            info!(workload = name, %cgroup, cgroup_id = id, "configured workload enrolled");
                            (1, 0)
                        }
                        Change::Replaced { old, new } => {
                            tracked.absence_logged = false;
                            (self.on_enrolled)(new, name);
                            info!(workload = name, %cgroup, old_cgroup_id = old, cgroup_id = new, "configured workload's cgroup was created again: enrolled under its new id");
                            (1, 1)
                        }
                        Change::Removed(id) => {
                            tracked.absence_logged = true;
                            warn!(workload = name, %cgroup, cgroup_id = id, "configured workload's cgroup is gone: unenrolled; it is enrolled again when the cgroup comes back");
                            (0, 1)
                        }
                    };
                    self.status
                        .enrolments
                        .fetch_add(enrolments, Ordering::Relaxed);
                    self.status.removals.fetch_add(removals, Ordering::Relaxed);
                    changes.push(change);
                }
                Err(failure) => {
                    let text = failure.to_string();
                    if tracked.last_failure.as_deref() != Some(text.as_str()) {
                        error!(workload = name, %cgroup, error = %failure, "cannot enrol configured workload; tried again at the next check");
                        tracked.last_failure = Some(text);
                    }
                    changes.push(Change::Unchanged);
                }
            }
        }
        let count = |state: fn(&Tracked) -> bool| {
            self.tracked.iter().filter(|tracked| state(tracked)).count() as u64
        };
        let status = &self.status;
        status.enrolled.store(
            count(|tracked| tracked.enrolled.is_some()),
            Ordering::Relaxed,
        );
        status.failing.store(
            count(|tracked| tracked.enrolled.is_none() && tracked.last_failure.is_some()),
            Ordering::Relaxed,
        );
        status.missing.store(
            count(|tracked| tracked.enrolled.is_none() && tracked.last_failure.is_none()),
            Ordering::Relaxed,
        );
        changes
    }

    /// Watches the workloads' parent directories and checks the workloads on every change
    /// there and every [`RECHECK_INTERVAL`], until `shutdown`. Never unenrols on shutdown
    /// (capture outlives the agent).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        if self.tracked.is_empty() {
            return;
        }
        let mut watcher = match DirectoryWatcher::new() {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!(%error, interval = ?RECHECK_INTERVAL, "inotify unavailable: configured workloads are checked periodically only");
                None
            }
        };
        let parents: Vec<PathBuf> = self
            .tracked
            .iter()
            .filter_map(|tracked| {
                // A path that is not a cgroup path is reported by the checks; nothing to watch.
                let directory = self.enrolment.directory(&tracked.workload.cgroup).ok()?;
                directory.parent().map(Path::to_path_buf)
            })
            .collect();
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(watcher) = &mut watcher {
                watcher.watch_all(&parents);
            }
            self.check_all();
            tokio::select! {
                _ = recheck.tick() => {}
                changed = wait_for_change(watcher.as_mut()) => {
                    if let Err(error) = changed {
                        warn!(%error, "inotify failed: configured workloads are checked periodically only");
                        watcher = None;
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

async fn wait_for_change(watcher: Option<&mut DirectoryWatcher>) -> std::io::Result<()> {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

/// An inotify instance that reports entries created, removed or moved in a set of
/// directories.
struct DirectoryWatcher {
    inotify: AsyncFd<InotifyFd>,
    watched: BTreeMap<PathBuf, WatchDescriptor>,
}

/// The inotify instance as the `AsRawFd` that tokio's `AsyncFd` polls.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirectoryWatcher {
    fn new() -> Result<Self, std::io::Error> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `InotifyFd` owns the descriptor (an `OwnedFd` inside `Inotify`), which stays
        // open and the same until the `AsyncFd` that owns the `InotifyFd` is dropped, and its
        // `as_raw_fd` always returns that descriptor.
        let inotify = unsafe {
            AsyncFd::register_with_interest(InotifyFd(inotify), tokio::io::Interest::READABLE)
        }?;
        Ok(Self {
            inotify,
            watched: BTreeMap::new(),
        })
    }

    /// Adds a watch on each of `directories` that exists and has none (a removed directory's
    /// watch is dropped by the kernel and added again once it is back).
    fn watch_all(&mut self, directories: &[PathBuf]) {
        for directory in directories {
            if self.watched.contains_key(directory) {
                continue;
            }
            let flags = AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_ONLYDIR;
            match self
                .inotify
                .get_ref()
                .0
                .add_watch(directory.as_path(), flags)
            {
                Ok(descriptor) => {
                    debug!(directory = %directory.display(), "watching for workload cgroups");
                    self.watched.insert(directory.clone(), descriptor);
                }
                // Not there yet: the periodic check tries again.
                Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                Err(error) => {
                    debug!(directory = %directory.display(), %error, "cannot watch for workload cgroups");
                }
            }
        }
    }

    /// Waits for events and reads them all; forgets the watches the kernel dropped.
    async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                            self.watched.retain(|_, descriptor| *descriptor != event.wd);
                        }
                    }
                    return Ok(());
                }
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(error) => return Err(error.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use super::*;

    /// Cgroups by path, and the ids enrolled, as the kernel would keep them.
    #[derive(Default)]
    struct FakeKernel {
        cgroups: Mutex<HashMap<PathBuf, u64>>,
        enrolled: Mutex<Vec<u64>>,
        refuse: Mutex<Option<PathBuf>>,
    }

    impl FakeKernel {
        fn create(&self, path: &str, id: u64) {
            self.cgroups.lock().unwrap().insert(PathBuf::from(path), id);
        }

        fn remove(&self, path: &str) {
            self.cgroups.lock().unwrap().remove(Path::new(path));
        }

        fn enrolled(&self) -> Vec<u64> {
            let mut ids = self.enrolled.lock().unwrap().clone();
            ids.sort_unstable();
            ids
        }
    }

    impl Enrolment for FakeKernel {
        fn current_id(&self, path: &Path) -> Result<Option<u64>, DatapathError> {
            Ok(self.cgroups.lock().unwrap().get(path).copied())
        }

        fn enrol(&self, path: &Path) -> Result<u64, DatapathError> {
            if self.refuse.lock().unwrap().as_deref() == Some(path) {
                return Err(DatapathError::InvalidCgroupPath {
                    path: path.to_path_buf(),
                    reason: "outside the attach cgroup".into(),
                });
            }
            let id = self
                .current_id(path)?
                .ok_or(DatapathError::CgroupNotFound {
                    path: path.to_path_buf(),
                })?;
            self.enrolled.lock().unwrap().push(id);
            Ok(id)
        }

        fn unenrol_id(&self, id: u64) -> Result<(), DatapathError> {
            self.enrolled
                .lock()
                .unwrap()
                .retain(|enrolled| *enrolled != id);
            Ok(())
        }

        fn directory(&self, path: &Path) -> Result<PathBuf, DatapathError> {
            crate::datapath::cgroup::cgroup_dir(Path::new("/sys/fs/cgroup"), path)
        }
    }

    fn keeper(
        kernel: &Arc<FakeKernel>,
        names: &Arc<Mutex<Vec<(u64, String)>>>,
    ) -> WorkloadKeeper<FakeKernel> {
        let learnt = Arc::clone(names);
        WorkloadKeeper::new(
            Arc::clone(kernel),
            [
                ConfiguredWorkload {
                    name: "planner".into(),
                    cgroup: "/agents.slice/planner.service".into(),
                },
                ConfiguredWorkload {
                    name: "tools".into(),
                    cgroup: "/agents.slice/tools.service".into(),
                },
            ],
            move |id, name| learnt.lock().unwrap().push((id, name.to_owned())),
        )
    }

    #[test]
    fn a_recreated_cgroup_is_enrolled_under_its_new_id_and_the_old_one_is_dropped() {
        let kernel = Arc::new(FakeKernel::default());
        let names = Arc::new(Mutex::new(Vec::new()));
        kernel.create("/agents.slice/planner.service", 10);
        let mut keeper = keeper(&kernel, &names);

        // At start: the one that exists is enrolled, the other waits.
        assert_eq!(
            keeper.check_all(),
            [Change::Enrolled(10), Change::Unchanged]
        );
        assert_eq!(kernel.enrolled(), [10]);
        let sample = keeper.status().sample();
        assert_eq!((sample.enrolled, sample.failing, sample.missing), (1, 0, 1));
        assert_eq!(keeper.check_all(), [Change::Unchanged, Change::Unchanged]);

        // The service restarts: its cgroup goes, then comes back under another id.
        kernel.remove("/agents.slice/planner.service");
        assert_eq!(keeper.check_all(), [Change::Removed(10), Change::Unchanged]);
        assert_eq!(kernel.enrolled(), Vec::<u64>::new());
        kernel.create("/agents.slice/planner.service", 11);
        assert_eq!(
            keeper.check_all(),
            [Change::Enrolled(11), Change::Unchanged]
        );

        // Removed and created again between two checks: one step from the old id to the new.
        kernel.create("/agents.slice/planner.service", 12);
        assert_eq!(
            keeper.check_all(),
            [Change::Replaced { old: 11, new: 12 }, Change::Unchanged]
        );
        assert_eq!(kernel.enrolled(), [12]);

        // The late workload appears.
        kernel.create("/agents.slice/tools.service", 20);
        assert_eq!(
            keeper.check_all(),
            [Change::Unchanged, Change::Enrolled(20)]
        );
        assert_eq!(kernel.enrolled(), [12, 20]);
        assert_eq!(
            keeper.status().sample(),
            WorkloadKeeperSample {
                enrolled: 2,
                missing: 0,
                failing: 0,
                enrolments: 4,
                removals: 2,
            }
        );
        assert_eq!(
            *names.lock().unwrap(),
            [
                (10, "planner".to_owned()),
                (11, "planner".to_owned()),
                (12, "planner".to_owned()),
                (20, "tools".to_owned()),
            ]
        );
    }

    #[test]
    fn a_workload_that_cannot_be_enrolled_is_tried_again_and_does_not_stop_the_others() {
        let kernel = Arc::new(FakeKernel::default());
        let names = Arc::new(Mutex::new(Vec::new()));
        kernel.create("/agents.slice/planner.service", 10);
        kernel.create("/agents.slice/tools.service", 20);
        *kernel.refuse.lock().unwrap() = Some("/agents.slice/planner.service".into());
        let mut keeper = keeper(&kernel, &names);

        assert_eq!(
            keeper.check_all(),
            [Change::Unchanged, Change::Enrolled(20)]
        );
        assert_eq!(keeper.check_all(), [Change::Unchanged, Change::Unchanged]);
        assert_eq!(kernel.enrolled(), [20]);
        let sample = keeper.status().sample();
        assert_eq!((sample.enrolled, sample.failing, sample.missing), (1, 1, 0));

        *kernel.refuse.lock().unwrap() = None;
        assert_eq!(
            keeper.check_all(),
            [Change::Enrolled(10), Change::Unchanged]
        );
        assert_eq!(kernel.enrolled(), [10, 20]);
    }
}
