//! Footer + TOC + tree parsing of arbitrary bytes: must never panic, hang or allocate without
//! bound. Seeds are real blobs, so mutations reach deep into TOC and chunk handling; whatever
//! opens is also read end to end (errors are fine, panics are not).
#![no_main]

use estargz::{OpenOptions, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = estargz::footer::parse_footer(data, data.len() as u64);
    if let Ok(toc) = estargz::Toc::from_json(data) {
        let _ = estargz::Tree::build(&toc, u64::MAX / 2);
    }
    let opts = OpenOptions {
        max_toc_size: 1 << 20,
        ..Default::default()
    };
    if let Ok(r) = Reader::open_with(data.to_vec(), &opts) {
        for (_, id) in r.tree().walk() {
            let n = r.tree().node(id);
            if n.kind == estargz::NodeKind::Reg && n.size <= 1 << 20 {
                let mut buf = vec![0u8; n.size as usize];
                let _ = r.read_file_at(id, 0, &mut buf, true);
            }
        }
        let _ = estargz::verify_chunks(&r);
    }
});
