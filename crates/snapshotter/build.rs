//! Compiles our copies of containerd's snapshots API protos with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["containerd/services/snapshots/v1/snapshots.proto", "containerd/types/mount.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
