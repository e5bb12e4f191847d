//! [`Interrupts`]: Ctrl-C as a stream of events rather than the end of the process.

use anyhow::Context;

/// Ctrl-C (SIGINT), caught from the moment this exists: a job must never be left
/// running because the signal came between its submit and the wait for it.
pub struct Interrupts {
    #[cfg(unix)]
    sig: tokio::signal::unix::Signal,
}

impl Interrupts {
    pub fn catch() -> anyhow::Result<Interrupts> {
        #[cfg(unix)]
        {
            let sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the Ctrl-C handler")?;
            Ok(Interrupts { sig })
        }
        #[cfg(not(unix))]
        Ok(Interrupts {})
    }

    /// Resolves at the next Ctrl-C.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        self.sig.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// Runs `fut` to its end whatever Ctrl-Cs come meanwhile (a request that creates
    /// something must not be dropped half-way): its output, and whether one came.
    pub async fn finish<T>(&mut self, fut: impl std::future::Future<Output = T>) -> (T, bool) {
        tokio::pin!(fut);
        let mut interrupted = false;
        loop {
            tokio::select! {
                out = &mut fut => return (out, interrupted),
                () = self.next() => interrupted = true,
            }
        }
    }
}
