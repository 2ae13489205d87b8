//! Fuzzes the policy resource loader and compiler: any bytes (read as lossy UTF-8) either yield
//! errors or valid resources; valid resources survive a serialise/parse round trip, compile or
//! fail with errors, and a compiled snapshot answers lookups and authorization without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{Action, PolicySnapshot, RequestAttributes, parse_documents};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let report = parse_documents(&text, "fuzz.yaml");
    for loaded in &report.resources {
        assert!(
            loaded.resource.validate().is_ok(),
            "loader returned an invalid resource"
        );
        let rendered = serde_yaml::to_string(&loaded.resource).expect("a resource serialises");
        let reparsed = parse_documents(&rendered, "rendered.yaml");
        assert!(
            reparsed.is_clean(),
            "round trip rejected: {:?}\n{rendered}",
            reparsed.errors
        );
        assert_eq!(reparsed.resources.len(), 1);
        assert_eq!(reparsed.resources[0].resource, loaded.resource);
    }
    let resources = report.resources();
    for default_action in [Action::Allow, Action::Deny] {
        let Ok(snapshot) = PolicySnapshot::compile(&resources, default_action) else {
            continue;
        };
        assert_eq!(snapshot.resource_count(), resources.len());
        let names: Vec<String> = snapshot.agents().map(|a| a.name.clone()).collect();
        for name in names.iter().map(String::as_str).chain(["*", "", "unknown"]) {
            let _ = snapshot.agent_by_host(name);
            let _ = snapshot.traffic(name);
            for destination in [Some(name), None] {
                let request = RequestAttributes {
                    source: name,
                    destination,
                    http_method: "GET",
                    path: "/api/x?y",
                    mcp_method: Some("tools/call"),
                    mcp_tool: Some(name),
                    a2a_method: None,
                };
                let decision = snapshot.authorize(&request);
                assert!(decision.rule.is_none() || decision.policy.is_some());
            }
        }
    }
});
