//! Where each input of a batch is: a pure state machine, fed by the driver with what
//! happened to the inputs' jobs, and rebuilt from the jobs alone after a restart.
//! No I/O: everything here is decided from its arguments.

use cloudpipe_types::{BatchCounts, JobStatus};

use crate::model::{Job, JobId};

/// Where one input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Input {
    Pending,
    /// Handed to the scheduler; its job id is not known yet.
    Launching,
    Running(JobId),
    Ok,
    Failed,
    TimedOut,
    Cancelled,
}

/// The progress of a batch's inputs in its current round.
#[derive(Debug)]
pub(super) struct Progress {
    inputs: Vec<Input>,
    /// Tries of each input in the current round.
    tries: Vec<u32>,
    /// Tries an input gets per round (`retries + 1`).
    allowed: u32,
    /// Inputs failed in a row that stop the batch (0: never).
    strikes: u32,
    /// Inputs that ended failed in a row.
    failures_in_a_row: u32,
    struck: bool,
    /// The run time of the batch's jobs, summed.
    job_micros: u64,
}

impl Progress {
    /// The progress of a batch of `total` inputs as its jobs (`jobs`, oldest first)
    /// tell it: each input is where its latest job is. An input failed in an earlier
    /// round (`round` is the current one) is pending again; with `resuming`, so is
    /// one whose job was cancelled.
    pub fn rebuild<'a>(
        total: usize,
        round: u32,
        retries: u32,
        strikes: u32,
        resuming: bool,
        jobs: impl IntoIterator<Item = &'a Job>,
    ) -> Progress {
        let mut p = Progress {
            inputs: vec![Input::Pending; total],
            tries: vec![0; total],
            allowed: retries + 1,
            strikes,
            failures_in_a_row: 0,
            struck: false,
            job_micros: 0,
        };
        let mut latest: Vec<Option<(JobId, JobStatus, u32)>> = vec![None; total];
        for job in jobs {
            let Some(b) = &job.batch else { continue };
            let Some(slot) = latest.get_mut(b.index as usize) else { continue };
            p.job_micros += run_micros(job);
            if b.round == round {
                p.tries[b.index as usize] += 1;
            }
            *slot = Some((job.id, job.status, b.round));
        }
        for (i, job) in latest.into_iter().enumerate() {
            let Some((id, status, job_round)) = job else { continue };
            let this_round = job_round == round;
            p.inputs[i] = match status {
                JobStatus::Queued | JobStatus::Running => Input::Running(id),
                JobStatus::Succeeded => Input::Ok,
                JobStatus::Cancelled if resuming => Input::Pending,
                JobStatus::Cancelled => Input::Cancelled,
                _ if !this_round || p.tries[i] < p.allowed => Input::Pending,
                JobStatus::TimedOut => Input::TimedOut,
                _ => Input::Failed,
            };
        }
        p
    }

    pub fn counts(&self) -> BatchCounts {
        let mut c = BatchCounts::default();
        for i in &self.inputs {
            match i {
                Input::Pending => c.pending += 1,
                Input::Launching | Input::Running(_) => c.running += 1,
                Input::Ok => c.ok += 1,
                Input::Failed => c.failed += 1,
                Input::TimedOut => c.timed_out += 1,
                Input::Cancelled => c.cancelled += 1,
            }
        }
        c
    }

    pub fn job_micros(&self) -> u64 {
        self.job_micros
    }

    /// Whether the strikes stopped the batch.
    pub fn struck(&self) -> bool {
        self.struck
    }

    /// The inputs whose job is queued or running, with it.
    pub fn running_jobs(&self) -> Vec<(usize, JobId)> {
        let running = |(i, s): (usize, &Input)| match s {
            Input::Running(id) => Some((i, *id)),
            _ => None,
        };
        self.inputs.iter().enumerate().filter_map(running).collect()
    }

    /// The first pending input at or after `from`, wrapping around.
    pub fn next_pending(&self, from: usize) -> Option<usize> {
        let n = self.inputs.len();
        (0..n).map(|k| (from + k) % n).find(|&k| self.inputs[k] == Input::Pending)
    }

    /// Input `i` is handed to the scheduler.
    pub fn launching(&mut self, i: usize) {
        self.inputs[i] = Input::Launching;
    }

    /// Input `i`'s job was submitted and has not ended yet.
    pub fn launched(&mut self, i: usize, id: JobId) {
        self.inputs[i] = Input::Running(id);
    }

    /// Input `i` goes back to pending untried (its account is at its quota or
    /// disabled: nothing ran).
    pub fn put_back(&mut self, i: usize) {
        self.inputs[i] = Input::Pending;
    }

    /// Input `i`'s job ended as `job` says. `cancelling`: the batch is being
    /// cancelled, so a cancelled job leaves its input pending (to resume).
    pub fn ended(&mut self, i: usize, job: &Job, cancelling: bool) {
        self.job_micros += run_micros(job);
        self.tries[i] += 1;
        self.inputs[i] = match job.status {
            JobStatus::Succeeded => {
                self.failures_in_a_row = 0;
                Input::Ok
            }
            JobStatus::Cancelled if cancelling => Input::Pending,
            JobStatus::Cancelled => Input::Cancelled,
            _ if self.tries[i] < self.allowed => Input::Pending,
            JobStatus::TimedOut => self.failed(Input::TimedOut),
            _ => self.failed(Input::Failed),
        };
    }

    /// Input `i` could not be made a job (the spec was refused): failed, no retry.
    pub fn refused(&mut self, i: usize) {
        self.tries[i] = self.allowed;
        self.inputs[i] = self.failed(Input::Failed);
    }

    fn failed(&mut self, end: Input) -> Input {
        self.failures_in_a_row += 1;
        if self.strikes > 0 && self.failures_in_a_row >= self.strikes {
            self.struck = true;
        }
        end
    }
}

