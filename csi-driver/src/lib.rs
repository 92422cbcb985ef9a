//! csi-driver library.
