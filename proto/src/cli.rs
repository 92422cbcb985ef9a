//! Command-line value syntax shared by the three binaries, so that a value means the same
//! wherever it is given: `--log-level` directives and sizes shown to people. (Durations
//! share [`crate::params::parse_duration`] with the StorageClass parameters.)

/// The default `--log-level` of every binary.
pub const DEFAULT_LOG_LEVEL: &str = "info";

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `--log-level` value: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`)
/// or comma-separated directives `[TARGET=]LEVEL` such as `info,enbd_node::engine=debug`
/// (the tracing `EnvFilter` syntax, restricted to targets and levels). Returns it unchanged.
pub fn parse_log_level(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("empty log level (use trace, debug, info, warn, error or off)".into());
    }
    for directive in s.split(',') {
        let directive = directive.trim();
        let (target, level) = match directive.rsplit_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, directive),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "log level {directive:?}: expected [TARGET=]LEVEL with LEVEL one of {}",
                LEVELS.join(", ")
            ));
        }
        if let Some(t) = target
            && (t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')))
        {
            return Err(format!(
                "log level {directive:?}: a target is a module path such as enbd_node::engine"
            ));
        }
    }
    Ok(s.trim().to_owned())
}

/// A byte count for people: `512B`, `1.5KiB`, `10.0GiB` (binary units, one decimal, no space,
/// so that a table column stays one word for `awk`, as with `lsblk` and `df -h`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "DEBUG",
            "warn,enbd_node::engine=trace",
            "h2=off, info",
        ] {
            assert!(parse_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "loud", "info,", "=debug", "a b=info", "enbd=verbose"] {
            assert!(parse_log_level(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(1 << 30), "1.0GiB");
        assert_eq!(human_bytes(10 * (1 << 30) + (1 << 29)), "10.5GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0EiB");
    }
}
