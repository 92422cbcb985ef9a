//! What the Events loop observes of a volume (`events::observe`) against real enbd-servers:
//! a mirror whose *home* server is down, or gone from discovery altogether (its pod scaled
//! away), is degraded and served by its other replica, not unreachable, and not unseen;
//! a single copy on such a server is unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use csi_driver::events::{Observed, observe};
use csi_driver::replicas;
use csi_driver::servers::{LiveServer, Servers, Target, Targets};
use enbd_proto::enbd::CreateVolumeRequest;
use enbd_proto::ids::{ServerId, VolumeId};
use enbd_test_harness::EnbdServer;

const SIZE: u64 = 16 << 20;

fn targets(servers: &[&EnbdServer]) -> Targets {
    servers
        .iter()
        .map(|s| {
            (
                ServerId::parse(s.id()).unwrap(),
                Target {
                    mgmt_url: s.mgmt_url(),
                    zone: None,
                },
            )
        })
        .collect()
}

async fn registry(servers: &[&EnbdServer]) -> Arc<Servers> {
    let reg = Servers::new();
    reg.set_targets(&targets(servers));
    reg.mark_synced();
    reg.probe_all().await;
    reg
}

fn live(reg: &Servers, id: &str) -> LiveServer {
    reg.live()
        .into_iter()
        .find(|s| s.id.as_str() == id)
        .unwrap_or_else(|| panic!("{id} is not live"))
}

async fn create_on(server: &LiveServer, name: &str) {
    server
        .client
        .clone()
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            size_bytes: SIZE,
            ..Default::default()
        })
        .await
        .expect("create volume");
}

fn volume_id(server: &str, name: &str) -> VolumeId {
    VolumeId::parse(&format!("{server}/{name}")).unwrap()
}

/// A mirror observed with its home server missing: degraded, naming that server.
fn assert_degraded_naming_home(seen: Option<Observed>, case: &str) {
    match seen {
        Some(Observed::Degraded { detail }) => assert!(
            detail.contains("srv-home"),
            "names the missing replica: {detail}"
        ),
        other => panic!("a mirror with {case}: {other:?}"),
    }
}

#[tokio::test]
async fn a_mirror_whose_home_is_gone_is_degraded_and_a_single_copy_unreachable() {
    let mut home = EnbdServer::builder().id("srv-home").start();
    let other = EnbdServer::builder().id("srv-other").start();
    let reg = registry(&[&home, &other]).await;

    // A two-replica volume homed on srv-home, and a single copy there too.
    let placed = [live(&reg, "srv-home"), live(&reg, "srv-other")];
    create_on(&placed[0], "mirrored").await;
    replicas::complete_set(&placed, "mirrored", SIZE, &HashMap::new(), false)
        .await
        .expect("replica set");
    create_on(&placed[0], "single").await;
    let mirrored = volume_id("srv-home", "mirrored");
    let single = volume_id("srv-home", "single");
    assert_eq!(observe(&reg, &mirrored).await, Some(Observed::Serving));
    assert_eq!(observe(&reg, &single).await, Some(Observed::Serving));

    // The home's server dies: discovery still lists it, probes say down.
    home.kill();
    reg.probe_all().await;
    assert_degraded_naming_home(observe(&reg, &mirrored).await, "its home down");
    match observe(&reg, &single).await {
        Some(Observed::Unreachable { server, .. }) => assert_eq!(server, "srv-home"),
        other => panic!("a single copy with its server down: {other:?}"),
    }

    // Its pod goes away (scaled down): discovery no longer lists it at all.
    reg.set_targets(&targets(&[&other]));
    reg.probe_all().await;
    assert_degraded_naming_home(observe(&reg, &mirrored).await, "its home undiscovered");
    match observe(&reg, &single).await {
        Some(Observed::Unreachable { server, reason }) => {
            assert_eq!(server, "srv-home");
            assert!(reason.contains("not among the discovered"), "{reason}");
        }
        other => panic!("a single copy with its server undiscovered: {other:?}"),
    }

    // Back (same data directory): healthy again.
    home.restart();
    reg.set_targets(&targets(&[&home, &other]));
    reg.probe_all().await;
    assert_eq!(observe(&reg, &mirrored).await, Some(Observed::Serving));
    assert_eq!(observe(&reg, &single).await, Some(Observed::Serving));
}
