//! Where the built workspace binaries are: beside the running test in the target directory
//! (`target/<profile>/`), unless an environment variable names one. A workspace build, or
//! `cargo nextest run --workspace`, builds them; a test of one crate needs them built first.

use std::path::{Path, PathBuf};

/// The enbd-server binary: `$ENBD_SERVER_BIN`, else `enbd-server` beside the running test.
pub fn enbd_server() -> PathBuf {
    built("enbd-server", "ENBD_SERVER_BIN")
}

/// The workspace binary `name`: `$env_var` if set, else `name` in the target directory the
/// running test executable was built into. Panics, saying how to build it, if it is missing.
pub fn built(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test>-<hash> (integration and unit tests alike).
    let Some(dir) = exe.parent().and_then(Path::parent) else {
        panic!("no target directory above {}", exe.display());
    };
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{name} binary not found at {}: build it first (cargo build -p {name}, same \
         CARGO_TARGET_DIR) or set {env_var}",
        bin.display()
    );
    bin
}
