//! A node's lazypull state on disk, shared by every process that serves or inspects it:
//! `lazypull mount` and its daemons, `status`/`umount`, `lazypull cache`, the snapshotter's GC
//! and its metrics endpoint.
//!
//! Why a library and not the binary: these files are an interface between processes (a daemon
//! writes its record and status, another process reads them; the snapshotter's GC reads the
//! chunk references every layer daemon wrote). Keeping their schema and paths in one crate
//! means one definition, unit-tested without root, instead of string paths repeated across
//! commands.
//!
//! Layout of a state directory (`--state-dir`, default `/var/lib/lazypull`):
//!
//! ```text
//! STATE/cache/                 the chunk store (crate `store`)
//! STATE/tails/                 layers' footers and indexes, to reopen without the network
//! STATE/refs/<blob hex>        what a layer keeps in the store: `c <digest>` / `o <digest>`
//! STATE/mounts/<hash>/         one mount: record.json, status.json, daemon.log
//! /run/lazypull/mounts/<hash>  node-wide: a symlink to the mount's directory, whichever
//!                              state dir it uses (so `status`/`umount` need no --state-dir)
//! ```

pub mod daemon;
pub mod effects;
mod files;
pub mod layout;
pub mod record;
pub mod refs;
pub mod status;

pub use daemon::{spawn_daemon, DaemonError, Started};
pub use effects::{stop_mount, Effects, Signal, StopDeadlines, Stopped};
pub use layout::{MountIndex, StateDir};
pub use record::{start_ticks, Record};
pub use refs::{read_refs, write_refs, StoredItem};
pub use status::{LayerStatus, MountStatus};
