//! The readiness line: the first line enbd-server prints on stdout once every listener is
//! bound and the store is open, `enbd-server ready nbd=ADDR mgmt=ADDR metrics=ADDR`
//! (then ` health=ADDR` when `--health-listen` is set).
//! Scripts and tests wait for it to learn the ports the server got (`:0` listeners).
//!
//! Producer and parser live together so they cannot drift apart.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

const PREFIX: &str = "enbd-server ready";

/// The addresses a running server announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyLine {
    pub nbd: SocketAddr,
    pub mgmt: SocketAddr,
    pub metrics: SocketAddr,
    /// The plain-text grpc.health.v1 listener, when there is one.
    pub health: Option<SocketAddr>,
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX} nbd={} mgmt={} metrics={}",
            self.nbd, self.mgmt, self.metrics
        )?;
        match self.health {
            Some(h) => write!(f, " health={h}"),
            None => Ok(()),
        }
    }
}

impl ReadyLine {
    /// Parses one line (a trailing newline is allowed).
    pub fn parse(line: &str) -> Result<Self, String> {
        let rest = line
            .trim_end()
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("not a readiness line: {line:?}"))?;
        let optional = |key: &str| -> Result<Option<SocketAddr>, String> {
            let Some(value) = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            else {
                return Ok(None);
            };
            value
                .parse()
                .map(Some)
                .map_err(|e| format!("{key}={value}: {e} (in {line:?})"))
        };
        let field = |key: &str| -> Result<SocketAddr, String> {
            optional(key)?.ok_or_else(|| format!("{key}= missing in {line:?}"))
        };
        Ok(Self {
            nbd: field("nbd")?,
            mgmt: field("mgmt")?,
            metrics: field("metrics")?,
            health: optional("health")?,
        })
    }
}

/// Spawns `cmd` (an enbd-server command line) with stdout piped, waits for its readiness line
/// and returns the child with what it announced. The rest of stdout is drained on a thread so
/// the server never writes into a full or closed pipe.
pub fn spawn_until_ready(cmd: &mut Command) -> Result<(Child, ReadyLine), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning enbd-server: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("enbd-server's stdout was not piped".into());
    };
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let read = reader.read_line(&mut line);
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let parsed = read
        .map_err(|e| format!("reading the readiness line: {e}"))
        .and_then(|_| ReadyLine::parse(&line));
    match parsed {
        Ok(ready) => Ok((child, ready)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_a_readiness_line() {
        let r = ReadyLine {
            nbd: "127.0.0.1:10809".parse().unwrap(),
            mgmt: "[::1]:10810".parse().unwrap(),
            metrics: "0.0.0.0:9810".parse().unwrap(),
            health: None,
        };
        assert_eq!(
            r.to_string(),
            "enbd-server ready nbd=127.0.0.1:10809 mgmt=[::1]:10810 metrics=0.0.0.0:9810"
        );
        assert_eq!(ReadyLine::parse(&format!("{r}\n")), Ok(r));
        let h = ReadyLine {
            health: Some("127.0.0.1:10811".parse().unwrap()),
            ..r
        };
        assert!(h.to_string().ends_with(" health=127.0.0.1:10811"));
        assert_eq!(ReadyLine::parse(&h.to_string()), Ok(h));
        assert!(ReadyLine::parse("demo volume: nbd://localhost/demo").is_err());
        assert!(ReadyLine::parse("enbd-server ready nbd=127.0.0.1:1 mgmt=127.0.0.1:2").is_err());
        assert!(
            ReadyLine::parse("enbd-server ready nbd=x mgmt=127.0.0.1:2 metrics=127.0.0.1:3")
                .is_err()
        );
        // A key must match whole: `nbdx=` is not `nbd=`.
        assert!(
            ReadyLine::parse(
                "enbd-server ready nbdx=127.0.0.1:1 mgmt=127.0.0.1:2 metrics=127.0.0.1:3"
            )
            .is_err()
        );
    }
}