/// The run time of a job's last attempt.
fn run_micros(job: &Job) -> u64 {
    match (job.started_at, job.finished_at) {
        (Some(s), Some(f)) => f.saturating_sub(s),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BatchRef;
    use crate::model::job::tests::queued_job;

    fn job(index: u64, round: u32, status: JobStatus) -> Job {
        let mut j = queued_job("f");
        j.batch = Some(BatchRef { id: "b".into(), index, round });
        j.status = status;
        if status.is_terminal() {
            j.started_at = Some(1_000);
            j.finished_at = Some(3_000);
        }
        j
    }

    fn counts(p: &Progress) -> [u64; 6] {
        let c = p.counts();
        [c.pending, c.running, c.ok, c.failed, c.timed_out, c.cancelled]
    }

    #[test]
    fn a_fresh_batch_is_all_pending() {
        let p = Progress::rebuild(3, 0, 0, 0, false, []);
        assert_eq!(counts(&p), [3, 0, 0, 0, 0, 0]);
        assert_eq!(p.next_pending(2), Some(2));
    }

    #[test]
    fn rebuild_takes_each_inputs_latest_job() {
        let jobs = [
            job(0, 0, JobStatus::Failed),
            job(0, 0, JobStatus::Succeeded),
            job(1, 0, JobStatus::Running),
            job(2, 0, JobStatus::TimedOut),
            job(3, 0, JobStatus::Cancelled),
        ];
        let p = Progress::rebuild(5, 0, 0, 0, false, &jobs);
        assert_eq!(counts(&p), [1, 1, 1, 0, 1, 1]);
        assert_eq!(p.running_jobs(), vec![(1, jobs[2].id)]);
        assert_eq!(p.job_micros(), 4 * 2_000);
        // Resuming: the cancelled input is pending again.
        let p = Progress::rebuild(5, 0, 0, 0, true, &jobs);
        assert_eq!(counts(&p), [2, 1, 1, 0, 1, 0]);
    }

    #[test]
    fn rebuild_gives_failed_inputs_their_remaining_tries() {
        let jobs = [job(0, 0, JobStatus::Failed), job(1, 0, JobStatus::Failed)];
        // One retry: each failed once, so both are pending.
        assert_eq!(counts(&Progress::rebuild(2, 0, 1, 0, false, &jobs)), [2, 0, 0, 0, 0, 0]);
        // No retries: both failed for good.
        assert_eq!(counts(&Progress::rebuild(2, 0, 0, 0, false, &jobs)), [0, 0, 0, 2, 0, 0]);
        // A new round: failures of the earlier round are pending again.
        assert_eq!(counts(&Progress::rebuild(2, 1, 0, 0, false, &jobs)), [2, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn inputs_out_of_range_or_without_a_batch_are_ignored() {
        let mut stray = queued_job("f");
        stray.status = JobStatus::Succeeded;
        let p = Progress::rebuild(1, 0, 0, 0, false, &[job(5, 0, JobStatus::Succeeded), stray]);
        assert_eq!(counts(&p), [1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_failed_job_is_retried_until_its_tries_run_out() {
        let mut p = Progress::rebuild(1, 0, 1, 0, false, []);
        p.launching(0);
        assert_eq!(counts(&p), [0, 1, 0, 0, 0, 0]);
        p.ended(0, &job(0, 0, JobStatus::Failed), false);
        assert_eq!(counts(&p), [1, 0, 0, 0, 0, 0], "one retry left");
        p.launching(0);
        p.ended(0, &job(0, 0, JobStatus::TimedOut), false);
        assert_eq!(counts(&p), [0, 0, 0, 0, 1, 0]);
        assert_eq!(p.next_pending(0), None);
    }

    #[test]
    fn strikes_stop_after_failures_in_a_row_and_a_success_resets_them() {
        let mut p = Progress::rebuild(4, 0, 0, 2, false, []);
        p.ended(0, &job(0, 0, JobStatus::Failed), false);
        p.ended(1, &job(1, 0, JobStatus::Succeeded), false);
        p.ended(2, &job(2, 0, JobStatus::Failed), false);
        assert!(!p.struck(), "the success between broke the run");
        p.refused(3);
        assert!(p.struck());
        assert_eq!(counts(&p), [0, 0, 1, 3, 0, 0]);
    }

    #[test]
    fn a_job_cancelled_by_the_batchs_cancel_leaves_its_input_pending() {
        let mut p = Progress::rebuild(2, 0, 0, 0, false, []);
        p.ended(0, &job(0, 0, JobStatus::Cancelled), true);
        p.ended(1, &job(1, 0, JobStatus::Cancelled), false);
        assert_eq!(counts(&p), [1, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn launched_and_put_back_inputs() {
        let mut p = Progress::rebuild(2, 0, 0, 0, false, []);
        let id = JobId::new();
        p.launching(0);
        p.launched(0, id);
        p.launching(1);
        p.put_back(1);
        assert_eq!(p.running_jobs(), vec![(0, id)]);
        assert_eq!(p.next_pending(0), Some(1));
        assert_eq!(p.job_micros(), 0);
    }
}
