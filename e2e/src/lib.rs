//! End-to-end and deployment checks for ENBD CSI.

pub mod faultproxy;
pub mod testcerts;
