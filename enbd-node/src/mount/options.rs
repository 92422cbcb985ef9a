//! Mount options as CSI carries them (`mount_flags`, each possibly comma-separated) turned
//! into what mount(2) takes: generic `MS_*` flags plus the filesystem-specific data string.
//!
//! Invariant: options that would change what kind of mount is made (`bind`, `remount`,
//! `move`, propagation flags) are refused — the node decides those, not the caller.

use libc::c_ulong;

use super::MountError;

/// Parsed mount options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Generic `MS_*` flags.
    pub flags: c_ulong,
    /// Filesystem-specific options, comma-joined, for the `data` argument of mount(2).
    pub data: String,
}

impl MountOptions {
    pub fn read_only(&self) -> bool {
        self.flags & libc::MS_RDONLY != 0
    }

    /// The per-mount flags that a bind remount can apply (read-only, nosuid, nodev, ...).
    pub fn bind_flags(&self) -> c_ulong {
        self.flags
            & (libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC
                | libc::MS_NOATIME
                | libc::MS_NODIRATIME
                | libc::MS_RELATIME
                | libc::MS_STRICTATIME)
    }
}

enum Effect {
    Set(c_ulong),
    Clear(c_ulong),
}

fn generic(option: &str) -> Option<Effect> {
    use Effect::*;
    Some(match option {
        "defaults" | "rw" => Clear(libc::MS_RDONLY),
        "ro" => Set(libc::MS_RDONLY),
        "nosuid" => Set(libc::MS_NOSUID),
        "suid" => Clear(libc::MS_NOSUID),
        "nodev" => Set(libc::MS_NODEV),
        "dev" => Clear(libc::MS_NODEV),
        "noexec" => Set(libc::MS_NOEXEC),
        "exec" => Clear(libc::MS_NOEXEC),
        "sync" => Set(libc::MS_SYNCHRONOUS),
        "async" => Clear(libc::MS_SYNCHRONOUS),
        "dirsync" => Set(libc::MS_DIRSYNC),
        "noatime" => Set(libc::MS_NOATIME),
        "atime" => Clear(libc::MS_NOATIME),
        "nodiratime" => Set(libc::MS_NODIRATIME),
        "diratime" => Clear(libc::MS_NODIRATIME),
        "relatime" => Set(libc::MS_RELATIME),
        "norelatime" => Clear(libc::MS_RELATIME),
        "strictatime" => Set(libc::MS_STRICTATIME),
        "lazytime" => Set(libc::MS_LAZYTIME),
        "nolazytime" => Clear(libc::MS_LAZYTIME),
        "silent" => Set(libc::MS_SILENT),
        "loud" => Clear(libc::MS_SILENT),
        "mand" => Set(libc::MS_MANDLOCK),
        "nomand" => Clear(libc::MS_MANDLOCK),
        _ => return None,
    })
}

const REFUSED: &[&str] = &[
    "bind",
    "rbind",
    "remount",
    "move",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
];

/// Parses CSI mount flags; `read_only` forces `MS_RDONLY` whatever the flags say.
pub fn parse(mount_flags: &[String], read_only: bool) -> Result<MountOptions, MountError> {
    let mut opts = MountOptions::default();
    let mut data: Vec<&str> = Vec::new();
    for option in mount_flags.iter().flat_map(|f| f.split(',')).map(str::trim) {
        if option.is_empty() {
            continue;
        }
        if option.contains('\0') || option.contains(char::is_whitespace) {
            return Err(MountError::BadOption(option.to_string()));
        }
        if REFUSED.contains(&option) {
            return Err(MountError::BadOption(option.to_string()));
        }
        match generic(option) {
            Some(Effect::Set(f)) => opts.flags |= f,
            Some(Effect::Clear(f)) => opts.flags &= !f,
            None => data.push(option),
        }
    }
    if read_only {
        opts.flags |= libc::MS_RDONLY;
    }
    opts.data = data.join(",");
    Ok(opts)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn empty_is_default() {
        assert_eq!(parse(&[], false).expect("ok"), MountOptions::default());
    }

    #[test]
    fn generic_flags_and_data_split() {
        let o = parse(&s(&["noatime,discard", "nodev", "commit=30"]), false).expect("ok");
        assert_eq!(o.flags, libc::MS_NOATIME | libc::MS_NODEV);
        assert_eq!(o.data, "discard,commit=30");
        assert!(!o.read_only());
    }

    #[test]
    fn later_options_override_earlier() {
        let o = parse(&s(&["ro", "rw"]), false).expect("ok");
        assert!(!o.read_only());
        let o = parse(&s(&["noexec,exec"]), false).expect("ok");
        assert_eq!(o.flags, 0);
    }

    #[test]
    fn read_only_argument_wins() {
        let o = parse(&s(&["rw"]), true).expect("ok");
        assert!(o.read_only());
        assert_eq!(o.bind_flags(), libc::MS_RDONLY);
    }

    #[test]
    fn bind_flags_drop_sync_and_lazytime() {
        let o = parse(&s(&["sync,lazytime,nosuid"]), false).expect("ok");
        assert_eq!(o.bind_flags(), libc::MS_NOSUID);
    }

    #[test]
    fn mount_kind_options_are_refused() {
        for bad in ["bind", "remount", "rshared", "move"] {
            let err = parse(&s(&[bad]), false).expect_err(bad);
            assert!(matches!(err, MountError::BadOption(ref o) if o == bad));
        }
    }

    #[test]
    fn whitespace_and_nul_are_refused() {
        assert!(parse(&s(&["a b"]), false).is_err());
        assert!(parse(&s(&["a\0b"]), false).is_err());
    }
}
