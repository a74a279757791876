//! SOCI zTOC parsing and the checkpoint inflater on arbitrary bytes. Properties: the parser
//! never panics; a zTOC it accepts writes back to bytes that parse to the same zTOC; inflating
//! from its spans (the input itself standing in for the compressed layer, outputs of at most
//! 4 KiB) and reading its small files give bytes or an error, never a panic, a hang or an
//! unbounded allocation. Seeds are the SOCI reference zTOCs (read in place from
//! crates/soci/tests/fixtures) and the zTOCs the hostile tests make (see scripts/fuzz.sh).
#![no_main]

use libfuzzer_sys::fuzz_target;
use soci::{inflate_at, read_entry, verify_span, EntryKind, ExtractError, SpanTable, Ztoc};

/// Spans tried per input: the first few and the last (a zTOC may list thousands).
const SPANS: usize = 8;
const OUT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(z) = Ztoc::from_bytes(data) else { return };
    let written = z.to_bytes();
    let again = Ztoc::from_bytes(&written).unwrap_or_else(|e| panic!("our own zTOC does not parse: {e}"));
    assert!(again == z, "written back, the zTOC parses to another one");

    let blob_size = data.len() as u64;
    let spans = z.spans.span_count();
    let mut out = [0u8; OUT];
    for span in (0..spans.min(SPANS)).chain([spans - 1]) {
        let (start, end) = z.spans.compressed_range(span, blob_size);
        let at = (start as usize).min(data.len());
        let own = &data[at..(end as usize).clamp(at, data.len())];
        let _ = verify_span(&z, span, own);
        let n = 1 + (span * 977 + data.len()) % OUT;
        let span_len = z.spans.uncompressed_end(span, z.uncompressed_size).saturating_sub(z.spans.uncompressed_start(span));
        for (input, skip) in [(data, 0), (&data[at..], 0), (&data[at..], (span_len / 2).min(64 << 10))] {
            let got = inflate_at(&z.spans, span, input, skip, &mut out[..n]);
            if let (SpanTable::Tar { .. }, Ok(())) = (&z.spans, &got) {
                assert_eq!(&out[..n], &input[skip as usize..skip as usize + n], "tar span {span} copied other bytes");
            }
        }
    }
    if let SpanTable::Gzip { .. } = z.spans {
        let got = inflate_at(&z.spans, spans, data, 0, &mut out);
        assert!(matches!(got, Err(ExtractError::NoSuchSpan { .. })), "span {spans} of {spans}: {got:?}");
    }
    // Whole files through the zTOC, with the input as the layer (digests fail unless the
    // fuzzer made them match); sizes are bounded here, see the ignored hostile tests for why.
    for e in z.entries.iter().filter(|e| e.kind == EntryKind::Reg && e.size <= 64 << 10).take(16) {
        if let Ok(bytes) = read_entry(&z, data, e) {
            assert_eq!(bytes.len() as u64, e.size, "{}", e.name);
        }
    }
});
