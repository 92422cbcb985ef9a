//! Chooses the enbd-server(s) for a new volume: the live servers with the most free
//! bytes, among those with room for the whole volume; a mirrored volume's replicas each go
//! to a different server, and to different zones while servers in unused zones have room
//! (a spread preference, not a requirement: with fewer zones than replicas, the rest go by
//! free space). A server without a zone counts as a zone of its own.
//!
//! "Room" is judged against the filesystem's free space now, as reported by
//! each server's GetCapacity. Volumes are sparse, so this admits a volume that
//! could be fully written today; it does not reserve the space (thin
//! provisioning), which the README states. Ties go to the smaller server id, so
//! placement is deterministic for tests and for operators reading logs.

use std::time::Duration;

use enbd_proto::enbd::GetCapacityRequest;
use enbd_proto::ids::ServerId;

use crate::error::CsiError;
use crate::servers::LiveServer;

const CAPACITY_TIMEOUT: Duration = Duration::from_secs(5);

/// Index of the best candidate `(id, available_bytes)` for `size`, if any fits.
pub fn pick(candidates: &[(ServerId, u64)], size: u64) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, avail))| *avail >= size)
        .max_by(|(_, (a_id, a)), (_, (b_id, b))| a.cmp(b).then_with(|| b_id.cmp(a_id)))
        .map(|(i, _)| i)
}

/// Indexes of the `n` best distinct candidates for `size` (most free first, ties to the
/// smaller id), or `None` when fewer than `n` have room.
pub fn pick_many(candidates: &[(ServerId, u64)], size: u64, n: usize) -> Option<Vec<usize>> {
    let mut fit: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].1 >= size)
        .collect();
    fit.sort_by(|&a, &b| {
        let (a_id, a_free) = &candidates[a];
        let (b_id, b_free) = &candidates[b];
        b_free.cmp(a_free).then_with(|| a_id.cmp(b_id))
    });
    fit.dedup_by(|a, b| candidates[*a].0 == candidates[*b].0);
    (fit.len() >= n).then(|| fit.into_iter().take(n).collect())
}

/// Indexes of `n` distinct candidates `(id, free, zone)` for `size`: each pick is the one
/// with the most free space (ties to the smaller id) among those whose zone no earlier pick
/// (nor `taken`, the zones of servers already chosen) has, else among all that are left.
/// `None` when fewer than `n` have room.
pub fn pick_spread(
    candidates: &[(ServerId, u64, Option<String>)],
    size: u64,
    n: usize,
    taken: &[Option<String>],
) -> Option<Vec<usize>> {
    let flat: Vec<(ServerId, u64)> = candidates
        .iter()
        .map(|(id, free, _)| (id.clone(), *free))
        .collect();
    // Every candidate with room, most free first.
    let fit = flat.iter().filter(|(_, f)| *f >= size).count();
    let mut left = pick_many(&flat, size, fit).unwrap_or_default();
    if left.len() < n {
        return None;
    }
    let mut used: Vec<String> = taken.iter().flatten().cloned().collect();
    let mut chosen = Vec::with_capacity(n);
    while chosen.len() < n {
        let fresh = left.iter().position(|&i| match &candidates[i].2 {
            Some(z) => !used.contains(z),
            None => true,
        });
        let at = fresh.unwrap_or(0);
        let i = left.remove(at);
        if let Some(z) = &candidates[i].2 {
            used.push(z.clone());
        }
        chosen.push(i);
    }
    Some(chosen)
}

/// The `n` distinct servers the replicas of a new `size`-byte volume go to. `fixed` (the
/// source's server, which holds a clone's or restore's content, and copies an interrupted
/// create left) come first, in order; the rest are placed by free space. The first holds
/// the volume's id.
pub async fn place_replicas(
    servers: &[LiveServer],
    size: u64,
    n: usize,
    fixed: &[LiveServer],
) -> Result<Vec<LiveServer>, CsiError> {
    let others: Vec<LiveServer> = servers
        .iter()
        .filter(|s| fixed.iter().all(|f| f.id != s.id))
        .cloned()
        .collect();
    let wanted = n.saturating_sub(fixed.len());
    let answered = free_space(&others).await;
    let candidates: Vec<(ServerId, u64, Option<String>)> = answered
        .iter()
        .map(|(s, free)| (s.id.clone(), *free, s.zone.clone()))
        .collect();
    let taken: Vec<Option<String>> = fixed.iter().take(n).map(|f| f.zone.clone()).collect();
    let Some(chosen) = pick_spread(&candidates, size, wanted, &taken) else {
        let fit = candidates.iter().filter(|(_, f, _)| *f >= size).count();
        return Err(CsiError::ResourceExhausted(format!(
            "{n} replicas of {size} bytes need {n} distinct live enbd-servers with room; \
             {} eligible (of {} live)",
            fit + fixed.len(),
            servers.len()
        )));
    };
    let mut placed: Vec<LiveServer> = fixed.iter().take(n).cloned().collect();
    placed.extend(chosen.into_iter().map(|i| answered[i].0.clone()));
    Ok(placed)
}

