//! Typed handles on the datapath's maps, opened either from a freshly loaded object or from
//! their pins (so CLI commands work whether or not the agent runs).

use std::{
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use mesh_common::{
    ConnInfo, DatapathConfig, DatapathEvent, Endpoint, RedirectState, SockTuple, TrafficCounters,
    WorkloadInfo, map_names,
};

use super::{DatapathError, sys};

/// A workload's counters summed over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadCounters {
    pub cgroup_id: u64,
    pub enrolled: bool,
    pub totals: TrafficCounters,
}

/// The maps the agent reads and writes.
pub struct DatapathMaps {
    config: Mutex<Array<MapData, DatapathConfig>>,
    workloads: Mutex<HashMap<MapData, u64, WorkloadInfo>>,
    exclude_v4: Mutex<LpmTrie<MapData, [u8; 4], u8>>,
    exclude_v6: Mutex<LpmTrie<MapData, [u8; 16], u8>>,
    exclude_ports: Mutex<HashMap<MapData, u16, u8>>,
    conns: HashMap<MapData, Endpoint, ConnInfo>,
    socks: Mutex<SockHash<MapData, SockTuple>>,
    redirect_allowance: Mutex<HashMap<MapData, SockTuple, u64>>,
    redirect_state: HashMap<MapData, SockTuple, RedirectState>,
    counters: Mutex<PerCpuHashMap<MapData, u64, TrafficCounters>>,
    events: PerCpuArray<MapData, u64>,
    /// Absent only in a pin folder an older agent made (its programs keep no verdicts).
    enrol_generation: Option<Mutex<Array<MapData, u64>>>,
}

impl std::fmt::Debug for DatapathMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathMaps").finish_non_exhaustive()
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a map handle cannot leave the kernel map half-written (each call is
    // one syscall), so a poisoned lock is still safe to use.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    name: &'static str,
    map: Map,
) -> Result<T, DatapathError> {
    T::try_from(map).map_err(|source| DatapathError::PinnedMapMismatch {
        name,
        source: Box::new(source),
    })
}

/// Treats "no such key" as absence rather than failure.
fn optional<T>(
    result: Result<T, MapError>,
    name: &'static str,
) -> Result<Option<T>, DatapathError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(None)
        }
        Err(source) => Err(map_error(name)(source)),
    }
}

