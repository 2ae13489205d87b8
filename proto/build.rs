//! Compiles the mesh's protobuf APIs with tonic (protoc from Debian's `protobuf-compiler`,
//! installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["mesh/registry/v1/registry.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
