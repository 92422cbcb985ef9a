//! The NBD wire codec (fixed newstyle handshake and transmission phase).
//! Pure functions over byte buffers: no IO, malformed input is an error, never a panic.
