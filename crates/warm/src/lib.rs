//! Cache warming (`lazypull warm`, `lazypull bake`): choosing which chunks of which images a
//! node's chunk store should hold before any container asks for them.
//!
//! Why a crate of its own, and pure: the choice is the part of warming with policy in it (what
//! a byte budget buys first), and it is the same whether the chunks are then fetched into a live
//! node's store or into a volume being baked. It works on the format-neutral layer model
//! ([`index::LayerIndex`]), so eStargz, zstd:chunked and SOCI layers are warmed alike; fetching,
//! containerd and the registry stay with the caller.

pub mod select;
pub mod volume;

pub use select::{plan, LayerInput, Mode, Plan, PlannedLayer, Tier};
pub use volume::{VolumeError, VolumeImage, VolumeLayer, VolumeManifest};
