//! Where the accounting programs (`cgroup_skb` ingress and egress) are attached: to each
//! enrolled cgroup that has no enrolled ancestor, not to the attach cgroup. Packets of
//! processes outside the mesh (the agent's own, and every pod on a node that is not enrolled)
//! then never run them. The programs are pinned under `<pin dir>/programs` so an operator
//! command can attach them too, and each attachment is a link pinned as
//! `<pin dir>/accounting/<cgroup id>_<ingress|egress>` (bpffs refuses dots in names), so
//! attachments outlive the agent and a restart swaps the programs behind them in place.
//!
//! The invariant "one pair of links on each outermost enrolled cgroup, none elsewhere" is kept
//! by re-deriving the links of a subtree after every change inside it: enrolling or
//! unenrolling a cgroup can only change which cgroups of its own subtree are outermost. A
//! nested enrolment needs no links of its own: the programs of its enrolled ancestor run for
//! its packets and count them for the deepest enrolled cgroup, as before.

use std::{
    collections::BTreeSet,
    fs,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use mesh_common::program_names;
use tracing::{debug, info, warn};

use super::{DatapathError, maps::DatapathMaps, sys, sys::AttachType};

/// The accounting programs with the suffix of their link pins and how they attach.
const ACCOUNTING_PROGRAMS: [(&str, &str, AttachType); 2] = [
    (
        program_names::SKB_INGRESS,
        "ingress",
        AttachType::CgroupInetIngress,
    ),
    (
        program_names::SKB_EGRESS,
        "egress",
        AttachType::CgroupInetEgress,
    ),
];

/// Directories below the pin folder.
pub const PROGRAMS_DIR: &str = "programs";
pub const LINKS_DIR: &str = "accounting";

/// The accounting programs and their per-workload links.
#[derive(Debug)]
pub struct Accounting {
    /// `<pin dir>/accounting`, also locked while links change.
    links_dir: PathBuf,
    programs: Programs,
}

/// Where the programs come from.
#[derive(Debug)]
enum Programs {
    /// Loaded by this agent, in the order of [`ACCOUNTING_PROGRAMS`].
    Loaded([OwnedFd; 2]),
    /// Pinned by the running agent in this folder, opened only when a link is made (so
    /// operator commands that attach nothing work against any agent).
    Pinned(PathBuf),
}

impl Accounting {
    /// Pins freshly loaded programs (replacing the pins of an earlier agent) and moves every
    /// existing link onto them.
    pub fn install(
        pin_dir: &Path,
        ingress: OwnedFd,
        egress: OwnedFd,
    ) -> Result<Self, DatapathError> {
        let programs_dir = pin_dir.join(PROGRAMS_DIR);
        let links_dir = pin_dir.join(LINKS_DIR);
        super::create_dir(&programs_dir)?;
        super::create_dir(&links_dir)?;
        for ((name, _, _), program) in ACCOUNTING_PROGRAMS.iter().zip([&ingress, &egress]) {
            let pin = programs_dir.join(name);
            super::remove_pin(&pin)?;
            sys::obj_pin(program.as_fd(), &pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        let accounting = Self {
            links_dir,
            programs: Programs::Loaded([ingress, egress]),
        };
        let _lock = accounting.lock()?;
        for link in accounting.links()? {
            let program = accounting.program(link.kind)?;
            let updated = sys::obj_get(&link.pin)
                .and_then(|fd| sys::link_update(fd.as_fd(), program.as_fd()));
            if let Err(error) = updated {
                // Typically the cgroup was removed while no agent ran (the kernel detached the
                // link then): the pin goes, and reconciling attaches again where needed.
                warn!(
                    pin = %link.pin.display(),
                    cgroup_id = link.cgroup_id,
                    %error,
                    "accounting link could not take the new program; removing it"
                );
                super::remove_link(&link.pin)?;
            }
        }
        Ok(accounting)
    }

    /// The accounting state a running (or earlier) agent pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Self {
        Self {
            links_dir: pin_dir.join(LINKS_DIR),
            programs: Programs::Pinned(pin_dir.join(PROGRAMS_DIR)),
        }
    }

    /// The program at `kind` (an index into [`ACCOUNTING_PROGRAMS`]).
    fn program(&self, kind: usize) -> Result<OwnedFd, DatapathError> {
        let name = ACCOUNTING_PROGRAMS[kind].0;
        match &self.programs {
            Programs::Loaded(programs) => {
                programs[kind]
                    .try_clone()
                    .map_err(|source| DatapathError::Io {
                        what: format!("duplicating fd of {name}"),
                        source,
                    })
            }
            Programs::Pinned(dir) => {
                let pin = dir.join(name);
                sys::obj_get(&pin).map_err(|source| DatapathError::Io {
                    what: format!("opening {} (pinned by the agent)", pin.display()),
                    source,
                })
            }
        }
    }

    /// Serialises link changes between the agent and operator commands: every method that
    /// changes links takes the guard.
    pub fn lock(&self) -> Result<LinksLock, DatapathError> {
        let dir = fs::File::open(&self.links_dir).map_err(|source| DatapathError::Io {
            what: format!("opening {}", self.links_dir.display()),
            source,
        })?;
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map(|flock| LinksLock { _flock: flock })
            .map_err(|(_, errno)| DatapathError::Io {
                what: format!("locking {}", self.links_dir.display()),
                source: errno.into(),
            })
    }

    /// Re-derives the links of the cgroup at `dir` and its subtree after an enrolment change
    /// there: links on the outermost enrolled cgroups, none on the others. `covered` says
    /// whether an ancestor of `dir` is enrolled.
    pub fn reconcile_subtree(
        &self,
        lock: &LinksLock,
        maps: &DatapathMaps,
        dir: &Path,
        covered: bool,
    ) -> Result<(), DatapathError> {
        self.reconcile(lock, maps, dir, covered, Scope::Subtree)
    }

    /// Re-derives every link below `attach_dir`, and removes links of cgroups that are gone:
    /// at start, and after an unenrolment by id.
    pub fn reconcile_all(
        &self,
        lock: &LinksLock,
        maps: &DatapathMaps,
        attach_dir: &Path,
    ) -> Result<(), DatapathError> {
        self.reconcile(lock, maps, attach_dir, false, Scope::Everything)
    }

    fn reconcile(
        &self,
        lock: &LinksLock,
        maps: &DatapathMaps,
        dir: &Path,
        covered: bool,
        scope: Scope,
    ) -> Result<(), DatapathError> {
        let mut plan = Plan::default();
        walk(maps, dir, covered, &mut plan)?;
        let wanted: BTreeSet<u64> = plan.outermost.iter().map(|(id, _)| *id).collect();
        for id in self.linked_ids()? {
            let in_scope = scope == Scope::Everything || plan.seen.contains(&id);
            if in_scope && !wanted.contains(&id) {
                self.remove_links(lock, id)?;
            }
        }
        for (id, dir) in &plan.outermost {
            self.add_links(*id, dir)?;
        }
        Ok(())
    }

    /// Whether any enrolled cgroup lies strictly above `dir`, up to the cgroup2 mount.
    pub fn has_enrolled_ancestor(
        maps: &DatapathMaps,
        mount: &Path,
        dir: &Path,
    ) -> Result<bool, DatapathError> {
        let mut ancestor = dir.parent();
        while let Some(current) = ancestor {
            if !current.starts_with(mount) {
                break;
            }
            if maps.is_enrolled(cgroup_id(current)?)? {
                return Ok(true);
            }
            if current == mount {
                break;
            }
            ancestor = current.parent();
        }
        Ok(false)
    }

    /// Removes the links of one cgroup (its directory may be gone).
    pub fn remove_links(&self, _lock: &LinksLock, cgroup_id: u64) -> Result<(), DatapathError> {
        for (_, suffix, _) in ACCOUNTING_PROGRAMS {
            super::remove_link(&self.links_dir.join(format!("{cgroup_id}_{suffix}")))?;
        }
        debug!(cgroup_id, "accounting programs detached");
        Ok(())
    }

    /// Whether some enrolled cgroup has no links: a nested enrolment (its ancestor's links
    /// count it) or one whose ancestor was just unenrolled.
    pub fn unlinked_enrolments(&self, maps: &DatapathMaps) -> Result<bool, DatapathError> {
        let linked = self.linked_ids()?;
        Ok(maps.enrolled()?.iter().any(|id| !linked.contains(id)))
    }

    /// Attaches whichever of the pair is missing on a cgroup.
    fn add_links(&self, cgroup_id: u64, dir: &Path) -> Result<(), DatapathError> {
        let missing: Vec<_> = ACCOUNTING_PROGRAMS
            .iter()
            .enumerate()
            .map(|(kind, &(name, suffix, attach_type))| {
                let pin = self.links_dir.join(format!("{cgroup_id}_{suffix}"));
                (kind, name, attach_type, pin)
            })
            .filter(|(_, _, _, pin)| !pin.exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let cgroup = fs::File::open(dir).map_err(|source| DatapathError::Io {
            what: format!("opening cgroup {}", dir.display()),
            source,
        })?;
        for (kind, name, attach_type, pin) in missing {
            let program = self.program(kind)?;
            let link = sys::link_create(program.as_fd(), cgroup.as_fd(), attach_type)
                .map_err(|source| DatapathError::Attach { name, source })?;
            sys::obj_pin(link.as_fd(), &pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        info!(cgroup = %dir.display(), cgroup_id, "accounting programs attached");
        Ok(())
    }

    /// The cgroup ids that have at least one link pinned.
    fn linked_ids(&self) -> Result<BTreeSet<u64>, DatapathError> {
        Ok(self
            .links()?
            .into_iter()
            .map(|link| link.cgroup_id)
            .collect())
    }

    fn links(&self) -> Result<Vec<PinnedLink>, DatapathError> {
        let mut links = Vec::new();
        for entry in super::read_dir(&self.links_dir)? {
            let name = entry.file_name();
            match parse_link_pin(&name.to_string_lossy()) {
                Some((cgroup_id, kind)) => links.push(PinnedLink {
                    pin: entry.path(),
                    cgroup_id,
                    kind,
                }),
                None => {
                    warn!(pin = %entry.path().display(), "unexpected file among accounting links")
                }
            }
        }
        Ok(links)
    }
}

/// Held while links change (see [`Accounting::lock`]).
#[derive(Debug)]
pub struct LinksLock {
    /// Released when dropped.
    _flock: nix::fcntl::Flock<fs::File>,
}

/// One pinned accounting link.
struct PinnedLink {
    pin: PathBuf,
    cgroup_id: u64,
    /// Index into [`ACCOUNTING_PROGRAMS`].
    kind: usize,
}

/// `<cgroup id>_<ingress|egress>` -> (cgroup id, index into [`ACCOUNTING_PROGRAMS`]).
fn parse_link_pin(name: &str) -> Option<(u64, usize)> {
    let (id, suffix) = name.split_once('_')?;
    let kind = ACCOUNTING_PROGRAMS
        .iter()
        .position(|(_, known, _)| *known == suffix)?;
    Some((id.parse().ok()?, kind))
}

/// Which links a reconciliation may remove.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Those of cgroups in the walked subtree.
    Subtree,
    /// Every link: the walk covered the whole attach cgroup.
    Everything,
}

/// What a walk of a subtree found.
#[derive(Default)]
struct Plan {
    /// Every cgroup id in the subtree.
    seen: BTreeSet<u64>,
    /// The enrolled cgroups with no enrolled ancestor, and their directories.
    outermost: Vec<(u64, PathBuf)>,
}

fn walk(
    maps: &DatapathMaps,
    dir: &Path,
    covered: bool,
    plan: &mut Plan,
) -> Result<(), DatapathError> {
    // Depth-first with an explicit stack: cgroup trees can be deep.
    let mut stack = vec![(dir.to_path_buf(), covered)];
    while let Some((dir, covered)) = stack.pop() {
        let id = match fs::metadata(&dir) {
            Ok(metadata) => metadata.ino(),
            // Removed while we walked: nothing to attach there.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DatapathError::Io {
                    what: format!("reading cgroup {}", dir.display()),
                    source,
                });
            }
        };
        plan.seen.insert(id);
        let enrolled = maps.is_enrolled(id)?;
        if enrolled && !covered {
            plan.outermost.push((id, dir.clone()));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push((entry.path(), covered || enrolled));
            }
        }
    }
    Ok(())
}

fn cgroup_id(dir: &Path) -> Result<u64, DatapathError> {
    fs::metadata(dir)
        .map(|metadata| metadata.ino())
        .map_err(|source| DatapathError::Io {
            what: format!("reading cgroup {}", dir.display()),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_the_cgroup_and_the_direction() {
        assert_eq!(parse_link_pin("4242_ingress"), Some((4242, 0)));
        assert_eq!(parse_link_pin("7_egress"), Some((7, 1)));
        assert_eq!(parse_link_pin("7_sideways"), None);
        assert_eq!(parse_link_pin("x_ingress"), None);
        assert_eq!(parse_link_pin("ingress"), None);
    }
}
