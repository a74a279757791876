//! A gRPC codec whose messages are the encoded protobuf bytes themselves.
//!
//! Why not decode and re-encode: a proxy that parses messages into generated types and
//! serializes them again only forwards what its own copy of the `.proto` knows. Fields added
//! by a newer kubelet or containerd (CRI grows every release) would be dropped silently, and
//! even known fields could change encoding (order, packed repeated fields, default values).
//! With [`RawCodec`] the backend receives exactly the bytes kubelet framed, and kubelet
//! exactly the bytes containerd answered, whatever the CRI version on either side; the proxy
//! needs no CRI protos at all (it decodes a private copy of `PullImage` only to learn the
//! credentials, see [`crate::cri`]).

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Passes gRPC message payloads through as [`Bytes`], without looking at them.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // tonic hands the decoder exactly one whole message (the gRPC framing is removed).
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
