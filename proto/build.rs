//! Compiles `proto/safeguarding/v1/*.proto` with protox (a pure-Rust protobuf compiler, so a fresh machine needs
//! nothing but cargo), generates the prost types and tonic services, and writes the encoded descriptor set that the
//! broker uses for policy field paths, recipient copies and gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "safeguarding/v1/bodies.proto",
        "safeguarding/v1/envelope.proto",
        "safeguarding/v1/broker.proto",
        "safeguarding/v1/audit.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("safeguarding_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StrictProstCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
