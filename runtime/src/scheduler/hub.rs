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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::job::tests::queued_job;

    fn replayed(events: &[LiveEvent]) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for ev in events {
            match ev {
                LiveEvent::Output(OutputStream::Stdout, b) => out.extend_from_slice(b),
                LiveEvent::Output(OutputStream::Stderr, b) => err.extend_from_slice(b),
                LiveEvent::Status(..) => panic!("a replay holds output only"),
            }
        }
        (out, err)
    }

    #[test]
    fn the_replay_keeps_the_first_bytes_of_each_stream_up_to_its_bound() {
        let hub = Arc::new(Hub::default());
        let id = JobId::new();
        hub.started(id);
        let chunk: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        hub.output(id, OutputStream::Stdout, &chunk);
        hub.output(id, OutputStream::Stdout, &chunk);
        hub.output(id, OutputStream::Stdout, b"dropped");
        hub.output(id, OutputStream::Stderr, b"warn");
        let (_sub, replay) = hub.subscribe_with_replay(id);
        let (out, err) = replayed(&replay);
        assert_eq!(out.len(), REPLAY_BYTES);
        assert_eq!(&out[..40_000], &chunk[..]);
        assert_eq!(&out[40_000..], &chunk[..REPLAY_BYTES - 40_000]);
        assert_eq!(err, b"warn");
    }

    #[test]
    fn output_of_a_job_not_started_here_is_not_kept() {
        let hub = Arc::new(Hub::default());
        let id = JobId::new();
        hub.output(id, OutputStream::Stdout, b"x");
        assert!(hub.subscribe_with_replay(id).1.is_empty());
    }

    #[tokio::test]
    async fn a_follower_gets_the_replay_then_only_what_comes_after() {
        let hub = Arc::new(Hub::default());
        let id = JobId::new();
        hub.started(id);
        hub.output(id, OutputStream::Stdout, b"before ");
        let (mut sub, replay) = hub.subscribe_with_replay(id);
        hub.output(id, OutputStream::Stdout, b"after");
        assert_eq!(replayed(&replay).0, b"before ");
        match sub.recv().await {
            Some(Ok(LiveEvent::Output(OutputStream::Stdout, b))) => assert_eq!(&b[..], b"after"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_end_reaches_waiters_and_followers_and_clears_the_replay() {
        let hub = Arc::new(Hub::default());
        let mut job = queued_job("f");
        job.status = JobStatus::Succeeded;
        hub.started(job.id);
        hub.output(job.id, OutputStream::Stdout, b"out");
        let mut end = hub.watch_end(job.id);
        let mut sub = hub.subscribe(job.id);
        assert!(hub.watched(job.id));
        hub.finished(job.clone());
        assert_eq!((&mut end.rx).await.unwrap().id, job.id);
        match sub.recv().await {
            Some(Ok(LiveEvent::Status(JobStatus::Succeeded, Some(done)))) => {
                assert_eq!(done.id, job.id)
            }
            other => panic!("{other:?}"),
        }
        assert!(hub.subscribe_with_replay(job.id).1.is_empty(), "replay gone");
    }

    #[test]
    fn dropping_the_last_follower_or_waiter_stops_the_fan_out() {
        let hub = Arc::new(Hub::default());
        let id = JobId::new();
        let (a, b) = (hub.subscribe(id), hub.subscribe(id));
        drop(a);
        assert!(hub.watched(id));
        drop(b);
        assert!(!hub.watched(id));
        let end = hub.watch_end(id);
        assert!(hub.watched(id));
        drop(end);
        assert!(!hub.watched(id));
    }

    #[test]
    fn a_discarded_replay_is_gone() {
        let hub = Arc::new(Hub::default());
        let id = JobId::new();
        hub.started(id);
        hub.output(id, OutputStream::Stderr, b"x");
        hub.discard_replay(id);
        assert!(hub.subscribe_with_replay(id).1.is_empty());
    }
}
