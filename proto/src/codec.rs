//! The gRPC codec of the `safeguarding.v1` services: prost's, except that bytes which do not decode as the expected
//! message are answered with `INVALID_ARGUMENT` (the caller sent something wrong) instead of tonic's default
//! `INTERNAL` (which would blame the broker).

use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost encoding and decoding with decode failures reported as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct StrictProstCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder { inner: self.inner.decoder() }
    }
}

/// Decodes with prost; a failure becomes `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictProstDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "the request is not a valid `safeguarding.v1` protobuf message: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
