//! Group commit: one writer thread per store turns concurrent writes into few commits.
//!
//! Each write is sent with a reply channel. The thread takes the first write, then
//! whatever else is already queued (up to [`MAX_GROUP`]), runs them all in one
//! transaction of the backend and answers all of them once that transaction is on disk.
//! It never waits for more writes to arrive: while one commit syncs, the next group
//! gathers by itself, so a lone write pays one sync and a burst of N writes pays about
//! N / group size.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, anyhow};
use tokio::sync::oneshot;

use super::Result;
use super::keyspace::{self, Reply, WriteOp};
use super::kv::KvBackend;
use super::space::{SpaceGuard, WriteKind};

/// Most writes committed together: bounds the latency a group adds to its first write.
const MAX_GROUP: usize = 128;

type Request = (WriteOp, oneshot::Sender<Result<Reply>>);

/// The handle of a store's writer thread. Dropping it lets the thread finish its
/// current group and waits for it to stop (so that the database is closed after).
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn spawn<B: KvBackend>(
        backend: Arc<B>,
        space: Option<Arc<SpaceGuard>>,
    ) -> Result<Writer> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name(format!("cloudpipe-store-{}", backend.name()))
            .spawn(move || run(&*backend, space.as_deref(), rx))
            .context("starting the store writer thread")?;
        Ok(Writer { tx: Some(tx), thread: Some(thread) })
    }

    /// Sends one write and waits until it is durable (or failed).
    pub(crate) async fn submit(&self, op: WriteOp) -> Result<Reply> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let tx = self.tx.as_ref().context("store is closed")?;
        tx.send((op, reply_tx)).map_err(|_| anyhow!("store writer has stopped"))?;
        reply_rx.await.map_err(|_| anyhow!("store writer stopped before answering"))?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            // A panic of the writer was already reported to the waiting callers.
            let _ = thread.join();
        }
    }
}

fn run<B: KvBackend>(backend: &B, space: Option<&SpaceGuard>, rx: mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(req) => group.push(req),
                Err(_) => break,
            }
        }
        if let Some(space) = space {
            group = refuse_without_space(space, group);
            if group.is_empty() {
                continue;
            }
        }
        commit_group(backend, group);
    }
}

/// Answers the writes that the free space does not allow (see the `space` module) and
/// returns the others.
fn refuse_without_space(space: &SpaceGuard, group: Vec<Request>) -> Vec<Request> {
    let mut kept = Vec::with_capacity(group.len());
    for (op, reply_tx) in group {
        match space.admit(WriteKind::of(&op)) {
            Ok(()) => kept.push((op, reply_tx)),
            Err(full) => {
                let _ = reply_tx.send(Err(anyhow::Error::new(full)));
            }
        }
    }
    kept
}

/// Commits a group, answering every write. A write that fails by itself (a record that
/// does not decode, a bad argument) gets its error and the group is retried without
/// it; a failed commit (I/O) fails every write of the group.
fn commit_group<B: KvBackend>(backend: &B, mut group: Vec<Request>) {
    let _span = tracing::debug_span!("runtime.store_commit", writes = group.len()).entered();
    loop {
        let mut failed: Option<(usize, anyhow::Error)> = None;
        let result = backend.write(|tx| {
            let mut replies = Vec::with_capacity(group.len());
            for (i, (op, _)) in group.iter().enumerate() {
                match keyspace::apply(op, tx) {
                    Ok(reply) => replies.push(reply),
                    Err(e) => {
                        failed = Some((i, e));
                        return Err(anyhow!("write {i} of the group failed"));
                    }
                }
            }
            Ok(replies)
        });
        if let Some((i, e)) = failed {
            let (_, reply_tx) = group.remove(i);
            let _ = reply_tx.send(Err(e));
            if group.is_empty() {
                return;
            }
            continue;
        }
        match result {
            Ok(replies) => {
                for ((_, reply_tx), reply) in group.into_iter().zip(replies) {
                    let _ = reply_tx.send(Ok(reply));
                }
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "store commit failed");
                for (_, reply_tx) in group {
                    let _ = reply_tx.send(Err(anyhow!("store commit failed: {e:#}")));
                }
            }
        }
        return;
    }
}
