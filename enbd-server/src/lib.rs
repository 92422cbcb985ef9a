//! enbd-server library.
