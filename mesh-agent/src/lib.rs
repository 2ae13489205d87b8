//! Agent Mesh node agent: the library behind the `mesh-agent` binary.
//!
//! Data flows one way: configuration -> datapath (kernel capture) -> proxy (per connection).
//! See DESIGN.md for the whole picture.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod fast_map;
pub mod identity;
pub mod kube;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod telemetry;
pub mod tunnel;
pub mod workloads;
