//! The hash map of the per-request path: maps whose keys come from configuration or from the
//! kernel (endpoint addresses, agent names, pool keys) and are looked up on every request.
//!
//! They hash with foldhash, seeded at random per map (hashbrown's own default), instead of the
//! standard library's SipHash, which cost several hundred instructions per lookup on the
//! proxy's hot path. Maps whose keys a remote peer chooses freely (rate-limit buckets, MCP
//! sessions, deduplication keys) keep SipHash.

/// A `HashMap` hashed with foldhash (random seed per map).
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
