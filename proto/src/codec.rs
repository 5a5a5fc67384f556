//! The protobuf codec of every `ferry.v1` server and client: tonic-prost's
//! ([`tonic_prost::ProstCodec`]), except that a message that does not decode (malformed
//! protobuf, a string field that is not UTF-8) is `InvalidArgument`, the sender's fault,
//! instead of tonic-prost's `Internal`. tonic-prost-build generates the services with it
//! (`codec_path` in `build.rs`).
//!
//! Not covered, because tonic answers before any codec runs: a request with no message at
//! all (`Internal`, "Missing request message.") and a message over the size limit
//! (`OutOfRange`).

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A [`tonic::codec::Codec`] encoding `T` and decoding `U` with prost, decode errors as
/// `InvalidArgument` (see the module docs).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// Decodes `U` with prost; a message that does not decode is `InvalidArgument` with
/// prost's description (the message and field, e.g. `RunBackupRequest.job_id: invalid
/// string value: data is not UTF-8 encoded`).
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|e| Status::invalid_argument(e.message().to_owned()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
