//! A raw-deflate inflater that can stop at block boundaries and resume mid-stream.
//!
//! SOCI's random access needs three things no safe Rust inflater offers together: returning
//! at every deflate block boundary with the count of unused bits (to place checkpoints),
//! priming the bit buffer with up to 7 leftover bits, and presetting the 32 KiB window (to
//! resume at a checkpoint). zlib's `inflate(Z_BLOCK)`, `inflatePrime` and
//! `inflateSetDictionary` do exactly that; `libz-rs-sys` provides that C API implemented in
//! Rust (zlib-rs), so no C library is linked. This module is the only `unsafe` in the crate:
//! it owns one boxed `z_stream` (zlib keeps a pointer back to it, so it must not move) and
//! hands out safe calls that borrow the input and output slices for exactly one call.

use libz_rs_sys as z;

/// The deflate window: the farthest back a match may reach.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// How one `inflate` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// More input or output room is needed, or the call stopped at a block boundary.
    Progress,
    /// The final block of this deflate stream ended.
    StreamEnd,
}

/// What one `inflate` call did.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub status: Status,
    /// zlib's `data_type`: unused bits of the last input byte (0..=7), +64 in the final
    /// block, +128 right after a block ended.
    pub data_type: i32,
}

impl Step {
    /// The call stopped just after a block that is not the final one ended: a place where a
    /// checkpoint may be taken.
    pub fn at_block_boundary(&self) -> bool {
        self.data_type & 128 != 0 && self.data_type & 64 == 0
    }

    /// Bits of the last consumed byte that belong to the next block.
    pub fn unused_bits(&self) -> u8 {
        (self.data_type & 7) as u8
    }
}

/// The deflate data is invalid (zlib's message, if it gave one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid deflate data: {0}")]
pub struct InflateError(pub String);

/// A raw (headerless) deflate decoder.
pub struct RawInflater {
    stream: Box<z::z_stream>,
}

// SAFETY: the stream's state is owned by this value alone and only touched through `&mut self`.
unsafe impl Send for RawInflater {}

impl RawInflater {
    pub fn new() -> Self {
        let mut stream = Box::new(z::z_stream::default());
        // SAFETY: `stream` is a zeroed, boxed z_stream; the version and size are zlib-rs' own.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *stream,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(ret, z::Z_OK, "inflateInit2 cannot fail with valid arguments");
        RawInflater { stream }
    }

    /// Forgets all state, as a new inflater (used between gzip members).
    pub fn reset(&mut self) {
        // SAFETY: the stream was initialised in `new`.
        unsafe { z::inflateReset(&mut *self.stream) };
    }

    /// Pushes `bits` (0..=7) low bits of `value` into the bit buffer before any input.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), InflateError> {
        if bits > 7 {
            return Err(InflateError(format!("{bits} leftover bits (at most 7)")));
        }
        if bits == 0 {
            return Ok(());
        }
        // SAFETY: initialised stream; prime only touches the bit buffer.
        let ret = unsafe { z::inflatePrime(&mut *self.stream, bits as i32, value as i32) };
        self.check(ret)
    }

    /// Presets the window the next bytes may refer back into.
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), InflateError> {
        // SAFETY: the pointer and length describe `window`, which outlives the call.
        let ret = unsafe {
            z::inflateSetDictionary(&mut *self.stream, window.as_ptr(), window.len() as u32)
        };
        self.check(ret)
    }

    /// One `inflate` call; with `stop_at_blocks` it returns at every block boundary.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<Step, InflateError> {
        let avail_in = input.len().min(u32::MAX as usize) as u32;
        let avail_out = output.len().min(u32::MAX as usize) as u32;
        self.stream.next_in = input.as_ptr();
        self.stream.avail_in = avail_in;
        self.stream.next_out = output.as_mut_ptr();
        self.stream.avail_out = avail_out;
        let flush = if stop_at_blocks { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        // SAFETY: next_in/next_out point into slices borrowed for this call, with their lengths.
        let ret = unsafe { z::inflate(&mut *self.stream, flush) };
        let consumed = (avail_in - self.stream.avail_in) as usize;
        let produced = (avail_out - self.stream.avail_out) as usize;
        self.stream.next_in = std::ptr::null();
        self.stream.avail_in = 0;
        self.stream.next_out = std::ptr::null_mut();
        self.stream.avail_out = 0;
        let status = match ret {
            z::Z_STREAM_END => Status::StreamEnd,
            z::Z_OK | z::Z_BUF_ERROR => Status::Progress,
            z::Z_NEED_DICT => return Err(InflateError("a preset dictionary is required".into())),
            _ => return Err(self.error(ret)),
        };
        Ok(Step {
            consumed,
            produced,
            status,
            data_type: self.stream.data_type,
        })
    }

    fn check(&self, ret: i32) -> Result<(), InflateError> {
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(ret))
        }
    }

    fn error(&self, ret: i32) -> InflateError {
        let msg = if self.stream.msg.is_null() {
            format!("zlib error {ret}")
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(self.stream.msg) }
                .to_string_lossy()
                .into_owned()
        };
        InflateError(msg)
    }
}

impl Default for RawInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, ended exactly once here.
        unsafe { z::inflateEnd(&mut *self.stream) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn inflates_and_reports_the_stream_end() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 ^ (i / 7) as u8).collect();
        let packed = deflate_raw(&data);
        let mut inf = RawInflater::new();
        let mut out = vec![0u8; data.len() + 10];
        let (mut read, mut written) = (0, 0);
        loop {
            let step = inf.inflate(&packed[read..], &mut out[written..], true).unwrap();
            read += step.consumed;
            written += step.produced;
            if step.status == Status::StreamEnd {
                break;
            }
        }
        assert_eq!(&out[..written], &data[..]);
        assert_eq!(read, packed.len());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut inf = RawInflater::new();
        let mut out = [0u8; 64];
        let err = inf.inflate(&[0xff; 32], &mut out, false).unwrap_err();
        assert!(err.0.contains("invalid"), "{err}");
        assert!(inf.prime(8, 0).is_err());
    }
}
