//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/palaver/session/v1/session.proto",
        "proto/palaver/inference/v1/inference.proto",
    ];
    // We feed a descriptor set to the generator ourselves, so cargo does not
    // know which inputs matter: say it.
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("palaver_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
