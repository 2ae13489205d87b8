//! Telemetry the agent exports. At this stage: Prometheus metrics rendered from the kernel's
//! per-workload counters and the proxy's own counters at scrape time.

pub mod metrics;
