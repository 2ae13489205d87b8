//! Fuzzes the parser of Kubernetes pod watch events and the pod selection that follows it: no
//! line may panic them, and a selected pod always carries a valid SPIFFE ID of the trust
//! domain with the pod's namespace in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::kube::pods::{WatchEvent, parse_watch_event, selected};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = parse_watch_event(data) else {
        return;
    };
    if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) | WatchEvent::Deleted(pod) = event
        && let Ok(identity) = selected(&pod, "node-a", "cluster.local")
    {
        assert_eq!(identity.identity.trust_domain(), "cluster.local");
        assert!(
            identity
                .identity
                .path()
                .starts_with(&format!("/ns/{}/sa/", pod.metadata.namespace))
        );
        assert!(!identity.uid.contains('/'));
    }
});
