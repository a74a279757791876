//! Registry credentials for lazy mounts, from where Kubernetes actually keeps them.
//!
//! containerd never hands registry credentials to a snapshotter: kubelet sends a pod's image
//! pull secret in the CRI `PullImage` call, containerd uses it to fetch manifests and layers,
//! and the snapshotter only sees labels. A lazily mounted layer of a private image then has
//! nothing to authenticate its range reads with, and the image falls back to a full pull.
//! This crate gives lazypull the two ways kubelet itself obtains credentials:
//!
//! - [`proxy`]: a transparent CRI `ImageService` proxy. kubelet's `--image-service-endpoint`
//!   points at lazypull, every call goes on unchanged to containerd's CRI socket, and the
//!   credential of each `PullImage` is kept (from the call on, withdrawn if it fails) in a [`CredentialStore`] (memory only,
//!   with a TTL) under the image's registry and repository.
//! - [`broker`]: how the snapshotter's layer daemons (processes of their own) ask for the
//!   kept credentials over a local socket each time a registry answers 401.
//! - [`provider`]: kubelet's credential provider plugins (exec protocol), run with kubelet's
//!   own config file and plugin directory.
//!
//! Secrets are never logged and never shown by `Debug`; see the module docs for why things
//! are the way they are.

pub mod broker;
pub mod codec;
pub mod cri;
pub mod matching;
pub mod provider;
pub mod proxy;
pub mod store;

pub use broker::{serve_broker, BrokerClient, Chain};
pub use codec::RawCodec;
pub use provider::{CredentialProviderConfig, ProviderError, ProviderOptions, Providers};
pub use proxy::{serve, ImageServiceProxy, ProxyConfig, SERVICE_NAME};
pub use store::{Clock, Credential, CredentialStore, StoreConfig, SystemClock};
