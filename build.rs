//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the tonic
//! client and server code. The encoded descriptor set is also written to `OUT_DIR` so the
//! server can offer gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(["tokenvault/v1/tokenvault.proto"], ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tokenvault_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // protox already told cargo what to watch; prost's own hints assume protoc paths.
        .emit_rerun_if_changed(false)
        // Messages that carry a PAN get a redacting `Debug` by hand (src/grpc/mod.rs).
        .skip_debug([
            ".tokenvault.v1.TokenizeRequest",
            ".tokenvault.v1.DetokenizeResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