/// Free bytes of each live server that answers GetCapacity in time.
pub async fn free_space(servers: &[LiveServer]) -> Vec<(LiveServer, u64)> {
    let asks = servers.iter().cloned().map(|s| async move {
        let mut client = s.client.clone();
        match tokio::time::timeout(CAPACITY_TIMEOUT, client.get_capacity(GetCapacityRequest {}))
            .await
        {
            Ok(Ok(resp)) => Some((s, resp.into_inner().available_bytes)),
            Ok(Err(status)) => {
                tracing::warn!(server = %s.id, %status, "GetCapacity failed; not placing there");
                None
            }
            Err(_) => {
                tracing::warn!(server = %s.id, "GetCapacity timed out; not placing there");
                None
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The server a new volume of `size` bytes goes to.
pub async fn place(servers: &[LiveServer], size: u64) -> Result<LiveServer, CsiError> {
    if servers.is_empty() {
        return Err(CsiError::Unavailable("no enbd-server is live".into()));
    }
    let answered = free_space(servers).await;
    if answered.is_empty() {
        return Err(CsiError::Unavailable(
            "no enbd-server answered GetCapacity".into(),
        ));
    }
    let candidates: Vec<(ServerId, u64)> = answered
        .iter()
        .map(|(s, free)| (s.id.clone(), *free))
        .collect();
    match pick(&candidates, size) {
        Some(i) => Ok(answered[i].0.clone()),
        None => {
            let (best, free) = candidates
                .iter()
                .max_by_key(|(_, free)| *free)
                .map(|(id, free)| (id.to_string(), *free))
                .unwrap_or_default();
            Err(CsiError::ResourceExhausted(format!(
                "no enbd-server has {size} bytes free (most free: {free} bytes on {best})"
            )))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn c(entries: &[(&str, u64)]) -> Vec<(ServerId, u64)> {
        entries
            .iter()
            .map(|(id, f)| (ServerId::parse(id).unwrap(), *f))
            .collect()
    }

    #[test]
    fn most_free_wins() {
        assert_eq!(pick(&c(&[("a", 10), ("b", 30), ("c", 20)]), 5), Some(1));
    }

    #[test]
    fn must_fit() {
        assert_eq!(pick(&c(&[("a", 10), ("b", 30)]), 31), None);
        assert_eq!(pick(&c(&[("a", 10), ("b", 30)]), 30), Some(1));
        assert_eq!(pick(&[], 1), None);
    }

    #[test]
    fn replicas_go_to_distinct_servers_most_free_first() {
        let cands = c(&[("a", 10), ("b", 30), ("c", 20), ("d", 5)]);
        assert_eq!(pick_many(&cands, 6, 2), Some(vec![1, 2]));
        assert_eq!(pick_many(&cands, 6, 3), Some(vec![1, 2, 0]));
        // Only three servers have room for 6 bytes.
        assert_eq!(pick_many(&cands, 6, 4), None);
        assert_eq!(
            pick_many(&c(&[("b", 10), ("a", 10)]), 1, 2),
            Some(vec![1, 0])
        );
    }

    fn z(entries: &[(&str, u64, Option<&str>)]) -> Vec<(ServerId, u64, Option<String>)> {
        entries
            .iter()
            .map(|(id, f, zone)| (ServerId::parse(id).unwrap(), *f, zone.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn replicas_prefer_distinct_zones_then_free_space() {
        // a and b share zone-1 and have the most room; c (zone-2) has less.
        let cands = z(&[
            ("a", 100, Some("zone-1")),
            ("b", 90, Some("zone-1")),
            ("c", 50, Some("zone-2")),
            ("d", 10, Some("zone-3")),
        ]);
        assert_eq!(pick_spread(&cands, 5, 2, &[]), Some(vec![0, 2]));
        assert_eq!(pick_spread(&cands, 5, 3, &[]), Some(vec![0, 2, 3]));
        // More replicas than zones: the fourth goes by free space.
        assert_eq!(pick_spread(&cands, 5, 4, &[]), Some(vec![0, 2, 3, 1]));
        // A zone already taken by a fixed replica (the source's server) is avoided.
        assert_eq!(
            pick_spread(&cands, 5, 2, &[Some("zone-1".into())]),
            Some(vec![2, 3])
        );
        // d cannot hold 20 bytes: the spread never places where there is no room.
        assert_eq!(pick_spread(&cands, 20, 3, &[]), Some(vec![0, 2, 1]));
        assert_eq!(pick_spread(&cands, 60, 3, &[]), None);
    }

    #[test]
    fn servers_without_a_zone_count_as_their_own() {
        let cands = z(&[
            ("a", 100, Some("zone-1")),
            ("b", 90, Some("zone-1")),
            ("c", 5, None),
        ]);
        assert_eq!(pick_spread(&cands, 1, 2, &[]), Some(vec![0, 2]));
        // No zones at all: the same as free space alone.
        let plain = z(&[("a", 10, None), ("b", 30, None), ("c", 20, None)]);
        assert_eq!(
            pick_spread(&plain, 6, 2, &[]),
            pick_many(&c(&[("a", 10), ("b", 30), ("c", 20)]), 6, 2)
        );
    }

    #[test]
    fn ties_go_to_smaller_id() {
        assert_eq!(pick(&c(&[("b", 10), ("a", 10)]), 1), Some(1));
    }
}
