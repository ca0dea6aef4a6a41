//! A configuration directory as `agex check` loads it: `agex.toml`, `secrets/secrets.toml`,
//! `secrets/secrets.lock` and policies, split on NUL bytes in that order. A policy part
//! starts with its service name (the file stem) on its own line. Errors are rendered as
//! `check` prints them (spans, line excerpts).
#![no_main]

use std::path::Path;

use agex_core::{ConfigError, Project, SourceFile};
use libfuzzer_sys::fuzz_target;

fn source(path: &str, bytes: &[u8]) -> Result<SourceFile, ConfigError> {
    SourceFile::decode(path, bytes.to_vec()).map_err(ConfigError::Invalid)
}

fn load(data: &[u8]) -> Result<Project, ConfigError> {
    let mut parts = data.split(|b| *b == 0);
    let config = source("agex.toml", parts.next().unwrap_or_default())?;
    let rules = source("secrets/secrets.toml", parts.next().unwrap_or_default())?;
    let lock = match parts.next() {
        Some(bytes) => Some(source("secrets/secrets.lock", bytes)?),
        None => None,
    };
    let mut policies = Vec::new();
    // At most 256 policies (bunk has 30-odd): each costs about 0.25 ms in this
    // instrumented build, and an input of 3,000 empty parts (22 KB) took 0.86 s, at the
    // pass's 1-second hang limit, without being slow per policy (1,000 / 2,000 / 4,000
    // parts: 0.19 / 0.42 / 0.98 s).
    for part in parts.take(256) {
        let (name, text) = match part.iter().position(|b| *b == b'\n') {
            Some(at) => (&part[..at], &part[at + 1..]),
            None => (part, &[][..]),
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let path = format!("policies/{name}.toml");
        policies.push((name, source(&path, text)?));
    }
    Project::from_sources(Path::new("/fuzz"), config, rules, lock, policies)
}

fuzz_target!(|data: &[u8]| {
    match load(data) {
        Ok(project) => {
            let _ = project.job_names();
            for policy in project.policies.values() {
                let _ = policy.schedule.on_calendar();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