impl DatapathMaps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or(DatapathError::MissingProgram { name })
        })
    }

    /// Opens the maps pinned under `pin_dir` by a running or previous agent.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::build(|name| {
            let data =
                MapData::from_pin(pin_dir.join(name)).map_err(|source| DatapathError::Map {
                    name,
                    source: Box::new(source),
                })?;
            Map::from_map_data(data).map_err(map_error(name))
        })
    }

    fn build(
        mut take: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            config: Mutex::new(typed(map_names::CONFIG, take(map_names::CONFIG)?)?),
            workloads: Mutex::new(typed(map_names::WORKLOADS, take(map_names::WORKLOADS)?)?),
            exclude_v4: Mutex::new(typed(map_names::EXCLUDE_V4, take(map_names::EXCLUDE_V4)?)?),
            exclude_v6: Mutex::new(typed(map_names::EXCLUDE_V6, take(map_names::EXCLUDE_V6)?)?),
            exclude_ports: Mutex::new(typed(
                map_names::EXCLUDE_PORTS,
                take(map_names::EXCLUDE_PORTS)?,
            )?),
            conns: typed(map_names::CONNS, take(map_names::CONNS)?)?,
            socks: Mutex::new(typed(map_names::SOCKS, take(map_names::SOCKS)?)?),
            redirect_allowance: Mutex::new(typed(
                map_names::REDIRECT_ALLOWANCE,
                take(map_names::REDIRECT_ALLOWANCE)?,
            )?),
            redirect_state: typed(map_names::REDIRECT_STATE, take(map_names::REDIRECT_STATE)?)?,
            counters: Mutex::new(typed(map_names::COUNTERS, take(map_names::COUNTERS)?)?),
            events: typed(map_names::EVENTS, take(map_names::EVENTS)?)?,
            enrol_generation: match take(map_names::ENROL_GENERATION) {
                Ok(map) => Some(Mutex::new(typed(map_names::ENROL_GENERATION, map)?)),
                Err(_) => None,
            },
        })
    }

    /// Moves the enrolment generation on, after a change to the enrolled workloads: the
    /// accounting programs' remembered cgroup verdicts stop counting and are worked out again.
    pub fn bump_enrol_generation(&self) -> Result<(), DatapathError> {
        let Some(generation) = &self.enrol_generation else {
            return Ok(());
        };
        let mut generation = locked(generation);
        let current = generation
            .get(&0, 0)
            .map_err(map_error(map_names::ENROL_GENERATION))?;
        generation
            .set(0, current.wrapping_add(1), 0)
            .map_err(map_error(map_names::ENROL_GENERATION))
    }

    /// Writes the settings the programs read; capture follows its flags from the next connect.
    pub fn write_config(&self, config: &DatapathConfig) -> Result<(), DatapathError> {
        locked(&self.config)
            .set(0, config, 0)
            .map_err(map_error(map_names::CONFIG))
    }

    /// The settings currently in force.
    pub fn config(&self) -> Result<DatapathConfig, DatapathError> {
        locked(&self.config)
            .get(&0, 0)
            .map_err(map_error(map_names::CONFIG))
    }

    /// Replaces the excluded destinations with the given ones.
    pub fn write_exclusions(&self, cidrs: &[IpNet], ports: &[u16]) -> Result<(), DatapathError> {
        {
            let mut v4 = locked(&self.exclude_v4);
            let stale: Vec<_> = v4.keys().filter_map(Result::ok).collect();
            for key in stale {
                v4.remove(&key).map_err(map_error(map_names::EXCLUDE_V4))?;
            }
            let mut v6 = locked(&self.exclude_v6);
            let stale: Vec<_> = v6.keys().filter_map(Result::ok).collect();
            for key in stale {
                v6.remove(&key).map_err(map_error(map_names::EXCLUDE_V6))?;
            }
            for cidr in cidrs {
                let prefix = u32::from(cidr.prefix_len());
                match cidr.addr() {
                    IpAddr::V4(addr) => v4
                        .insert(&Key::new(prefix, addr.octets()), 1, 0)
                        .map_err(map_error(map_names::EXCLUDE_V4))?,
                    IpAddr::V6(addr) => v6
                        .insert(&Key::new(prefix, addr.octets()), 1, 0)
                        .map_err(map_error(map_names::EXCLUDE_V6))?,
                }
            }
        }
        let mut port_map = locked(&self.exclude_ports);
        let stale: Vec<_> = port_map.keys().filter_map(Result::ok).collect();
        for port in stale {
            port_map
                .remove(&port)
                .map_err(map_error(map_names::EXCLUDE_PORTS))?;
        }
        for port in ports {
            port_map
                .insert(port, 1, 0)
                .map_err(map_error(map_names::EXCLUDE_PORTS))?;
        }
        Ok(())
    }

    /// Empties the socket map (acceleration turned off).
    pub fn clear_sockets(&self) -> Result<(), DatapathError> {
        let mut socks = locked(&self.socks);
        let keys: Vec<_> = socks.keys().filter_map(Result::ok).collect();
        for key in keys {
            match socks.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(map_names::SOCKS)(source)),
            }
        }
        Ok(())
    }

    /// Sets the redirected-byte count up to which `sk_msg` may redirect a socket's messages.
    pub fn set_redirect_allowance(
        &self,
        socket: &SockTuple,
        bytes: u64,
    ) -> Result<(), DatapathError> {
        locked(&self.redirect_allowance)
            .insert(socket, bytes, 0)
            .map_err(map_error(map_names::REDIRECT_ALLOWANCE))
    }

    /// The redirect bookkeeping of a socket in `MESH_SOCKS`, if it has any.
    pub fn redirect_state(
        &self,
        socket: &SockTuple,
    ) -> Result<Option<RedirectState>, DatapathError> {
        optional(
            self.redirect_state.get(socket, 0),
            map_names::REDIRECT_STATE,
        )
    }

    /// Attaches the `sk_msg` program to the socket map (replacing any earlier one).
    pub fn attach_sk_msg(&self, prog: BorrowedFd<'_>) -> Result<(), DatapathError> {
        let socks = locked(&self.socks);
        sys::prog_attach(prog, socks.fd().as_fd(), sys::AttachType::SkMsgVerdict).map_err(
            |source| DatapathError::Attach {
                name: mesh_common::program_names::SK_MSG,
                source,
            },
        )
    }

    /// Adds a cgroup to the enrolled workloads.
    pub fn enrol(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        // The low bits of the cgroup id make a stable workload number for the kernel side.
        let info = WorkloadInfo {
            workload_id: cgroup_id as u32,
            flags: 0,
        };
        locked(&self.workloads)
            .insert(cgroup_id, info, 0)
            .map_err(map_error(map_names::WORKLOADS))?;
        self.bump_enrol_generation()
    }

    /// Removes a cgroup from the enrolled workloads and drops its counters. Returns whether it
    /// was enrolled.
    pub fn unenrol(&self, cgroup_id: u64) -> Result<bool, DatapathError> {
        let removed = optional(
            locked(&self.workloads).remove(&cgroup_id),
            map_names::WORKLOADS,
        )?
        .is_some();
        optional(
            locked(&self.counters).remove(&cgroup_id),
            map_names::COUNTERS,
        )?;
        self.bump_enrol_generation()?;
        Ok(removed)
    }

    /// Whether a cgroup id is enrolled itself (not through an ancestor).
    pub fn is_enrolled(&self, cgroup_id: u64) -> Result<bool, DatapathError> {
        Ok(optional(
            locked(&self.workloads).get(&cgroup_id, 0),
            map_names::WORKLOADS,
        )?
        .is_some())
    }

    /// The enrolled cgroup ids.
    pub fn enrolled(&self) -> Result<Vec<u64>, DatapathError> {
        locked(&self.workloads)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(map_names::WORKLOADS))
    }

    /// The captured connection whose client end is `client`, if the kernel recorded one.
    pub fn connection(&self, client: &Endpoint) -> Result<Option<ConnInfo>, DatapathError> {
        optional(self.conns.get(client, 0), map_names::CONNS)
    }

    /// Per-workload counters, summed over CPUs, sorted by cgroup id.
    pub fn counters(&self) -> Result<Vec<WorkloadCounters>, DatapathError> {
        let enrolled = self.enrolled()?;
        let counters = locked(&self.counters);
        let mut result = Vec::new();
        for entry in counters.iter() {
            let (cgroup_id, per_cpu) = entry.map_err(map_error(map_names::COUNTERS))?;
            let mut totals = TrafficCounters::default();
            for value in per_cpu.iter() {
                totals.add(value);
            }
            result.push(WorkloadCounters {
                cgroup_id,
                enrolled: enrolled.contains(&cgroup_id),
                totals,
            });
        }
        result.sort_by_key(|entry| entry.cgroup_id);
        Ok(result)
    }

    /// The counters of one workload (zero if it has seen no traffic yet).
    pub fn counters_of(&self, cgroup_id: u64) -> Result<TrafficCounters, DatapathError> {
        let per_cpu = optional(
            locked(&self.counters).get(&cgroup_id, 0),
            map_names::COUNTERS,
        )?;
        let mut totals = TrafficCounters::default();
        if let Some(per_cpu) = per_cpu {
            for value in per_cpu.iter() {
                totals.add(value);
            }
        }
        Ok(totals)
    }

    /// Datapath event counts, summed over CPUs, in [`DatapathEvent::ALL`] order.
    pub fn events(&self) -> Result<Vec<(DatapathEvent, u64)>, DatapathError> {
        DatapathEvent::ALL
            .iter()
            .map(|event| {
                let per_cpu = self
                    .events
                    .get(&(*event as u32), 0)
                    .map_err(map_error(map_names::EVENTS))?;
                Ok((
                    *event,
                    per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
                ))
            })
            .collect()
    }
}
