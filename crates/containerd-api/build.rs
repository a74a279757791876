//! Compiles our copies of containerd's API protos with a pure-Rust protobuf compiler (protox),
//! so building needs no `protoc`. Server code is used by the snapshotter, client code by
//! `lazypull rpull` and the tests.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "containerd/types/mount.proto",
        "containerd/types/descriptor.proto",
        "containerd/services/snapshots/v1/snapshots.proto",
        "containerd/services/content/v1/content.proto",
        "containerd/services/images/v1/images.proto",
        "containerd/services/leases/v1/leases.proto",
        "containerd/services/diff/v1/diff.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
