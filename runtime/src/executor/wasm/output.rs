//! The guest's stdout and stderr: captured up to a cap, forwarded live while under it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::executor::{OutputSink, OutputStream as Stream};

/// How much the guest may hand over in one write. Each write is copied out of guest
/// memory into one buffer, so this bounds that transient allocation, whatever the cap.
const WRITE_PERMIT: usize = 1 << 20;

/// What a [`CappedOutput`] kept.
#[derive(Debug, Default)]
pub(super) struct Captured {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

/// One output stream of one job. The first `cap` bytes are kept and sent to the live
/// sink; past them the stream is flagged truncated and further bytes are dropped, while
/// the guest is told every write succeeded, so it runs on with bounded host memory.
///
/// Cheap to clone: clones share the buffer (WASI may open a stream several times).
#[derive(Clone)]
pub(super) struct CappedOutput {
    shared: Arc<Shared>,
}

struct Shared {
    stream: Stream,
    cap: usize,
    live: Arc<dyn OutputSink>,
    captured: Mutex<Captured>,
}

impl CappedOutput {
    pub(super) fn new(stream: Stream, cap: usize, live: Arc<dyn OutputSink>) -> CappedOutput {
        CappedOutput {
            shared: Arc::new(Shared {
                stream,
                cap,
                live,
                captured: Mutex::new(Captured::default()),
            }),
        }
    }

    fn push(&self, data: &[u8]) {
        let shared = &*self.shared;
        let mut captured = lock(&shared.captured);
        let keep = data.len().min(shared.cap.saturating_sub(captured.bytes.len()));
        if keep > 0 {
            captured.bytes.extend_from_slice(&data[..keep]);
            // Under the lock, so that live chunks arrive in write order.
            shared.live.chunk(shared.stream, &data[..keep]);
        }
        if keep < data.len() {
            captured.truncated = true;
        }
    }

    /// Takes what was kept so far (the guest is done with the stream by then).
    pub(super) fn take(&self) -> Captured {
        std::mem::take(&mut *lock(&self.shared.captured))
    }
}

/// A panic while holding this lock cannot leave the buffer inconsistent (each push is
/// one extend), so a poisoned lock is used as is.
fn lock(m: &Mutex<Captured>) -> MutexGuard<'_, Captured> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    /// Always ready: writes never wait.
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::NoLiveOutput;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<u8>>);

    impl OutputSink for Recorder {
        fn chunk(&self, _: Stream, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    #[test]
    fn keeps_the_first_cap_bytes_and_flags_the_rest() {
        let live = Arc::new(Recorder::default());
        let mut out = CappedOutput::new(Stream::Stdout, 5, live.clone());
        out.write(Bytes::from_static(b"abc")).unwrap();
        out.write(Bytes::from_static(b"defgh")).unwrap();
        out.write(Bytes::from_static(b"ij")).unwrap();
        let captured = out.take();
        assert_eq!(captured.bytes, b"abcde");
        assert!(captured.truncated);
        assert_eq!(*live.0.lock().unwrap(), b"abcde");
    }

    #[test]
    fn exactly_cap_bytes_is_not_truncated() {
        let mut out = CappedOutput::new(Stream::Stderr, 3, Arc::new(NoLiveOutput));
        out.write(Bytes::from_static(b"abc")).unwrap();
        out.write(Bytes::new()).unwrap();
        let captured = out.take();
        assert_eq!(captured.bytes, b"abc");
        assert!(!captured.truncated);
    }
}
