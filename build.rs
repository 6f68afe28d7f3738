//! Compiles the wire contract in `proto/` with protox (no system protoc), generates prost
//! messages and pbjson canonical-JSON impls for them.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/metal/vmprovisioner/v1/vmprovisioner.proto",
        "proto/deploy/billaged/v1/billing.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("descriptors.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .btree_map(["."])
        .compile_protos(&files, &["proto"])?;

    let set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .btree_map(["."])
        .ignore_unknown_fields()
        .build(&[".metal.vmprovisioner.v1", ".deploy.billaged.v1"])?;
    Ok(())
}
