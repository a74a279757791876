//! containerd's gRPC API as lazypull speaks it.
//!
//! The `.proto` files under `proto/` are our own wire-compatible copies of the parts of
//! containerd's API we need (package, service, message and field names and numbers as upstream),
//! compiled by protox + tonic so no `protoc` or Go tree is needed to build. One crate owns them so
//! the snapshotter (server side of `Snapshots`) and `lazypull rpull` (client of `Content`,
//! `Images`, `Leases`, `Diff` and `Snapshots`) share one set of generated types; for example a
//! [`types::Mount`] returned by `Snapshots.Prepare` is passed unchanged to `Diff.Apply`.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, missing_docs)]
pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
    }
}

pub use containerd::services::content::v1 as content;
pub use containerd::services::diff::v1 as diff;
pub use containerd::services::images::v1 as images;
pub use containerd::services::leases::v1 as leases;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;

/// gRPC metadata key selecting the containerd namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata key attaching a call's new resources to a lease.
pub const LEASE_HEADER: &str = "containerd-lease";

/// A gRPC channel over the unix socket at `path` (containerd's or a snapshotter's).
///
/// The connection is made lazily on first use and re-made after failures, like any tonic
/// channel; the URI is a placeholder that the connector ignores.
pub fn unix_channel(path: impl Into<PathBuf>) -> Channel {
    let path = path.into();
    Endpoint::from_static("http://[::1]:1").connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    }))
}
