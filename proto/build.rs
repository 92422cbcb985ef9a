//! Compiles `csi.proto` and `enbd.proto` with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler. The vendored crate also ships the
//! well-known types (`descriptor.proto`, `timestamp.proto`, `wrappers.proto`)
//! that the CSI spec imports; its include directory is passed explicitly.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=csi.proto");
    println!("cargo:rerun-if-changed=enbd.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[PathBuf::from("csi.proto"), PathBuf::from("enbd.proto")],
            &[PathBuf::from("."), well_known],
        )?;
    Ok(())
}
