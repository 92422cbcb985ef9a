//! `csi.proto` is wire compatible with the CSI spec: every message, field number, field type,
//! enum value and RPC path it declares is checked against a table extracted from the spec's
//! own `csi.proto` (release v1.12.0, `tests/data/csi-spec-v1.12.0.txt`). A renumbered,
//! retyped, renamed, missing or extra field fails here, as does a moved RPC — each of which
//! would break the Kubernetes sidecars on the wire while everything still compiled.
//!
//! The table was made by running [`table`] over the spec's file; to move to a newer spec
//! release, extract its table the same way and replace the data file with it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

const SPEC_TABLE: &str = include_str!("data/csi-spec-v1.12.0.txt");

/// Compiles one `.proto` file with the vendored protoc and returns its descriptor.
fn descriptor(proto: &Path) -> FileDescriptorSet {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let well_known = protoc_bin_vendored::include_path().expect("well-known types");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("set.pb");
    let status = Command::new(protoc)
        .arg(format!(
            "--proto_path={}",
            proto.parent().expect("dir").display()
        ))
        .arg(format!("--proto_path={}", well_known.display()))
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg(proto.file_name().expect("file name"))
        .status()
        .expect("run protoc");
    assert!(status.success(), "protoc failed on {}", proto.display());
    FileDescriptorSet::decode(std::fs::read(&out).expect("descriptor").as_slice())
        .expect("decode descriptor set")
}

fn enum_lines(prefix: &str, e: &EnumDescriptorProto, out: &mut Vec<String>) {
    for v in &e.value {
        out.push(format!(
            "enum {prefix}.{} {} = {}",
            e.name(),
            v.name(),
            v.number()
        ));
    }
}

fn message_lines(prefix: &str, m: &DescriptorProto, out: &mut Vec<String>) {
    let name = format!("{prefix}.{}", m.name());
    out.push(format!("message {name}"));
    for f in &m.field {
        let ty = match f.r#type() {
            Type::Message | Type::Enum => f.type_name().to_string(),
            t => t.as_str_name().trim_start_matches("TYPE_").to_lowercase(),
        };
        let label = match f.label() {
            Label::Repeated => "repeated ",
            _ => "",
        };
        let oneof = match f.oneof_index {
            Some(i) if !f.proto3_optional() => {
                format!(" oneof {}", m.oneof_decl[i as usize].name())
            }
            _ => String::new(),
        };
        out.push(format!(
            "field {name}.{} = {} {label}{ty}{oneof}",
            f.name(),
            f.number()
        ));
    }
    for e in &m.enum_type {
        enum_lines(&name, e, out);
    }
    for nested in &m.nested_type {
        message_lines(&name, nested, out);
    }
}

/// One line per message, field, enum value and RPC of the file's `csi.v1` package, sorted.
fn table(set: &FileDescriptorSet) -> Vec<String> {
    let mut out = Vec::new();
    for file in &set.file {
        let pkg = format!(".{}", file.package());
        for m in &file.message_type {
            message_lines(&pkg, m, &mut out);
        }
        for e in &file.enum_type {
            enum_lines(&pkg, e, &mut out);
        }
        for s in &file.service {
            for rpc in &s.method {
                let stream = if rpc.server_streaming() {
                    "stream "
                } else {
                    ""
                };
                out.push(format!(
                    "rpc /{}.{}/{} {} -> {stream}{}",
                    file.package(),
                    s.name(),
                    rpc.name(),
                    rpc.input_type(),
                    rpc.output_type()
                ));
            }
        }
        for ext in &file.extension {
            out.push(format!(
                "extension {} {} = {}",
                ext.extendee(),
                ext.name(),
                ext.number()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn csi_proto_matches_the_spec_on_the_wire() {
    let ours = table(&descriptor(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("csi.proto"),
    ));
    let spec: Vec<String> = SPEC_TABLE
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(spec.len() > 400, "spec table looks truncated");
    let missing: Vec<_> = spec.iter().filter(|l| !ours.contains(l)).collect();
    let extra: Vec<_> = ours.iter().filter(|l| !spec.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "csi.proto differs from the CSI spec v1.12.0:\n  missing or changed:\n    {}\n  \
         not in the spec:\n    {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    "),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    ")
    );
}
