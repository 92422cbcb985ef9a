//! csi-driver: the CSI Controller and Identity services for ENBD volumes.
//!
//! Layers, dependencies pointing one way: [`config`] (validated flags) →
//! [`discovery`] (which enbd-servers exist) → [`servers`] (health, clients) →
//! [`mgmt`] (one management call under a deadline) →
//! [`placement`], [`capacity`], [`capability`], [`publish`], [`ops`], [`names`],
//! [`nodes`], [`pending`] (policy) →
//! [`identity`], [`controller`] (the CSI services; [`error`] is their one
//! mapping to gRPC codes), [`events`] (Kubernetes Events on state changes) →
//! [`serve`] (unix socket, shutdown) → `main.rs`; [`admin_client`] is the operator
//! subcommands' client of a running controller.

pub mod admin_client;
pub mod capability;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod controller;
pub mod discovery;
pub mod error;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod mgmt;
pub mod mgmt_tls;
pub mod names;
pub mod nodes;
pub mod ops;
pub mod pending;
pub mod placement;
pub mod publish;
pub mod replicas;
pub mod serve;
pub mod servers;
pub mod state;
pub mod sync;
