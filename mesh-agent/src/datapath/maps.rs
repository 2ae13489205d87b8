//! Typed handles on the datapath's maps, opened either from a freshly loaded object or from
//! their pins (so CLI commands work whether or not the agent runs).

use std::{
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, RawFd},
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use mesh_common::{
    ConnInfo, DatapathConfig, DatapathEvent, Endpoint, SplicePeer, TrafficCounters, WorkloadInfo,
    map_names,
};

use super::{DatapathError, sys};

/// One of the agent's sockets handed to the kernel: its cookie (`SO_COOKIE`) and descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceSocket {
    pub cookie: u64,
    pub fd: RawFd,
}

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
    splice: Mutex<SockHash<MapData, u64>>,
    splice_targets: Mutex<SockHash<MapData, u64>>,
    splice_peers: Mutex<HashMap<MapData, u64, SplicePeer>>,
    splice_limits: Mutex<HashMap<MapData, u64, u64>>,
    splice_pass: Mutex<HashMap<MapData, u64, u8>>,
    /// The wake-up ring, until the agent's reader takes it.
    splice_wake: Mutex<Option<RingBuf<MapData>>>,
    counters: Mutex<PerCpuHashMap<MapData, u64, TrafficCounters>>,
    events: PerCpuArray<MapData, u64>,
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
            splice: Mutex::new(typed(map_names::SPLICE, take(map_names::SPLICE)?)?),
            splice_targets: Mutex::new(typed(
                map_names::SPLICE_TARGETS,
                take(map_names::SPLICE_TARGETS)?,
            )?),
            splice_peers: Mutex::new(typed(
                map_names::SPLICE_PEERS,
                take(map_names::SPLICE_PEERS)?,
            )?),
            splice_limits: Mutex::new(typed(
                map_names::SPLICE_LIMITS,
                take(map_names::SPLICE_LIMITS)?,
            )?),
            splice_pass: Mutex::new(typed(
                map_names::SPLICE_PASS,
                take(map_names::SPLICE_PASS)?,
            )?),
            splice_wake: Mutex::new(Some(typed(
                map_names::SPLICE_WAKE,
                take(map_names::SPLICE_WAKE)?,
            )?)),
            counters: Mutex::new(typed(map_names::COUNTERS, take(map_names::COUNTERS)?)?),
            events: typed(map_names::EVENTS, take(map_names::EVENTS)?)?,
        })
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

    /// Empties the splice maps (at start-up: whatever is there belonged to an earlier agent).
    pub fn clear_splice(&self) -> Result<(), DatapathError> {
        for (name, map) in [
            (map_names::SPLICE, &self.splice),
            (map_names::SPLICE_TARGETS, &self.splice_targets),
        ] {
            let mut map = locked(map);
            let keys: Vec<_> = map.keys().filter_map(Result::ok).collect();
            for key in keys {
                optional(map.remove(&key), name)?;
            }
        }
        for (name, map) in [
            (map_names::SPLICE_PEERS, &self.splice_peers_keys()),
            (map_names::SPLICE_LIMITS, &self.splice_limit_keys()),
            (map_names::SPLICE_PASS, &self.splice_pass_keys()),
        ] {
            for key in map {
                self.forget(name, *key)?;
            }
        }
        Ok(())
    }

    fn splice_peers_keys(&self) -> Vec<u64> {
        locked(&self.splice_peers)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    fn splice_pass_keys(&self) -> Vec<u64> {
        locked(&self.splice_pass)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    fn splice_limit_keys(&self) -> Vec<u64> {
        locked(&self.splice_limits)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Removes a cookie's entry from the peer or limit map (absent is fine).
    fn forget(&self, name: &'static str, cookie: u64) -> Result<(), DatapathError> {
        let removed = match name {
            map_names::SPLICE_PEERS => locked(&self.splice_peers).remove(&cookie),
            map_names::SPLICE_PASS => locked(&self.splice_pass).remove(&cookie),
            _ => locked(&self.splice_limits).remove(&cookie),
        };
        optional(removed, name).map(drop)
    }

    /// Sets the redirected-byte count at which the verdict wakes the agent for a socket.
    pub fn splice_set_limit(&self, cookie: u64, limit: u64) -> Result<(), DatapathError> {
        locked(&self.splice_limits)
            .insert(cookie, limit, 0)
            .map_err(map_error(map_names::SPLICE_LIMITS))
    }

    /// Takes the wake-up ring (once: for the agent's reader).
    pub fn take_splice_wake(&self) -> Option<RingBuf<MapData>> {
        locked(&self.splice_wake).take()
    }

    /// Attaches the `sk_skb` verdict program to the splice map (replacing any earlier one).
    pub fn attach_sk_skb(&self, prog: BorrowedFd<'_>) -> Result<(), DatapathError> {
        let splice = locked(&self.splice);
        sys::prog_attach(
            prog,
            splice.fd().as_fd(),
            sys::AttachType::SkSkbStreamVerdict,
        )
        .map_err(|source| DatapathError::Attach {
            name: mesh_common::program_names::SK_SKB_VERDICT,
            source,
        })
    }

    /// Prepares a connection's two sockets for the kernel path: each becomes a redirect target
    /// and learns its peer. Nothing is redirected until a socket joins the verdict map
    /// ([`Self::splice_resume`]), so a redirect never misses its target. On error, whatever
    /// was added is removed again.
    pub fn splice_prepare(
        &self,
        pair: [SpliceSocket; 2],
        workload_cgroup: u64,
    ) -> Result<(), DatapathError> {
        let prepared = self.splice_prepare_all(pair, workload_cgroup);
        if prepared.is_err() {
            let _ = self.splice_remove(pair.map(|socket| socket.cookie));
        }
        prepared
    }

    fn splice_prepare_all(
        &self,
        pair: [SpliceSocket; 2],
        workload_cgroup: u64,
    ) -> Result<(), DatapathError> {
        {
            let mut targets = locked(&self.splice_targets);
            for socket in pair {
                targets
                    .insert(socket.cookie, socket.fd, 0)
                    .map_err(map_error(map_names::SPLICE_TARGETS))?;
            }
        }
        let mut peers = locked(&self.splice_peers);
        let [first, second] = pair;
        for (socket, peer) in [(first, second), (second, first)] {
            let entry = SplicePeer {
                peer_cookie: peer.cookie,
                workload_cgroup,
                redirected: 0,
            };
            peers
                .insert(socket.cookie, entry, 0)
                .map_err(map_error(map_names::SPLICE_PEERS))?;
        }
        Ok(())
    }

    /// Takes a direction back from the kernel: from the next skb on, the verdict leaves the
    /// socket's received bytes on the socket (for the agent to read) instead of redirecting
    /// them.
    pub fn splice_take_back(&self, cookie: u64) -> Result<(), DatapathError> {
        locked(&self.splice_pass)
            .insert(cookie, 1, 0)
            .map_err(map_error(map_names::SPLICE_PASS))
    }

    /// Puts a prepared socket into the verdict map: the kernel carries its received bytes to
    /// its peer from now on.
    pub fn splice_resume(&self, socket: SpliceSocket) -> Result<(), DatapathError> {
        locked(&self.splice)
            .insert(socket.cookie, socket.fd, 0)
            .map_err(map_error(map_names::SPLICE))
    }

    /// Bytes the kernel redirected from a spliced socket to its peer so far.
    pub fn splice_redirected(&self, cookie: u64) -> Result<Option<u64>, DatapathError> {
        Ok(optional(
            locked(&self.splice_peers).get(&cookie, 0),
            map_names::SPLICE_PEERS,
        )?
        .map(|entry| entry.redirected))
    }

    /// Takes a connection's sockets out of the kernel path: the verdict first, then the peer
    /// records and the redirect targets. Missing entries are fine (a closed socket leaves the
    /// socket maps by itself).
    pub fn splice_remove(&self, cookies: [u64; 2]) -> Result<(), DatapathError> {
        for cookie in cookies {
            optional(locked(&self.splice).remove(&cookie), map_names::SPLICE)?;
        }
        for cookie in cookies {
            self.forget(map_names::SPLICE_PEERS, cookie)?;
            self.forget(map_names::SPLICE_LIMITS, cookie)?;
            self.forget(map_names::SPLICE_PASS, cookie)?;
        }
        for cookie in cookies {
            optional(
                locked(&self.splice_targets).remove(&cookie),
                map_names::SPLICE_TARGETS,
            )?;
        }
        Ok(())
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
            .map_err(map_error(map_names::WORKLOADS))
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
        Ok(removed)
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
