//! A connection's stream as hyper writes to it: small vectored writes over
//! TLS go to rustls as one slice.
//!
//! hyper writes a request as two slices, its head and the payload. rustls
//! copies the slices of a vectored write into one record anyway, but
//! collects them into a `Vec` first: an allocation a request. Up to
//! [`FLATTEN_UP_TO`] bytes, the slices are copied here into a buffer kept
//! with the connection and handed over as one; a larger write goes as it
//! is, so a large payload is not copied twice. Plain TCP takes vectored
//! writes as they are (`writev`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Writes up to this many bytes are flattened: one TLS record's worth of
/// plaintext (16 KiB), where the copy costs less than the allocation it
/// saves.
const FLATTEN_UP_TO: usize = 16 * 1024;

pub type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// [`Stream`], with the buffer its small vectored writes are flattened in.
pub struct Flattened {
    stream: Stream,
    /// Reused from one write to the next: it grows to the largest write
    /// flattened so far, at most [`FLATTEN_UP_TO`].
    flat: Vec<u8>,
}

impl Flattened {
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            flat: Vec::new(),
        }
    }
}

impl Read for Flattened {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl Write for Flattened {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let tls = matches!(this.stream, MaybeHttpsStream::Https(_));
        if !tls || bufs.len() < 2 {
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if total > FLATTEN_UP_TO {
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        }
        this.flat.clear();
        for buf in bufs {
            this.flat.extend_from_slice(buf);
        }
        // A write that takes part of the bytes took the first ones, as a
        // vectored write would have.
        Pin::new(&mut this.stream).poll_write(cx, &this.flat)
    }
}
