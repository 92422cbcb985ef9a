//! Protocols shared by every ENBD CSI binary: the CSI gRPC API, the enbd-server
//! management API, the NBD wire codec (pure functions, no IO), and the Prometheus
//! exposition every binary serves (`metrics`).

/// The Container Storage Interface, package `csi.v1`, as the CSI spec defines it.
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The enbd-server management API, package `enbd.v1`.
pub mod enbd {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("enbd.v1");

    /// gRPC metadata key of a node's access token on management calls. Under `--access
    /// published` with management TLS, a caller with the `enbd-node` role may call
    /// `ReplicaService` and `VolumeService/GetVolume` for a volume only with the token the
    /// controller granted for that volume (the one its NBD connections present).
    pub const ACCESS_TOKEN_METADATA: &str = "enbd-access-token";
}

pub mod cli;
pub mod ids;
pub mod metrics;
pub mod params;
pub mod wire;
