//! Message compression on the edge→cloud call, and counting what a call really sends.
//!
//! Cut tensors travel with standard gRPC message compression (`grpc-encoding: zstd` or `gzip`),
//! so any v2 client or server that speaks it interoperates, and one that does not is served
//! uncompressed. Compression happens inside tonic's encoder, after the message is built; the
//! bytes a call puts on the wire are therefore counted below the encoder, on the HTTP/2 body
//! ([`Metered`]), per call ([`SentBytes`]).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codec::CompressionEncoding;
use tonic::codegen::{http, Body as HttpBody, Service};

/// How forwarded cut tensors are compressed (`--wire-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireCompression {
    /// zstd towards a cloud on another host; nothing towards a loopback address, where the
    /// compression would cost more CPU than the bytes it saves.
    Auto,
    /// zstd (level 3): the best ratio per CPU second of the two.
    Zstd,
    /// gzip (level 6), for peers that lack zstd.
    Gzip,
    /// Uncompressed.
    None,
}

impl WireCompression {
    /// The encoding to send to a cloud at `ip` (`None`: uncompressed).
    pub fn encoding_for(self, ip: IpAddr) -> Option<CompressionEncoding> {
        match self {
            WireCompression::Auto if ip.is_loopback() => None,
            WireCompression::Auto | WireCompression::Zstd => Some(CompressionEncoding::Zstd),
            WireCompression::Gzip => Some(CompressionEncoding::Gzip),
            WireCompression::None => None,
        }
    }

    /// The flag value.
    pub fn label(self) -> &'static str {
        match self {
            WireCompression::Auto => "auto",
            WireCompression::Zstd => "zstd",
            WireCompression::Gzip => "gzip",
            WireCompression::None => "none",
        }
    }
}

/// The metric and log label of an encoding: zstd, gzip or none.
pub fn encoding_label(e: Option<CompressionEncoding>) -> &'static str {
    match e {
        Some(CompressionEncoding::Zstd) => "zstd",
        Some(CompressionEncoding::Gzip) => "gzip",
        _ => "none",
    }
}

/// The encodings a server accepts from its clients: both, so that a client with either (or
/// neither) is served.
pub const ACCEPTED: [CompressionEncoding; 2] = [CompressionEncoding::Zstd, CompressionEncoding::Gzip];

/// What a server that refused a compressed message says it accepts (its `grpc-accept-encoding`),
/// if the status is that refusal: `Some(encodings)`, possibly empty (identity only).
pub fn refused_encoding(status: &tonic::Status) -> Option<Vec<CompressionEncoding>> {
    if status.code() != tonic::Code::Unimplemented || !status.message().contains("compressed with") {
        return None;
    }
    let accepted = status.metadata().get("grpc-accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or("");
    Some(
        accepted
            .split(',')
            .filter_map(|e| match e.trim() {
                "zstd" => Some(CompressionEncoding::Zstd),
                "gzip" => Some(CompressionEncoding::Gzip),
                _ => None,
            })
            .collect(),
    )
}

/// A per-call counter of the request body bytes a call sent (gRPC framing and compression
/// included): put it in the request's extensions and read it when the call is done.
#[derive(Debug, Clone, Default)]
pub struct SentBytes(Arc<AtomicU64>);

impl SentBytes {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gRPC channel that counts each request's body bytes into the request's [`SentBytes`]
/// extension, when it has one.
#[derive(Debug, Clone)]
pub struct Metered<S>(pub S);

impl<S> Service<http::Request<tonic::body::Body>> for Metered<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let req = match req.extensions().get::<SentBytes>().cloned() {
            Some(counter) => req.map(|inner| tonic::body::Body::new(CountingBody { inner, counter })),
            None => req,
        };
        self.0.call(req)
    }
}

struct CountingBody {
    inner: tonic::body::Body,
    counter: SentBytes,
}

impl HttpBody for CountingBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.0.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compresses_except_towards_loopback() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let far: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(WireCompression::Auto.encoding_for(lo), None);
        assert_eq!(WireCompression::Auto.encoding_for(lo6), None);
        assert_eq!(WireCompression::Auto.encoding_for(far), Some(CompressionEncoding::Zstd));
        assert_eq!(WireCompression::Gzip.encoding_for(lo), Some(CompressionEncoding::Gzip));
        assert_eq!(WireCompression::None.encoding_for(far), None);
        for c in [WireCompression::Auto, WireCompression::Zstd, WireCompression::Gzip, WireCompression::None] {
            assert_eq!(<WireCompression as clap::ValueEnum>::from_str(c.label(), false), Ok(c));
        }
    }

    #[test]
    fn a_refused_encoding_is_recognised_with_what_the_server_accepts() {
        let mut s = tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported");
        s.metadata_mut().insert("grpc-accept-encoding", "gzip".parse().unwrap());
        assert_eq!(refused_encoding(&s), Some(vec![CompressionEncoding::Gzip]));
        let bare = tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported");
        assert_eq!(refused_encoding(&bare), Some(vec![]));
        assert_eq!(refused_encoding(&tonic::Status::unimplemented("no such method")), None);
    }
}
