//! The [`Hub`]: live events of running jobs, for whoever follows or waits for them,
//! with a bounded replay of each running job's output for late followers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cloudpipe_types::JobStatus;
use tokio::sync::{broadcast, oneshot};

use crate::executor::{OutputSink, OutputStream};
use crate::model::{Job, JobId};

/// Something that happened to a job, for followers.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// The job changed status; terminal statuses carry the final job.
    Status(JobStatus, Option<Arc<Job>>),
    Output(OutputStream, Bytes),
}

/// Fan-out of a job's life to whoever follows it, only for jobs someone follows:
/// [`LiveEvent`]s for event streams, and the final job alone for waiters (which are
/// far more common, so they get a one-shot channel rather than a broadcast one).
///
/// The first [`REPLAY_BYTES`] of each output stream of a running job are kept, so that a
/// follower who arrives after the job started still sees its output from the start.
#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<JobId, broadcast::Sender<LiveEvent>>>,
    waiters: Mutex<HashMap<JobId, Vec<oneshot::Sender<Arc<Job>>>>>,
    /// Output so far of running jobs, each stream capped.
    replay: Mutex<HashMap<JobId, Replay>>,
}

/// The stdout and stderr a running job wrote so far (see [`REPLAY_BYTES`]).
type Replay = (Vec<u8>, Vec<u8>);

/// Bytes of each stream of a running job kept for late followers.
pub const REPLAY_BYTES: usize = 64 << 10;

/// A follower's end of a job's events; stops the fan-out when the last one drops.
pub struct Subscription {
    rx: Option<broadcast::Receiver<LiveEvent>>,
    hub: Arc<Hub>,
    id: JobId,
}

impl Subscription {
    /// The next event; `Some(Err(n))` if `n` events were missed (the follower lagged,
    /// and should re-read the job), `None` if the channel closed.
    pub async fn recv(&mut self) -> Option<Result<LiveEvent, u64>> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut map = self.hub.channels.lock().unwrap();
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.id);
        }
    }
}

/// Resolves with the job once it ends (see [`Hub::watch_end`]).
pub(super) struct EndWatch {
    pub(super) rx: oneshot::Receiver<Arc<Job>>,
    hub: Arc<Hub>,
    id: JobId,
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        self.rx.close();
        let mut map = self.hub.waiters.lock().unwrap();
        if let Some(list) = map.get_mut(&self.id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

impl Hub {
    /// Events of job `id` from now on. Subscribe *before* reading the job, so that
    /// nothing between the read and the subscription is missed.
    pub fn subscribe(self: &Arc<Self>, id: JobId) -> Subscription {
        self.subscribe_with_replay(id).0
    }

    /// [`Hub::subscribe`], with the output the job wrote before (up to [`REPLAY_BYTES`]
    /// per stream): nothing is in both.
    pub fn subscribe_with_replay(self: &Arc<Self>, id: JobId) -> (Subscription, Vec<LiveEvent>) {
        let mut channels = self.channels.lock().unwrap();
        let rx = channels.entry(id).or_insert_with(|| broadcast::channel(256).0).subscribe();
        // Output is published under the channels' lock: the replay and the live
        // events meet without a gap or an overlap.
        let mut replay = Vec::new();
        if let Some((out, err)) = self.replay.lock().unwrap().get(&id) {
            for (stream, bytes) in [(OutputStream::Stdout, out), (OutputStream::Stderr, err)] {
                if !bytes.is_empty() {
                    replay.push(LiveEvent::Output(stream, Bytes::copy_from_slice(bytes)));
                }
            }
        }
        drop(channels);
        (Subscription { rx: Some(rx), hub: self.clone(), id }, replay)
    }

    pub(super) fn started(&self, id: JobId) {
        self.replay.lock().unwrap().insert(id, Default::default());
    }

    pub(super) fn output(&self, id: JobId, stream: OutputStream, data: &[u8]) {
        let channels = self.channels.lock().unwrap();
        if let Some((out, err)) = self.replay.lock().unwrap().get_mut(&id) {
            let kept = if stream == OutputStream::Stdout { out } else { err };
            let room = REPLAY_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
        if let Some(tx) = channels.get(&id) {
            let _ = tx.send(LiveEvent::Output(stream, Bytes::copy_from_slice(data)));
        }
    }

    /// Whether anyone here waits for or follows job `id`.
    pub(super) fn watched(&self, id: JobId) -> bool {
        self.waiters.lock().unwrap().contains_key(&id)
            || self.channels.lock().unwrap().contains_key(&id)
    }

    pub(super) fn watch_end(self: &Arc<Self>, id: JobId) -> EndWatch {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().entry(id).or_default().push(tx);
        EndWatch { rx, hub: self.clone(), id }
    }

    pub(super) fn publish(&self, id: JobId, ev: impl FnOnce() -> LiveEvent) {
        let map = self.channels.lock().unwrap();
        if let Some(tx) = map.get(&id) {
            let _ = tx.send(ev());
        }
    }

    /// The job ended: tell its waiters and followers.
    pub(super) fn finished(&self, job: Job) {
        self.replay.lock().unwrap().remove(&job.id);
        let job = Arc::new(job);
        let waiters = self.waiters.lock().unwrap().remove(&job.id);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(job.clone());
        }
        self.publish(job.id, || LiveEvent::Status(job.status, Some(job.clone())));
    }

    /// The job's attempt went back to the queue unrecorded: its output so far goes.
    pub(super) fn discard_replay(&self, id: JobId) {
        self.replay.lock().unwrap().remove(&id);
    }
}

/// Where an executor writes a running job's output: into the [`Hub`].
pub(super) struct LiveSink {
    pub(super) hub: Arc<Hub>,
    pub(super) id: JobId,
}

impl OutputSink for LiveSink {
    fn chunk(&self, stream: OutputStream, data: &[u8]) {
        self.hub.output(self.id, stream, data);
    }
}
