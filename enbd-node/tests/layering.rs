//! The layer edges of the node plugin, checked on its source: `engine` → `device` → `csi`,
//! with `attach` (and `backing`) joining the engine and the device under the CSI layer.
//! The CSI layer never sees libublk, engine or device types; the device layer knows nothing
//! of the engine; libublk stays inside `device`; only `mount` reads the mount table.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// Every source file of `module` (`src/<module>.rs` and `src/<module>/**`), with its text.
fn module(name: &str) -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let file = src.join(format!("{name}.rs"));
    if file.exists() {
        files.push(file);
    }
    let dir = src.join(name);
    if dir.is_dir() {
        sources(&dir, &mut files);
    }
    assert!(!files.is_empty(), "module {name} has no source files");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            (p, text)
        })
        .collect()
}

fn assert_never_names(module_name: &str, forbidden: &[&str]) {
    let mut found = Vec::new();
    for (path, text) in module(module_name) {
        for (n, line) in text.lines().enumerate() {
            // Prose may name other layers; code may not.
            if line.trim_start().starts_with("//") {
                continue;
            }
            for f in forbidden {
                if line.contains(f) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "module {module_name} crosses a layer edge:\n{}",
        found.join("\n")
    );
}

#[test]
fn csi_sees_neither_engine_nor_device_types() {
    assert_never_names(
        "csi",
        &[
            "crate::engine",
            "crate::device",
            "crate::attach",
            "crate::backing",
            "crate::state",
            "enbd_node::",
            "libublk::",
            "use libublk",
        ],
    );
}

#[test]
fn the_device_layer_knows_nothing_above_it() {
    assert_never_names(
        "device",
        &[
            "crate::engine",
            "crate::attach",
            "crate::backing",
            "crate::csi",
        ],
    );
}

#[test]
fn the_engine_knows_nothing_of_devices() {
    assert_never_names(
        "engine",
        &[
            "crate::device",
            "crate::attach",
            "crate::backing",
            "crate::csi",
            "libublk::",
            "use libublk",
        ],
    );
}

#[test]
fn libublk_and_the_mount_table_stay_in_their_modules() {
    for m in ["attach", "backing", "control", "daemon", "state", "cli"] {
        assert_never_names(m, &["libublk::", "use libublk", "/proc/self/mountinfo"]);
    }
}
