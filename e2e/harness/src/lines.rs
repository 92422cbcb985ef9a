//! Readiness lines of daemons other than enbd-server (whose own line is parsed by
//! `enbd_server::ready`): `<name> ready key=value ...` as the first such line on stdout.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

/// Reads `child`'s stdout (which must be piped) until a line starts with `prefix`, within
/// `timeout`; the rest of its output is drained in the background so the child never blocks
/// on a full pipe. Panics if the child exits first or the time runs out.
pub async fn wait_for_line(child: &mut Child, prefix: &str, timeout: Duration) -> String {
    let Some(stdout) = child.stdout.take() else {
        panic!("the child's stdout is not piped");
    };
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Some(line) = lines
            .next_line()
            .await
            .unwrap_or_else(|e| panic!("reading stdout: {e}"))
        {
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("no {prefix:?} line within {timeout:?}"))
    .unwrap_or_else(|| panic!("process exited before printing {prefix:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// The value of `key=` in a readiness line; panics if it is missing.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{key}= missing in {line:?}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn fields_match_whole_keys() {
        let line = "csi-driver ready endpoint=unix:///x metricsx=1 metrics=127.0.0.1:9";
        assert_eq!(field(line, "metrics"), "127.0.0.1:9");
        assert_eq!(field(line, "endpoint"), "unix:///x");
    }

    #[tokio::test]
    async fn waits_past_other_lines_and_reports_an_early_exit() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "echo hello; echo 'demo ready a=1'; echo after"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let line = wait_for_line(&mut child, "demo ready", Duration::from_secs(10)).await;
        assert_eq!(field(&line, "a"), "1");

        let mut quiet = tokio::process::Command::new("true")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("true: {e}"));
        let early = tokio::spawn(async move {
            wait_for_line(&mut quiet, "never", Duration::from_secs(10)).await
        });
        let err = early.await.expect_err("must panic");
        assert!(err.is_panic());
    }
}
