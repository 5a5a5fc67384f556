//! Compiles `proto/ferry/v1/ferry.proto` with protox (pure Rust, no protoc needed)
//! and generates the tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ferry/v1/ferry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed messages are `InvalidArgument`, not tonic-prost's `Internal`.
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
