//! Conversion of arbitrary tar input. Property: conversion either fails with an error, or
//! produces a blob that our reader opens and fully verifies, in both output formats.
#![no_main]

use estargz::{build, BuildOptions, Compression, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for compression in [Compression::Gzip, Compression::Zstd] {
        let opts = BuildOptions {
            compression,
            chunk_size: 64,
            level: Some(1),
            threads: 1,
            ..Default::default()
        };
        let mut out = Vec::new();
        if build(data, &mut out, &opts).is_ok() {
            let r = Reader::open(out).unwrap_or_else(|e| panic!("our own blob does not open: {e}"));
            estargz::verify_chunks(&r).unwrap_or_else(|e| panic!("our own blob does not verify: {e}"));
        }
    }
});
