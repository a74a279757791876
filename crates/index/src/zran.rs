//! Resuming an unmodified gzip stream in the middle: SOCI's zran checkpoints.
//!
//! [`RawInflater`] is a raw-deflate inflater that can stop at block boundaries and resume
//! mid-stream; [`Resume`] is a checkpoint's state and [`resume_inflate`] produces bytes from it.
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

/// What inflating from a checkpoint needs besides the compressed bytes: the bits of the byte
/// before the checkpoint that belong to it, and the 32 KiB of output before it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resume {
    pub bits: u8,
    pub window: Box<[u8]>,
    /// Where this checkpoint's span ends and what its output must end with (the next
    /// checkpoint's window); `None` for the last span.
    pub span_end: Option<SpanEnd>,
    /// sha256 of `window`, computed once: every chunk of the span is keyed by it
    /// (`store::span_chunk_key`), and hashing 32 KiB per chunk cost 145 ms at the mount of a
    /// 6675-file layer.
    window_digest: crate::Digest,
}

/// The end of a checkpoint's span: `len` uncompressed bytes after the checkpoint, whose last
/// bytes are the next checkpoint's `window`.
///
/// Why it is here: a SOCI span digest covers the *compressed* bytes only, so a zTOC with a wrong
/// window would inflate verified bytes into wrong output unnoticed. Output that reaches the span
/// end is compared with the next window ([`Resume::check_span_end`]): a wrong window of this
/// checkpoint changes the output, a wrong window of the next one differs from it, and either is
/// an error instead of wrong bytes. (A zTOC forged consistently from one span to the layer's end
/// is only caught by the layer's DiffID; see docs/design.md.)
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanEnd {
    pub len: u64,
    pub window: Box<[u8]>,
}

impl Resume {
    pub fn new(bits: u8, window: Box<[u8]>, span_end: Option<SpanEnd>) -> Resume {
        let window_digest = crate::Digest::of(&window);
        Resume { bits, window, span_end, window_digest }
    }

    /// sha256 of the checkpoint's window.
    pub fn window_digest(&self) -> &crate::Digest {
        &self.window_digest
    }

    /// Checks output inflated from this checkpoint (starting at it) against the next
    /// checkpoint's window, when the output reaches the span's end; shorter output passes.
    pub fn check_span_end(&self, out: &[u8]) -> Result<(), ResumeError> {
        let Some(end) = &self.span_end else { return Ok(()) };
        let Ok(len) = usize::try_from(end.len) else { return Ok(()) };
        if out.len() < len {
            return Ok(());
        }
        let k = end.window.len().min(len);
        let (tail, window) = (&out[len - k..len], &end.window[end.window.len() - k..]);
        // A window taken soon after a gzip member boundary is zero-filled at the front (a
        // member cannot refer to the one before it), so only its bytes after the fill must match.
        let same = tail.iter().rev().zip(window.iter().rev()).take_while(|(a, b)| a == b).count();
        if same == k || window[..k - same].iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(ResumeError::WindowMismatch { len: end.len })
        }
    }
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume").field("bits", &self.bits).field("window", &format_args!("{} bytes", self.window.len())).finish()
    }
}

/// Why bytes could not be produced from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Inflate(#[from] InflateError),
    #[error("the compressed bytes end {missing} bytes short of the request")]
    Truncated { missing: u64 },
    #[error("{0}")]
    Framing(String),
    #[error("the {len} bytes inflated up to the next checkpoint do not end with its window: the zTOC's checkpoint windows are wrong")]
    WindowMismatch { len: u64 },
}

/// Fills `out` with the bytes that start `skip` bytes after the checkpoint. `data` is the
/// compressed stream from the checkpoint's fetch start (one byte early when it has leftover
/// bits). A gzip member that ends inside `data` is followed into the next one (trailer and
/// header skipped, window empty), as the stream itself does. Inflation stops as soon as `out`
/// is full.
pub fn resume_inflate(resume: &Resume, data: &[u8], skip: u64, out: &mut [u8]) -> Result<(), ResumeError> {
    inflate_from_checkpoint(resume.bits, &resume.window, data, skip, out)
}

/// [`resume_inflate`] with the checkpoint's parts borrowed (a zTOC's own checkpoint, not copied).
pub fn inflate_from_checkpoint(bits: u8, window: &[u8], mut data: &[u8], mut skip: u64, out: &mut [u8]) -> Result<(), ResumeError> {
    let mut inflater = RawInflater::new();
    if bits > 7 {
        return Err(InflateError(format!("{bits} leftover bits (at most 7)")).into());
    }
    if bits != 0 {
        let Some((&first, rest)) = data.split_first() else {
            return Err(ResumeError::Truncated { missing: out.len() as u64 });
        };
        inflater.prime(bits, first >> (8 - bits))?;
        data = rest;
    }
    inflater.set_dictionary(window)?;
    let mut discard = vec![0u8; WINDOW_SIZE];
    let mut written = 0usize;
    while written < out.len() {
        let target: &mut [u8] = if skip > 0 {
            let n = skip.min(discard.len() as u64) as usize;
            &mut discard[..n]
        } else {
            &mut out[written..]
        };
        let step = inflater.inflate(data, target, false)?;
        data = &data[step.consumed..];
        if skip > 0 {
            skip -= step.produced as u64;
        } else {
            written += step.produced;
        }
        let missing = || ResumeError::Truncated { missing: (out.len() - written) as u64 + skip };
        if step.status == Status::StreamEnd {
            data = next_member(data).map_err(ResumeError::Framing)?;
            if data.is_empty() && written < out.len() {
                return Err(missing());
            }
            inflater.reset();
        } else if step.consumed == 0 && step.produced == 0 {
            return Err(missing());
        }
    }
    Ok(())
}

/// Skips a member's 8-byte trailer and the next member's header; empty at the blob's end.
fn next_member(data: &[u8]) -> Result<&[u8], String> {
    let rest = data.get(8..).unwrap_or_default();
    if rest.len() < 10 {
        return Ok(&[]);
    }
    if rest[0] != 0x1f || rest[1] != 0x8b || rest[2] != 8 {
        return Err("bytes after a gzip member are not another gzip member".into());
    }
    let flags = rest[3];
    let mut at = 10usize;
    if flags & 4 != 0 {
        let len = rest.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or("short FEXTRA")?;
        at += 2 + len;
    }
    for flag in [8u8, 16] {
        if flags & flag != 0 {
            let end = rest.get(at..).and_then(|r| r.iter().position(|&b| b == 0)).ok_or("unterminated gzip header string")?;
            at += end + 1;
        }
    }
    if flags & 2 != 0 {
        at += 2;
    }
    rest.get(at..).ok_or_else(|| "the blob ends inside a gzip header".to_owned())
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
