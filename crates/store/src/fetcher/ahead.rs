//! Fetching ahead of a sequential reader.
//!
//! Readahead by blob order ([`FetchConfig::readahead`]) rides along with a miss, in the same
//! request, so it only helps when the next chunks are small. A big file read from start to end
//! (a model, a jar, a data file) has chunks of several MiB: each miss would be one round trip
//! plus one chunk's transfer, one after another, with the link idle while the reader consumes.
//! So the file system tells the fetcher, while a reader streams through a file, which chunks it
//! will want next; they are claimed at once (a reader that gets there joins the flight) and
//! fetched on a helper thread in one request per chunk-sized span, in parallel, keeping one
//! request slot free for other readers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{run_detached, Claim, CountGuard, LayerFetcher, Shape};

/// Largest span of one read-ahead request: big chunks go one per request, small ones in
/// groups, so that the reader's next chunk arrives after one span, not after the whole window.
const AHEAD_SPAN: u64 = 1 << 20;

impl LayerFetcher {
    /// Starts fetching those of `idxs` that are neither stored nor in flight, on a helper
    /// thread, and returns at once. Counted as demand: the background fill keeps quiet meanwhile.
    pub fn fetch_ahead(self: &Arc<Self>, idxs: &[usize]) {
        let claims = self.claim_missing(idxs);
        if claims.is_empty() {
            return;
        }
        let shape = Shape {
            workers: self.config.parallel.saturating_sub(1).max(1),
            max_range: AHEAD_SPAN,
        };
        self.demand.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        run_detached("ahead", move || me.run_ahead(claims, shape));
    }

    fn run_ahead(&self, claims: Vec<Claim>, shape: Shape) {
        let _demand = CountGuard(&self.demand);
        self.fetch_claims(claims, shape, None);
        self.note_network_demand();
    }
}
