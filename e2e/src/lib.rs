//! End-to-end and deployment checks for ENBD CSI.

pub mod dns;
pub mod faultproxy;
pub mod testcerts;
