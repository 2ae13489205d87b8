//! Fuzzes the AgentConfig loader: any bytes either fail with an error or yield a configuration
//! whose derived values are consistent and which survives a serialise/parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::config::AgentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = serde_yaml::from_str::<AgentConfig>(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    // A validated config must yield its derived settings without error.
    assert!(config.excluded_cidrs().is_ok());
    let rendered = serde_yaml::to_string(&config).expect("a parsed config serialises");
    let reparsed: AgentConfig = serde_yaml::from_str(&rendered).expect("serialised config parses");
    assert_eq!(reparsed, config);
});
