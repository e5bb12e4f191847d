//! The conformance suite every [`Store`] backend passes: one generic async fn per
//! behaviour, and [`suite!`] to run them all as `#[tokio::test]`s of a backend:
//!
//! ```ignore
//! crate::store::conformance::suite!(redb, |dir| RedbStore::open(dir), Some(4.0));
//! ```
//!
//! The last argument bounds the size of the store's files after churn and a reopen,
//! as a multiple of the live data (`None`: only report it).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cloudpipe_types::{FunctionKind, JobStatus};

use super::{
    BatchCaps, BatchFilter, CreateBatch, FunctionMeta, Inserted, JobFilter, PutFunction, Recovery,
    Result, Retention, Store,
};
use crate::model::job::tests::queued_job;
use crate::model::{
    ADMIN, AccountRecord, BatchState, Job, JobId, JobOutcome, KeyRecord, Scope, now_micros,
};

/// Runs every conformance test against one backend. `$open` is a closure from a data
/// directory to the store; `$max_growth` is an `Option<f64>` (see the module docs).
macro_rules! suite {
    ($backend:ident, $open:expr, $max_growth:expr) => {
        mod conformance {
            #![allow(unused_imports)]
            use super::*;
            use crate::store::conformance as c;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        c::$name($open).await;
                    }
                };
            }

            case!(insert_then_get_round_trips);
            case!(idempotency_key_returns_the_existing_job_and_writes_nothing);
            case!(claim_takes_oldest_first_and_marks_them_running);
            case!(finish_writes_the_outcome_and_moves_the_counters);
            case!(finish_of_a_job_that_is_not_running_changes_nothing);
            case!(cancel_queued_cancels_only_queued_jobs);
            case!(recover_requeues_ahead_of_newer_jobs_and_exhausts_at_max_attempts);
            case!(job_inserted_running_is_counted_running_and_requeued_by_recover);
            case!(job_inserted_finished_is_counted_listed_and_purged);
            case!(release_requeues_a_running_job_without_counting_the_attempt);
            case!(list_filters_and_pages_newest_first);
            case!(purge_deletes_by_age_and_by_count_with_their_idempotency_keys);
            case!(retention_counts_each_account_apart_and_honours_its_quota);
            case!(put_function_keeps_the_first_created_at_and_the_name_points_at_the_newest);
            case!(delete_function_by_name_and_by_id);
            case!(settings_belong_to_the_name_and_survive_a_new_version);
            case!(data_survives_drop_and_reopen);
            case!(concurrent_inserts_all_land_and_counters_are_exact);
            case!(a_write_that_fails_alone_does_not_fail_its_group);
            case!(functions_are_isolated_between_accounts);
            case!(accounts_and_keys_round_trip);
            case!(idempotency_keys_are_per_account_and_active_jobs_are_listed);
            case!(every_list_filter_agrees_with_a_scan_after_purge_and_reopen);
            case!(claims_take_accounts_in_turn_and_each_account_first_in_first_out);
            case!(secrets_are_per_account_bounded_and_keep_their_first_time);
            case!(stdin_and_output_are_read_apart_and_lists_carry_neither);
            case!(batch_inputs_are_stored_apart_and_read_by_range);
            case!(batches_are_listed_per_account_newest_first_in_pages);
            case!(batch_caps_count_each_account_and_a_delete_frees_its_place);
            case!(put_batch_updates_only_what_exists_and_open_batches_follow_status);
            case!(purge_batches_deletes_stopped_ones_past_the_age_oldest_first);

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn reopened_store_after_churn_stays_near_live_data() {
                c::reopened_store_after_churn_stays_near_live_data(
                    $open,
                    stringify!($backend),
                    $max_growth,
                )
                .await;
            }
        }
    };
}
pub(crate) use suite;

/// `put_function` without a quota, for the cases that are not about accounts.
#[async_trait::async_trait]
trait Put {
    async fn put(&self, meta: FunctionMeta, binary: Bytes) -> Result<FunctionMeta>;
}

#[async_trait::async_trait]
impl<S: Store> Put for S {
    async fn put(&self, meta: FunctionMeta, binary: Bytes) -> Result<FunctionMeta> {
        match self.put_function(meta, binary, None).await? {
            PutFunction::Stored(m) => Ok(m),
            other => anyhow::bail!("not stored: {other:?}"),
        }
    }
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

pub(crate) fn succeeded(stdout: &[u8]) -> JobOutcome {
    JobOutcome {
        status: JobStatus::Succeeded,
        exit_code: Some(0),
        stdout: stdout.to_vec(),
        ..JobOutcome::default()
    }
}

/// A job as reads return it: without its stdin (only a claim reads that).
fn read_back(job: &Job) -> Job {
    Job { stdin: Vec::new(), ..job.clone() }
}

async fn counts<S: Store>(store: &S) -> Vec<(JobStatus, u64)> {
    let counts = store.count_jobs().await.unwrap();
    assert_eq!(counts.len(), JobStatus::ALL.len(), "every status is counted");
    counts.into_iter().filter(|(_, n)| *n > 0).collect()
}

async fn insert<S: Store>(store: &S, job: Job) -> Job {
    match store.insert_job(job).await.unwrap() {
        Inserted::Created(job) => job,
        Inserted::Existing(job) => panic!("expected a new job, got existing {}", job.id),
    }
}

pub(crate) async fn insert_then_get_round_trips<S: Store>(open: impl Fn(&Path) -> Result<S>) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut job = queued_job("hello");
    job.tags = vec!["t1".into()];
    job.env.insert("K".into(), "V".into());
    let created = insert(&store, job.clone()).await;
    assert_eq!(created, job);
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(read_back(&job)));
    assert_eq!(store.get_job(JobId::new()).await.unwrap(), None);
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 1)]);
    // Many at once: those that exist, whatever the order asked.
    let other = insert(&store, queued_job("other")).await;
    let mut got = store.get_jobs(&[other.id, JobId::new(), job.id]).await.unwrap();
    got.sort_by_key(|j| j.function.clone());
    assert_eq!(got, [read_back(&job), read_back(&other)]);
    assert_eq!(store.get_jobs(&[]).await.unwrap(), []);
}

pub(crate) async fn idempotency_key_returns_the_existing_job_and_writes_nothing<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut first = queued_job("f");
    first.idempotency_key = Some("key-1".into());
    insert(&store, first.clone()).await;

    let mut again = queued_job("other");
    again.idempotency_key = Some("key-1".into());
    let inserted = store.insert_job(again.clone()).await.unwrap();
    assert_eq!(inserted, Inserted::Existing(read_back(&first)));
    assert_eq!(store.get_job(again.id).await.unwrap(), None, "the second job is not written");
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 1)]);
    let claimed = store.claim_jobs(10, now_micros()).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [first.id]);

    // Still the same job once it has moved on.
    let inserted = store.insert_job(again).await.unwrap();
    assert_eq!(inserted.job().id, first.id);
    assert_eq!(inserted.job().status, JobStatus::Running);
}

pub(crate) async fn claim_takes_oldest_first_and_marks_them_running<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let jobs: Vec<Job> = (0..3).map(|_| queued_job("f")).collect();
    for job in &jobs {
        insert(&store, job.clone()).await;
    }
    assert_eq!(store.claim_jobs(0, 1).await.unwrap(), []);

    let now = now_micros();
    let first = store.claim_jobs(2, now).await.unwrap();
    assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), [jobs[0].id, jobs[1].id]);
    for job in &first {
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.attempts, 1);
        assert_eq!(job.started_at, Some(now));
        assert_eq!(job.stdin, queued_job("f").stdin, "a claim returns the stdin");
        assert_eq!(store.get_job(job.id).await.unwrap(), Some(read_back(job)));
    }
    let second = store.claim_jobs(10, now).await.unwrap();
    assert_eq!(second.iter().map(|j| j.id).collect::<Vec<_>>(), [jobs[2].id]);
    assert_eq!(store.claim_jobs(10, now).await.unwrap(), []);
    assert_eq!(counts(&store).await, [(JobStatus::Running, 3)]);
}

pub(crate) async fn finish_writes_the_outcome_and_moves_the_counters<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let job = insert(&store, queued_job("f")).await;
    insert(&store, queued_job("f")).await;
    store.claim_jobs(1, 100).await.unwrap();

    let done = store.finish_job(job.id, succeeded(b"out\x00\xff"), 200).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.stdout, b"out\x00\xff");
    assert_eq!(done.started_at, Some(100));
    assert_eq!(done.finished_at, Some(200));
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(done));
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 1), (JobStatus::Succeeded, 1)]);
}

pub(crate) async fn finish_of_a_job_that_is_not_running_changes_nothing<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let queued = insert(&store, queued_job("f")).await;
    let outcome = succeeded(b"x");

    assert_eq!(store.finish_job(JobId::new(), outcome.clone(), 5).await.unwrap(), None);
    let same = store.finish_job(queued.id, outcome.clone(), 5).await.unwrap();
    assert_eq!(same, Some(read_back(&queued)));
    assert_eq!(store.get_job(queued.id).await.unwrap(), Some(read_back(&queued)));

    store.claim_jobs(1, 10).await.unwrap();
    let failed = JobOutcome::error(JobStatus::Failed, "trap", "unreachable");
    let done = store.finish_job(queued.id, failed, 20).await.unwrap().unwrap();
    let again = store.finish_job(queued.id, outcome, 30).await.unwrap().unwrap();
    assert_eq!(again, done, "a terminal job keeps its first outcome");
    assert_eq!(again.error.unwrap().kind, "trap");
    assert_eq!(counts(&store).await, [(JobStatus::Failed, 1)]);
}

pub(crate) async fn cancel_queued_cancels_only_queued_jobs<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    insert(&store, queued_job("f")).await;
    let queued = insert(&store, queued_job("f")).await;
    let running = store.claim_jobs(1, 10).await.unwrap().pop().unwrap();
    assert_eq!(running.status, JobStatus::Running);

    let cancelled = store.cancel_queued_job(queued.id, 50).await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(cancelled.error.as_ref().unwrap().kind, "cancelled");
    assert_eq!(cancelled.finished_at, Some(50));
    assert_eq!(store.get_job(queued.id).await.unwrap(), Some(cancelled.clone()));
    assert_eq!(store.claim_jobs(10, 60).await.unwrap(), [], "no longer in the queue");

    let same = store.cancel_queued_job(running.id, 70).await.unwrap();
    assert_eq!(same, Some(read_back(&running)), "a running job is left as it is");
    let same = store.cancel_queued_job(queued.id, 80).await.unwrap();
    assert_eq!(same, Some(cancelled), "a cancelled job is left as it is");
    assert_eq!(store.cancel_queued_job(JobId::new(), 90).await.unwrap(), None);
    assert_eq!(counts(&store).await, [(JobStatus::Running, 1), (JobStatus::Cancelled, 1)]);
}

pub(crate) async fn recover_requeues_ahead_of_newer_jobs_and_exhausts_at_max_attempts<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut retry = queued_job("f");
    retry.max_attempts = 2;
    let mut last = queued_job("f");
    last.max_attempts = 1;
    insert(&store, retry.clone()).await;
    insert(&store, last.clone()).await;
    assert_eq!(store.claim_jobs(2, 10).await.unwrap().len(), 2);
    let newer = insert(&store, queued_job("f")).await;

    let recovery = store.recover(100).await.unwrap();
    assert_eq!(recovery, Recovery { requeued: 1, exhausted: 1 });
    let exhausted = store.get_job(last.id).await.unwrap().unwrap();
    assert_eq!(exhausted.status, JobStatus::Failed);
    assert_eq!(exhausted.attempts, 1);
    assert_eq!(exhausted.finished_at, Some(100));
    let error = exhausted.error.unwrap();
    assert_eq!(error.kind, "attempts_exhausted");
    assert!(error.message.contains("1 of 1 attempts"), "{}", error.message);
    let requeued = store.get_job(retry.id).await.unwrap().unwrap();
    assert_eq!((requeued.status, requeued.attempts), (JobStatus::Queued, 1));
    assert_eq!(
        counts(&store).await,
        [(JobStatus::Queued, 2), (JobStatus::Failed, 1)],
        "recovery moves the counters"
    );
    assert_eq!(store.recover(200).await.unwrap(), Recovery::default(), "nothing left to recover");

    let claimed = store.claim_jobs(10, 300).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [retry.id, newer.id]);
    assert_eq!(claimed[0].attempts, 2);

    // Its last attempt cut off too: now it is out of attempts.
    let recovery = store.recover(400).await.unwrap();
    assert_eq!(recovery, Recovery { requeued: 1, exhausted: 1 });
    let job = store.get_job(retry.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.error.unwrap().message.contains("2 of 2 attempts"));
}

pub(crate) async fn job_inserted_running_is_counted_running_and_requeued_by_recover<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut job = queued_job("f");
    job.status = JobStatus::Running;
    job.attempts = 1;
    job.started_at = Some(job.created_at);
    insert(&store, job.clone()).await;
    assert_eq!(counts(&store).await, [(JobStatus::Running, 1)]);
    assert_eq!(store.claim_jobs(10, 1).await.unwrap(), [], "not in the queue");

    assert_eq!(store.recover(5).await.unwrap(), Recovery { requeued: 1, exhausted: 0 });
    let claimed = store.claim_jobs(10, 6).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].id, claimed[0].attempts), (job.id, 2));

    // And it can finish like any other.
    let done = store.finish_job(job.id, succeeded(b""), 7).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(counts(&store).await, [(JobStatus::Succeeded, 1)]);
}

pub(crate) async fn job_inserted_finished_is_counted_listed_and_purged<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut job = queued_job("f");
    job.status = JobStatus::Running;
    job.attempts = 1;
    job.started_at = Some(10);
    job.finish(succeeded(b"out"), 20);
    insert(&store, job.clone()).await;
    assert_eq!(store.get_job(job.id).await.unwrap().unwrap(), read_back(&job));
    assert_eq!(counts(&store).await, [(JobStatus::Succeeded, 1)]);
    assert_eq!(store.claim_jobs(10, 30).await.unwrap(), [], "not in the queue");
    assert_eq!(store.recover(30).await.unwrap(), Recovery::default(), "not running");
    let filter =
        JobFilter { status: Some(JobStatus::Succeeded), limit: 10, ..JobFilter::default() };
    assert_eq!(store.list_jobs(&filter).await.unwrap().len(), 1);
    let by_count = Retention { max_age_micros: u64::MAX, max_finished_per_account: 0 };
    assert_eq!(store.purge_finished(by_count, 40, 10).await.unwrap(), 1);
    assert_eq!(store.get_job(job.id).await.unwrap(), None);
    assert_eq!(counts(&store).await, []);
}

pub(crate) async fn release_requeues_a_running_job_without_counting_the_attempt<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let first = insert(&store, queued_job("f")).await;
    let newer = insert(&store, queued_job("f")).await;
    assert_eq!(store.claim_jobs(1, 5).await.unwrap()[0].id, first.id);
    let released = store.release_job(first.id).await.unwrap().unwrap();
    assert_eq!(
        (released.status, released.attempts, released.started_at),
        (JobStatus::Queued, 0, None)
    );
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 2)]);
    // Back in its original place, ahead of the newer job.
    let claimed: Vec<_> = store.claim_jobs(2, 6).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(claimed, [first.id, newer.id]);
    // Anything not running is left alone.
    store.finish_job(newer.id, succeeded(b""), 7).await.unwrap();
    assert_eq!(store.release_job(newer.id).await.unwrap().unwrap().status, JobStatus::Succeeded);
    assert_eq!(store.release_job(JobId::new()).await.unwrap(), None);
}

pub(crate) async fn settings_belong_to_the_name_and_survive_a_new_version<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let settings = cloudpipe_types::FunctionSettings {
        timeout_ms: 1500,
        public: true,
        allowed_outbound_hosts: vec!["example.com".into()],
        ..Default::default()
    };
    assert_eq!(
        store.put_settings(&Scope::All, "web", settings.clone()).await.unwrap(),
        None,
        "no such name yet"
    );
    store.put(meta('a', Some("web"), 1), Bytes::from_static(b"one")).await.unwrap();
    let configured =
        store.put_settings(&Scope::All, "web", settings.clone()).await.unwrap().unwrap();
    assert_eq!(configured.settings, settings);
    // A new version under the name keeps them; the same version by id has none.
    let put = store.put(meta('b', Some("web"), 2), Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(put.settings, settings, "an upload answers with the name's settings");
    let got = store.get_function(&Scope::All, "web").await.unwrap().unwrap();
    assert_eq!((got.id.as_str(), &got.settings), (meta('b', None, 0).id.as_str(), &settings));
    assert_eq!(
        store.get_function(&Scope::All, &got.id).await.unwrap().unwrap().settings,
        Default::default()
    );
    assert_eq!(store.list_functions(&Scope::All).await.unwrap()[0].settings, settings);
    drop(store);
    let store = open(dir.path()).unwrap();
    assert_eq!(store.get_function(&Scope::All, "web").await.unwrap().unwrap().settings, settings);
    // Deleting the name deletes its settings.
    store.delete_function(&Scope::All, "web").await.unwrap();
    store.put(meta('c', Some("web"), 3), Bytes::from_static(b"three")).await.unwrap();
    assert_eq!(
        store.get_function(&Scope::All, "web").await.unwrap().unwrap().settings,
        Default::default()
    );
}

pub(crate) async fn list_filters_and_pages_newest_first<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        let mut job = queued_job(if i % 2 == 0 { "even" } else { "odd" });
        job.function_id = format!("sha256:{}", i % 3);
        if i % 3 == 0 {
            job.tags = vec!["three".into(), "x".into()];
        }
        ids.push(insert(&store, job).await.id);
    }
    // The two oldest run, the oldest finishes.
    store.claim_jobs(2, 1).await.unwrap();
    store.finish_job(ids[0], succeeded(b""), 2).await.unwrap();

    let list = |filter: JobFilter| {
        let store = &store;
        async move {
            store.list_jobs(&filter).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    let newest_first: Vec<JobId> = ids.iter().rev().copied().collect();
    assert_eq!(list(JobFilter { limit: 100, ..Default::default() }).await, newest_first);
    assert_eq!(list(JobFilter { limit: 0, ..Default::default() }).await, []);
    let pick = |idx: &[usize]| idx.iter().map(|&i| ids[i]).collect::<Vec<_>>();
    assert_eq!(
        list(JobFilter { status: Some(JobStatus::Running), limit: 10, ..Default::default() }).await,
        pick(&[1])
    );
    assert_eq!(
        list(JobFilter { status: Some(JobStatus::Succeeded), limit: 10, ..Default::default() })
            .await,
        pick(&[0])
    );
    assert_eq!(
        list(JobFilter { tag: Some("three".into()), limit: 10, ..Default::default() }).await,
        pick(&[9, 6, 3, 0])
    );
    assert_eq!(
        list(JobFilter { function: Some("odd".into()), limit: 2, ..Default::default() }).await,
        pick(&[9, 7])
    );
    assert_eq!(
        list(JobFilter { function: Some("sha256:1".into()), limit: 10, ..Default::default() })
            .await,
        pick(&[7, 4, 1])
    );
    assert_eq!(
        list(JobFilter {
            function: Some("even".into()),
            tag: Some("x".into()),
            limit: 10,
            ..Default::default()
        })
        .await,
        pick(&[6, 0])
    );
    assert_eq!(
        list(JobFilter { tag: Some("none".into()), limit: 10, ..Default::default() }).await,
        []
    );

    // Paging by cursor: every job once, in order.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = list(JobFilter { before, limit: 3, ..Default::default() }).await;
        if page.is_empty() {
            break;
        }
        before = page.last().copied();
        paged.extend(page);
    }
    assert_eq!(paged, newest_first);
    let page = list(JobFilter {
        before: Some(ids[6]),
        tag: Some("three".into()),
        limit: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(page, pick(&[3]), "the cursor is an exclusive bound");
}

pub(crate) async fn purge_deletes_by_age_and_by_count_with_their_idempotency_keys<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..5u64 {
        let mut job = queued_job("f");
        job.idempotency_key = Some(format!("key-{i}"));
        let job = insert(&store, job).await;
        store.claim_jobs(1, 1).await.unwrap();
        store.finish_job(job.id, succeeded(b""), 1000 * (i + 1)).await.unwrap().unwrap();
        ids.push(job.id);
    }
    let still_queued = insert(&store, queued_job("f")).await;

    // By age: finished more than 2500 µs before 6000, i.e. at 1000, 2000 and 3000; two
    // per call.
    let by_age = Retention { max_age_micros: 2500, max_finished_per_account: 100 };
    assert_eq!(store.purge_finished(by_age, 6000, 2).await.unwrap(), 2);
    assert_eq!(store.purge_finished(by_age, 6000, 2).await.unwrap(), 1);
    assert_eq!(store.purge_finished(by_age, 6000, 2).await.unwrap(), 0);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(store.get_job(*id).await.unwrap().is_some(), i >= 3, "job {i}");
    }
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 1), (JobStatus::Succeeded, 2)]);

    // The idempotency key of a purged job is free again; the others still hold.
    assert_eq!(store.job_by_idempotency_key(ADMIN, "key-0").await.unwrap(), None);
    let kept = store.job_by_idempotency_key(ADMIN, "key-4").await.unwrap();
    assert_eq!(kept.map(|j| j.id), Some(ids[4]));
    let mut reuse = queued_job("f");
    reuse.idempotency_key = Some("key-0".into());
    assert!(matches!(store.insert_job(reuse).await.unwrap(), Inserted::Created(_)));
    let mut reuse = queued_job("f");
    reuse.idempotency_key = Some("key-4".into());
    assert_eq!(store.insert_job(reuse).await.unwrap().job().id, ids[4]);

    // By count: keep one finished job, the newest.
    let by_count = Retention { max_age_micros: u64::MAX, max_finished_per_account: 1 };
    assert_eq!(store.purge_finished(by_count, 6000, 10).await.unwrap(), 1);
    assert_eq!(store.get_job(ids[3]).await.unwrap(), None);
    assert!(store.get_job(ids[4]).await.unwrap().is_some());
    assert!(store.get_job(still_queued.id).await.unwrap().is_some(), "unfinished jobs stay");
    assert_eq!(store.purge_finished(by_count, 6000, 10).await.unwrap(), 0);
    assert_eq!(counts(&store).await, [(JobStatus::Queued, 2), (JobStatus::Succeeded, 1)]);
}

/// Finished jobs of one account never count against another's: a busy account loses
/// its own oldest, a quiet one keeps everything (and its idempotency keys), and an
/// account's `max_finished_jobs` quota replaces the policy's count for it. Counts
/// survive a reopen.
pub(crate) async fn retention_counts_each_account_apart_and_honours_its_quota<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let mut ids: HashMap<&str, Vec<JobId>> = HashMap::new();
    {
        let store = open(dir.path()).unwrap();
        let quiet_quota =
            cloudpipe_types::Quotas { max_finished_jobs: Some(1), ..Default::default() };
        let record = AccountRecord {
            name: "tiny".into(),
            role: cloudpipe_types::Role::User,
            disabled: false,
            quotas: quiet_quota,
            allow_network: false,
            allowed_outbound: vec![],
            created_at: 1,
        };
        assert!(store.insert_account(record).await.unwrap());
        // The quiet account's jobs are the oldest of all.
        let mut t = 0;
        for (account, n) in [("quiet", 2), ("tiny", 3), ("busy", 6)] {
            for i in 0..n {
                t += 10;
                let mut job = queued_job("f");
                job.account = account.into();
                job.idempotency_key = Some(format!("{account}-{i}"));
                let job = insert(&store, job).await;
                let claimed = store.claim_jobs(1, t).await.unwrap();
                assert_eq!(claimed.len(), 1);
                store.finish_job(job.id, succeeded(b""), t).await.unwrap().unwrap();
                ids.entry(account).or_default().push(job.id);
            }
        }
    }
    let store = open(dir.path()).unwrap();
    let keep = Retention { max_age_micros: u64::MAX, max_finished_per_account: 3 };
    // busy: 6 - 3, tiny: 3 - 1, two per call.
    let mut purged = 0;
    loop {
        let n = store.purge_finished(keep, 1000, 2).await.unwrap();
        assert!(n <= 2);
        purged += n;
        if n < 2 {
            break;
        }
    }
    assert_eq!(purged, 5);
    assert_eq!(store.purge_finished(keep, 1000, 10).await.unwrap(), 0, "nothing more");
    for (account, kept_from) in [("quiet", 0), ("tiny", 2), ("busy", 3)] {
        for (i, id) in ids[account].iter().enumerate() {
            let kept = store.get_job(*id).await.unwrap().is_some();
            assert_eq!(kept, i >= kept_from, "{account}'s job {i}");
        }
    }
    assert_eq!(counts(&store).await, [(JobStatus::Succeeded, 6)]);
    // The quiet account's keys still name its jobs: a retry does not run twice.
    let mut retry = queued_job("f");
    retry.account = "quiet".into();
    retry.idempotency_key = Some("quiet-0".into());
    assert_eq!(store.insert_job(retry).await.unwrap().job().id, ids["quiet"][0]);
    // New jobs of the busy account push out its own oldest only.
    let mut job = queued_job("f");
    job.account = "busy".into();
    let job = insert(&store, job).await;
    store.claim_jobs(1, 2000).await.unwrap();
    store.finish_job(job.id, succeeded(b""), 2000).await.unwrap().unwrap();
    assert_eq!(store.purge_finished(keep, 2000, 10).await.unwrap(), 1);
    assert_eq!(store.get_job(ids["busy"][3]).await.unwrap(), None);
    assert!(store.get_job(ids["quiet"][0]).await.unwrap().is_some());
}

fn meta(id: char, name: Option<&str>, created_at: u64) -> FunctionMeta {
    FunctionMeta {
        id: format!("sha256:{}", id.to_string().repeat(64)),
        account: ADMIN.to_string(),
        name: name.map(str::to_string),
        kind: FunctionKind::Command,
        size: 3,
        created_at,
        settings: Default::default(),
    }
}

pub(crate) async fn put_function_keeps_the_first_created_at_and_the_name_points_at_the_newest<
    S: Store,
>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let v1 = meta('a', Some("hello"), 10);
    let v2 = meta('b', Some("hello"), 30);
    assert_eq!(store.put(v1.clone(), Bytes::from_static(b"one")).await.unwrap(), v1);
    let again = store.put(meta('a', Some("hello"), 20), Bytes::from_static(b"one"));
    assert_eq!(again.await.unwrap().created_at, 10, "the first upload's time stays");
    store.put(v2.clone(), Bytes::from_static(b"two")).await.unwrap();

    assert_eq!(store.get_function(&Scope::All, "hello").await.unwrap(), Some(v2.clone()));
    assert_eq!(store.get_function(&Scope::All, &v1.id).await.unwrap(), Some(v1.clone()));
    assert_eq!(store.get_function(&Scope::All, "nope").await.unwrap(), None);
    assert_eq!(store.function_binary(&v1.id).await.unwrap().unwrap(), &b"one"[..]);
    assert_eq!(store.function_binary(&v2.id).await.unwrap().unwrap(), &b"two"[..]);
    assert_eq!(store.function_binary("sha256:none").await.unwrap(), None);

    // An unnamed upload is reachable by id only; a second name for v1 is listed too.
    let anon = meta('c', None, 40);
    store.put(anon.clone(), Bytes::from_static(b"three")).await.unwrap();
    store.put(meta('a', Some("alias"), 50), Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(store.get_function(&Scope::All, &anon.id).await.unwrap(), Some(anon));
    let listed = store.list_functions(&Scope::All).await.unwrap();
    let listed: Vec<(Option<&str>, &str, u64)> =
        listed.iter().map(|m| (m.name.as_deref(), m.id.as_str(), m.created_at)).collect();
    assert_eq!(listed, [(Some("alias"), v1.id.as_str(), 10), (Some("hello"), v2.id.as_str(), 30)]);

    // A large binary (sled keeps those in separate files).
    let big = meta('d', Some("big"), 60);
    let binary: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    store.put(big.clone(), Bytes::from(binary.clone())).await.unwrap();
    assert_eq!(store.function_binary(&big.id).await.unwrap().unwrap(), binary);
}

pub(crate) async fn delete_function_by_name_and_by_id<S: Store>(open: impl Fn(&Path) -> Result<S>) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let old = meta('a', Some("hello"), 10);
    let new = meta('b', Some("hello"), 20);
    let shared = meta('c', Some("hello"), 30);
    for m in [&old, &new, &shared] {
        store.put(m.clone(), Bytes::from_static(b"bin")).await.unwrap();
    }
    // `shared` is also the version of another name; `other` only by id.
    store.put(meta('c', Some("keep"), 40), Bytes::from_static(b"bin")).await.unwrap();
    let other = meta('d', Some("other"), 50);
    store.put(other.clone(), Bytes::from_static(b"bin")).await.unwrap();

    let mut deleted: Vec<String> = store
        .delete_function(&Scope::All, "hello")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    deleted.sort();
    assert_eq!(deleted, [old.id.clone(), new.id.clone()], "versions no other name uses");
    assert_eq!(store.get_function(&Scope::All, "hello").await.unwrap(), None);
    assert_eq!(store.get_function(&Scope::All, &old.id).await.unwrap(), None);
    assert_eq!(store.function_binary(&new.id).await.unwrap(), None);
    assert_eq!(store.get_function(&Scope::All, "keep").await.unwrap().unwrap().id, shared.id);

    let deleted = store.delete_function(&Scope::All, &other.id).await.unwrap();
    assert_eq!(deleted.iter().map(|m| &m.id).collect::<Vec<_>>(), [&other.id]);
    assert_eq!(store.get_function(&Scope::All, "other").await.unwrap(), None, "its name goes too");
    assert_eq!(store.function_binary(&other.id).await.unwrap(), None);

    assert_eq!(store.delete_function(&Scope::All, "nothing").await.unwrap(), []);
    let names: Vec<_> = store
        .list_functions(&Scope::All)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name.unwrap())
        .collect();
    assert_eq!(names, ["keep"]);
}

pub(crate) async fn data_survives_drop_and_reopen<S: Store>(open: impl Fn(&Path) -> Result<S>) {
    let dir = dir();
    let f = meta('a', Some("hello"), 10);
    let (queued, running, done) = {
        let store = open(dir.path()).unwrap();
        store.put(f.clone(), Bytes::from_static(b"wasm")).await.unwrap();
        let done = insert(&store, queued_job("hello")).await;
        let running = insert(&store, queued_job("hello")).await;
        let mut queued = queued_job("hello");
        queued.idempotency_key = Some("k".into());
        let queued = insert(&store, queued).await;
        store.claim_jobs(2, 5).await.unwrap();
        let done = store.finish_job(done.id, succeeded(b"hi"), 6).await.unwrap().unwrap();
        let running = store.get_job(running.id).await.unwrap().unwrap();
        (queued, running, done)
    };
    let store = open(dir.path()).unwrap();
    assert_eq!(store.get_function(&Scope::All, "hello").await.unwrap(), Some(f.clone()));
    assert_eq!(store.function_binary(&f.id).await.unwrap().unwrap(), &b"wasm"[..]);
    for job in [&queued, &running, &done] {
        assert_eq!(store.get_job(job.id).await.unwrap(), Some(read_back(job)));
    }
    assert_eq!(
        counts(&store).await,
        [(JobStatus::Queued, 1), (JobStatus::Running, 1), (JobStatus::Succeeded, 1)]
    );
    let mut again = queued_job("hello");
    again.idempotency_key = Some("k".into());
    assert_eq!(store.insert_job(again).await.unwrap(), Inserted::Existing(read_back(&queued)));
    assert_eq!(store.recover(7).await.unwrap(), Recovery { requeued: 1, exhausted: 0 });
    let claimed = store.claim_jobs(10, 8).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [running.id, queued.id]);
}

pub(crate) async fn concurrent_inserts_all_land_and_counters_are_exact<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    const TASKS: usize = 50;
    const EACH: usize = 40;
    let dir = dir();
    let store = Arc::new(open(dir.path()).unwrap());
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..EACH {
                let mut job = queued_job("f");
                // Half of them with a key, and every key once more: no duplicates land.
                if i % 2 == 0 {
                    job.idempotency_key = Some(format!("{t}-{i}"));
                    store.insert_job(job.clone()).await.unwrap();
                    job.id = JobId::new();
                    assert!(matches!(store.insert_job(job).await.unwrap(), Inserted::Existing(_)));
                } else {
                    store.insert_job(job).await.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let total = (TASKS * EACH) as u64;
    assert_eq!(counts(&*store).await, [(JobStatus::Queued, total)]);
    let all = store.list_jobs(&JobFilter { limit: 10_000, ..Default::default() }).await.unwrap();
    assert_eq!(all.len() as u64, total);

    // Concurrent claims never hand out a job twice.
    let mut handles = Vec::new();
    for _ in 0..10 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let jobs = store.claim_jobs(7, 1).await.unwrap();
                if jobs.is_empty() {
                    return ids;
                }
                ids.extend(jobs.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut claimed = Vec::new();
    for h in handles {
        claimed.extend(h.await.unwrap());
    }
    claimed.sort();
    claimed.dedup();
    assert_eq!(claimed.len() as u64, total);
    assert_eq!(counts(&*store).await, [(JobStatus::Running, total)]);
}

pub(crate) async fn a_write_that_fails_alone_does_not_fail_its_group<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = Arc::new(open(dir.path()).unwrap());
    let job = insert(&*store, queued_job("f")).await;
    store.claim_jobs(1, 1).await.unwrap();
    // A non-terminal outcome is refused; the inserts sent with it land.
    let bad = JobOutcome { status: JobStatus::Queued, ..JobOutcome::default() };
    let inserts: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_job(queued_job("f")).await })
        })
        .collect();
    let refused = store.finish_job(job.id, bad, 2).await;
    assert!(refused.is_err());
    for i in inserts {
        i.await.unwrap().unwrap();
    }
    assert_eq!(counts(&*store).await, [(JobStatus::Queued, 20), (JobStatus::Running, 1)]);
    assert_eq!(store.get_job(job.id).await.unwrap().unwrap().status, JobStatus::Running);
}

fn dir_size(path: &Path) -> u64 {
    let mut size = 0;
    for entry in std::fs::read_dir(path).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        size += if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() };
    }
    size
}

/// Many cycles of insert, finish and purge, then a reopen: the files should hold about
/// the live data, not the history.
pub(crate) async fn reopened_store_after_churn_stays_near_live_data<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
    backend: &str,
    max_growth: Option<f64>,
) {
    const CYCLES: usize = 20;
    const PER_CYCLE: usize = 500;
    const KEEP: u64 = 500;
    let dir = dir();
    let retention = Retention { max_age_micros: u64::MAX, max_finished_per_account: KEEP };
    let output = vec![b'o'; 1000];
    {
        let store = Arc::new(open(dir.path()).unwrap());
        for _ in 0..CYCLES {
            let inserts = (0..PER_CYCLE).map(|_| store.insert_job(queued_job("f")));
            for inserted in futures::future::join_all(inserts).await {
                inserted.unwrap();
            }
            let claimed = store.claim_jobs(PER_CYCLE, now_micros()).await.unwrap();
            let finishes =
                claimed.iter().map(|j| store.finish_job(j.id, succeeded(&output), now_micros()));
            for finished in futures::future::join_all(finishes).await {
                finished.unwrap().unwrap();
            }
            while store.purge_finished(retention, now_micros(), 100).await.unwrap() == 100 {}
        }
    }
    let store = open(dir.path()).unwrap();
    let live = store.list_jobs(&JobFilter { limit: 10_000, ..Default::default() }).await.unwrap();
    assert_eq!(live.len() as u64, KEEP);
    assert_eq!(counts(&store).await, [(JobStatus::Succeeded, KEEP)]);
    let mut live_bytes = 0;
    for job in &live {
        let job = store.get_job(job.id).await.unwrap().unwrap();
        live_bytes += serde_json::to_vec(&job).unwrap().len() as u64 + 17;
    }
    drop(store);
    let size = dir_size(dir.path());
    let growth = size as f64 / live_bytes as f64;
    // Printed for the record (`cargo test -- --nocapture`): the suite bounds only the
    // backends that compact.
    println!(
        "{backend}: {CYCLES} cycles of {PER_CYCLE} jobs, {KEEP} kept: files {size} bytes, \
         live data {live_bytes} bytes ({growth:.1}x)"
    );
    if let Some(max) = max_growth {
        assert!(growth <= max, "{backend} files are {growth:.1}x the live data (max {max}x)");
    }
}

pub(crate) fn owned(account: &str, id: char, name: Option<&str>) -> FunctionMeta {
    FunctionMeta { account: account.to_string(), ..meta(id, name, 1) }
}

pub(crate) async fn functions_are_isolated_between_accounts<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let alice = Scope::Account("alice".into());
    let bob = Scope::Account("bob".into());
    let bin = || Bytes::from_static(b"abc");
    let web = owned("alice", 'a', Some("web"));
    assert!(matches!(
        store.put_function(web.clone(), bin(), None).await.unwrap(),
        PutFunction::Stored(_)
    ));
    // Bob uploads the very same binary, and one of his own.
    store.put_function(owned("bob", 'a', None), bin(), None).await.unwrap();
    store.put_function(owned("bob", 'b', Some("api")), bin(), None).await.unwrap();

    assert_eq!(store.get_function(&alice, "web").await.unwrap().unwrap().account, "alice");
    assert_eq!(store.get_function(&bob, "web").await.unwrap(), None);
    assert_eq!(store.get_function(&alice, "api").await.unwrap(), None);
    assert_eq!(store.get_function(&alice, &web.id).await.unwrap().unwrap().account, "alice");
    assert_eq!(store.get_function(&bob, &web.id).await.unwrap().unwrap().account, "bob");
    assert_eq!(store.get_function(&bob, &meta('z', None, 0).id).await.unwrap(), None);
    let names = |v: Vec<FunctionMeta>| v.into_iter().map(|m| m.name.unwrap()).collect::<Vec<_>>();
    assert_eq!(names(store.list_functions(&alice).await.unwrap()), ["web"]);
    assert_eq!(names(store.list_functions(&bob).await.unwrap()), ["api"]);
    assert_eq!(names(store.list_functions(&Scope::All).await.unwrap()), ["api", "web"]);

    // A name is its account's: others can neither take, configure nor delete it.
    let taken = store.put_function(owned("bob", 'b', Some("web")), bin(), None).await.unwrap();
    assert_eq!(taken, PutFunction::NameTaken);
    assert_eq!(store.put_settings(&bob, "web", Default::default()).await.unwrap(), None);
    assert_eq!(store.delete_function(&bob, "web").await.unwrap(), []);
    assert_eq!(store.get_function(&alice, "web").await.unwrap().unwrap().id, web.id);

    // Bob deleting his copy of the shared binary leaves Alice's.
    let gone = store.delete_function(&bob, &web.id).await.unwrap();
    assert_eq!(gone.iter().map(|m| m.account.as_str()).collect::<Vec<_>>(), ["bob"]);
    assert_eq!(store.function_binary(&web.id).await.unwrap().unwrap(), &b"abc"[..]);
    assert_eq!(store.get_function(&alice, &web.id).await.unwrap().unwrap().account, "alice");

    // The byte quota counts the account's versions, in the same transaction.
    assert_eq!(store.function_bytes("alice").await.unwrap(), 3);
    let over = store.put_function(owned("alice", 'c', None), bin(), Some(5)).await.unwrap();
    assert_eq!(over, PutFunction::OverQuota { used: 3, limit: 5 });
    assert_eq!(store.get_function(&alice, &meta('c', None, 0).id).await.unwrap(), None);
    let again = store.put_function(owned("alice", 'a', Some("web")), bin(), Some(3)).await.unwrap();
    assert!(matches!(again, PutFunction::Stored(_)), "a version already stored costs nothing");

    store.delete_function(&alice, "web").await.unwrap();
    assert_eq!(store.function_binary(&web.id).await.unwrap(), None, "no owner left");
    assert_eq!(store.function_bytes("alice").await.unwrap(), 0);
}

pub(crate) async fn accounts_and_keys_round_trip<S: Store>(open: impl Fn(&Path) -> Result<S>) {
    let dir = dir();
    let account = |name: &str| AccountRecord {
        name: name.into(),
        role: cloudpipe_types::Role::User,
        disabled: false,
        quotas: Default::default(),
        allow_network: false,
        allowed_outbound: vec!["*.example.com".into()],
        created_at: 1,
    };
    let key = |id: &str, account: &str, hash: &str| KeyRecord {
        id: id.into(),
        account: account.into(),
        label: None,
        hash: hash.into(),
        created_at: 2,
    };
    {
        let store = open(dir.path()).unwrap();
        assert!(store.insert_account(account("bob")).await.unwrap());
        assert!(store.insert_account(account("alice")).await.unwrap());
        assert!(!store.insert_account(account("alice")).await.unwrap(), "names are unique");
        let mut disabled = account("alice");
        disabled.disabled = true;
        assert!(store.update_account(disabled).await.unwrap());
        assert!(!store.update_account(account("carol")).await.unwrap(), "no such account");
        assert!(!store.insert_key(key("key_0", "carol", "00")).await.unwrap(), "no account");
        assert!(store.insert_key(key("key_1", "alice", "aa")).await.unwrap());
        assert!(store.insert_key(key("key_2", "bob", "bb")).await.unwrap());
        assert!(store.insert_key(key("key_3", "alice", "cc")).await.unwrap());
    }
    let store = open(dir.path()).unwrap();
    let names: Vec<_> =
        store.list_accounts().await.unwrap().into_iter().map(|a| (a.name, a.disabled)).collect();
    assert_eq!(names, [("alice".to_string(), true), ("bob".to_string(), false)]);
    assert_eq!(store.get_account("carol").await.unwrap(), None);
    assert_eq!(store.key_by_hash("bb").await.unwrap().unwrap().id, "key_2");
    assert_eq!(store.key_by_hash("zz").await.unwrap(), None);
    let ids = |v: Vec<KeyRecord>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_keys(Some("alice")).await.unwrap()), ["key_1", "key_3"]);
    assert_eq!(ids(store.list_keys(None).await.unwrap()), ["key_1", "key_2", "key_3"]);
    assert_eq!(store.delete_key("key_1").await.unwrap().unwrap().hash, "aa");
    assert_eq!(store.key_by_hash("aa").await.unwrap(), None, "revoked at once");
    assert_eq!(store.delete_key("key_1").await.unwrap(), None);
    assert_eq!(ids(store.list_keys(Some("alice")).await.unwrap()), ["key_3"]);
}

pub(crate) async fn idempotency_keys_are_per_account_and_active_jobs_are_listed<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let keyed = |account: &str| {
        let mut j = queued_job("f");
        j.account = account.into();
        j.idempotency_key = Some("same".into());
        j
    };
    let a = store.insert_job(keyed("alice")).await.unwrap();
    let b = store.insert_job(keyed("bob")).await.unwrap();
    assert!(matches!((&a, &b), (Inserted::Created(_), Inserted::Created(_))));
    assert_eq!(
        store.insert_job(keyed("bob")).await.unwrap(),
        Inserted::Existing(read_back(b.job()))
    );
    // Looked up per account, without writing.
    let by_key = |account: &'static str, key: &'static str| {
        let store = &store;
        async move { store.job_by_idempotency_key(account, key).await.unwrap().map(|j| j.id) }
    };
    assert_eq!(by_key("alice", "same").await, Some(a.job().id));
    assert_eq!(by_key("bob", "same").await, Some(b.job().id));
    assert_eq!(by_key("carol", "same").await, None);
    assert_eq!(by_key("alice", "other").await, None);
    let mut odd = keyed("alice");
    odd.idempotency_key = Some("50%\0off".into());
    let odd = insert(&store, odd).await;
    assert_eq!(by_key("alice", "50%\0off").await, Some(odd.id));
    assert_eq!(by_key("alice", "50%").await, None);
    let done = insert(&store, queued_job("f")).await;
    store.claim_jobs(1, 5).await.unwrap(); // one of them runs: listed as well
    let mut active = store.active_jobs().await.unwrap();
    active.sort();
    let mut want = vec![
        (a.job().id, "alice".to_string()),
        (odd.id, "alice".to_string()),
        (b.job().id, "bob".to_string()),
        (done.id, ADMIN.to_string()),
    ];
    want.sort();
    assert_eq!(active, want);
    let filter = JobFilter { account: Some("bob".into()), limit: 10, ..Default::default() };
    let listed: Vec<_> =
        store.list_jobs(&filter).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, [b.job().id]);
}

/// Every combination of filters, paged, against the same filter applied to every
/// job: with jobs of several accounts in every status, then after retention deleted
/// some, then after a reopen.
pub(crate) async fn every_list_filter_agrees_with_a_scan_after_purge_and_reopen<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let mut ids = Vec::new();
    {
        let store = open(dir.path()).unwrap();
        for i in 0..36usize {
            let mut job = queued_job(["f", "g"][i % 2]);
            job.account = ["alice", "bob", ADMIN][i % 3].to_string();
            job.function_id = format!("sha256:{}", i % 4);
            job.tags = match i % 5 {
                0 => vec!["t1".into()],
                1 => vec!["t1".into(), "t2\0x".into()],
                _ => vec![],
            };
            if i % 4 == 1 {
                job.batch =
                    Some(crate::model::BatchRef { id: "b1".into(), index: i as u64, round: 0 });
            }
            ids.push(insert(&store, job).await.id);
        }
        // Some run, some of those end each way, one is cancelled queued.
        let running = store.claim_jobs(20, 10).await.unwrap();
        for (n, job) in running.iter().enumerate().take(16) {
            let outcome = match n % 3 {
                0 => succeeded(b"ok"),
                1 => JobOutcome::error(JobStatus::Failed, "trap", "x"),
                _ => JobOutcome::error(JobStatus::TimedOut, "timeout", "x"),
            };
            store.finish_job(job.id, outcome, 100 + n as u64).await.unwrap();
        }
        let queued = store
            .list_jobs(&JobFilter {
                status: Some(JobStatus::Queued),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        store.cancel_queued_job(queued[0].id, 200).await.unwrap();
        check_every_filter(&store, &ids).await;

        // Retention deletes each account's oldest finished jobs: they leave every list.
        let mut finished: HashMap<String, usize> = HashMap::new();
        for id in &ids {
            let job = store.get_job(*id).await.unwrap().unwrap();
            if job.status.is_terminal() {
                *finished.entry(job.account).or_default() += 1;
            }
        }
        let over: usize = finished.values().map(|n| n.saturating_sub(2)).sum();
        assert!(over > 0, "{finished:?}");
        let keep = Retention { max_age_micros: u64::MAX, max_finished_per_account: 2 };
        assert_eq!(store.purge_finished(keep, 300, 100).await.unwrap(), over);
        check_every_filter(&store, &ids).await;
    }
    let store = open(dir.path()).unwrap();
    check_every_filter(&store, &ids).await;
    assert_eq!(store.recover(400).await.unwrap().requeued, 4);
    check_every_filter(&store, &ids).await;
}

/// Lists `store` with every combination of filters (whole, and paged two at a time by
/// cursor) and compares each with the filter applied to every job of `ids` that
/// still exists.
async fn check_every_filter<S: Store>(store: &S, ids: &[JobId]) {
    let mut all = Vec::new();
    for id in ids.iter().rev() {
        all.extend(store.get_job(*id).await.unwrap());
    }
    let accounts = [None, Some("alice"), Some("bob")];
    let statuses = [
        None,
        Some(JobStatus::Queued),
        Some(JobStatus::Running),
        Some(JobStatus::Failed),
        Some(JobStatus::Cancelled),
    ];
    let functions = [None, Some("f"), Some("sha256:1")];
    let tags = [None, Some("t1"), Some("t2\0x")];
    let batches = [None, Some("b1"), Some("b2")];
    for account in accounts {
        for status in statuses {
            for function in functions {
                for tag in tags {
                    for batch in batches {
                        let filter = JobFilter {
                            account: account.map(str::to_string),
                            status,
                            function: function.map(str::to_string),
                            tag: tag.map(str::to_string),
                            batch: batch.map(str::to_string),
                            node: None,
                            before: None,
                            limit: 1000,
                        };
                        let want: Vec<JobId> = all
                            .iter()
                            .filter(|j| {
                                account.is_none_or(|a| j.account == a)
                                    && status.is_none_or(|s| j.status == s)
                                    && function
                                        .is_none_or(|f| j.function == f || j.function_id == f)
                                    && tag.is_none_or(|t| j.tags.iter().any(|jt| jt == t))
                                    && batch.is_none_or(|b| {
                                        j.batch.as_ref().is_some_and(|jb| jb.id == b)
                                    })
                            })
                            .map(|j| j.id)
                            .collect();
                        let got: Vec<JobId> =
                            store.list_jobs(&filter).await.unwrap().iter().map(|j| j.id).collect();
                        assert_eq!(got, want, "{filter:?}");
                        let mut paged = Vec::new();
                        let mut page = JobFilter { limit: 2, ..filter.clone() };
                        loop {
                            let jobs = store.list_jobs(&page).await.unwrap();
                            paged.extend(jobs.iter().map(|j| j.id));
                            match jobs.last() {
                                Some(last) if jobs.len() == 2 => page.before = Some(last.id),
                                _ => break,
                            }
                        }
                        assert_eq!(paged, want, "paged by 2: {filter:?}");
                    }
                }
            }
        }
    }
}

pub(crate) async fn claims_take_accounts_in_turn_and_each_account_first_in_first_out<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let queue = |account: &str| {
        let mut job = queued_job("f");
        job.account = account.into();
        job
    };
    // One account floods the queue first; two others queue after it.
    let mut flood = Vec::new();
    for _ in 0..6 {
        flood.push(insert(&store, queue("alice")).await.id);
    }
    let bob: Vec<JobId> =
        vec![insert(&store, queue("bob")).await.id, insert(&store, queue("bob")).await.id];
    let carol = insert(&store, queue("carol")).await.id;
    let claim = |n: usize| {
        let store = &store;
        async move {
            store.claim_jobs(n, 1).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(claim(4).await, [flood[0], bob[0], carol, flood[1]]);
    // The next claim goes on after the account served last, not from the start.
    assert_eq!(claim(1).await, [bob[1]]);
    assert_eq!(claim(1).await, [flood[2]]);
    // A newcomer gets its turn before the flood goes on.
    let dave = insert(&store, queue("dave")).await.id;
    assert_eq!(claim(2).await, [dave, flood[3]]);
    assert_eq!(claim(10).await, [flood[4], flood[5]]);
    assert_eq!(claim(10).await, []);

    // Recovery puts a job back ahead of its own account's newer jobs.
    let erin = insert(&store, queue("erin")).await.id;
    let late = insert(&store, queue("alice")).await.id;
    assert_eq!(store.recover(2).await.unwrap().requeued, 10);
    let shared_queue = store.backend() == "postgres";
    drop(store);
    let store = open(dir.path()).unwrap();
    let claim = async |n: usize| -> Vec<JobId> {
        store.claim_jobs(n, 3).await.unwrap().into_iter().map(|j| j.id).collect()
    };
    if shared_queue {
        // Each node of a cluster keeps its own turn, in memory (no row that every
        // claim of every node would lock): a restarted node starts at the first
        // account.
        assert_eq!(claim(3).await, [flood[0], bob[0], carol]);
        assert_eq!(claim(3).await, [dave, erin, flood[1]]);
        let rest = claim(100).await;
        assert_eq!(rest, [&[bob[1]], &flood[2..], &[late]].concat(), "FIFO within alice");
        return;
    }
    // The embedded store's turn survives a reopen: it goes on after alice, served last.
    assert_eq!(claim(3).await, [bob[0], carol, dave]);
    assert_eq!(claim(3).await, [erin, flood[0], bob[1]]);
    let rest = claim(100).await;
    assert_eq!(rest, [&flood[1..], &[late]].concat(), "first in first out within alice");
}

pub(crate) async fn secrets_are_per_account_bounded_and_keep_their_first_time<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    use crate::model::SecretRecord;
    use crate::store::PutSecret;
    let dir = dir();
    let secret = |account: &str, name: &str, at: u64| SecretRecord {
        account: account.into(),
        name: name.into(),
        key_id: "k1".into(),
        nonce: vec![1; 12],
        sealed: vec![at as u8; 20],
        created_at: at,
        updated_at: at,
    };
    let stored = |p: PutSecret| match p {
        PutSecret::Stored(r) => r,
        other => panic!("not stored: {other:?}"),
    };
    {
        let store = open(dir.path()).unwrap();
        stored(store.put_secret(secret("alice", "b", 1), Some(2)).await.unwrap());
        stored(store.put_secret(secret("alice", "a", 2), Some(2)).await.unwrap());
        // A third name is over the bound; a replacement fits and keeps `created_at`.
        let over = store.put_secret(secret("alice", "c", 3), Some(2)).await.unwrap();
        assert_eq!(over, PutSecret::OverQuota { limit: 2 });
        let replaced = stored(store.put_secret(secret("alice", "b", 4), Some(2)).await.unwrap());
        assert_eq!((replaced.created_at, replaced.updated_at), (1, 4));
        // Another account's secrets count apart, and may share names.
        stored(store.put_secret(secret("bob", "a", 5), Some(2)).await.unwrap());
        stored(store.put_secret(secret("alicia", "x", 6), None).await.unwrap());
    }
    let store = open(dir.path()).unwrap();
    let names = |v: Vec<SecretRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
    assert_eq!(names(store.list_secrets("alice").await.unwrap()), ["a", "b"]);
    assert_eq!(names(store.list_secrets("bob").await.unwrap()), ["a"]);
    assert_eq!(names(store.list_secrets("carol").await.unwrap()), Vec::<String>::new());
    let b = store.get_secret("alice", "b").await.unwrap().unwrap();
    assert_eq!((b.sealed, b.nonce, b.key_id), (vec![4; 20], vec![1; 12], "k1".to_string()));
    assert_eq!(store.get_secret("bob", "b").await.unwrap(), None);
    assert!(store.delete_secret("alice", "a").await.unwrap());
    assert!(!store.delete_secret("alice", "a").await.unwrap());
    assert_eq!(store.get_secret("bob", "a").await.unwrap().unwrap().created_at, 5);
    assert_eq!(names(store.list_secrets("alice").await.unwrap()), ["b"]);
}

pub(crate) async fn stdin_and_output_are_read_apart_and_lists_carry_neither<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let mut job = queued_job("f");
    job.stdin = big.clone();
    job.idempotency_key = Some("once".into());
    insert(&store, job.clone()).await;
    let all = JobFilter { limit: 10, ..Default::default() };
    let listed = store.list_jobs(&all).await.unwrap();
    assert_eq!(listed, [job.summary()], "a list carries no stdin");

    let claimed = store.claim_jobs(1, 10).await.unwrap();
    assert_eq!(claimed[0].stdin, big, "the claim reads the stdin");
    let outcome = JobOutcome { stderr: b"err\x00".to_vec(), ..succeeded(&big) };
    let done = store.finish_job(job.id, outcome.clone(), 20).await.unwrap().unwrap();
    assert_eq!((done.stdout.as_slice(), done.stderr.as_slice()), (&big[..], &b"err\x00"[..]));
    let got = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!(got, read_back(&done));
    assert!(got.stdin.is_empty(), "a read of one job leaves its stdin out");
    let listed = store.list_jobs(&all).await.unwrap();
    assert_eq!(listed, [done.summary()], "a list carries no output");
    let by_status = JobFilter { status: Some(JobStatus::Succeeded), ..all.clone() };
    assert_eq!(store.list_jobs(&by_status).await.unwrap(), [done.summary()]);

    // Every answer that gives back a job as it is gives its output.
    let again = store.finish_job(job.id, succeeded(b"x"), 30).await.unwrap().unwrap();
    assert_eq!(again, read_back(&done));
    assert_eq!(store.cancel_queued_job(job.id, 30).await.unwrap().unwrap(), read_back(&done));
    assert_eq!(store.release_job(job.id).await.unwrap().unwrap(), read_back(&done));
    let mut twin = queued_job("f");
    twin.idempotency_key = Some("once".into());
    assert_eq!(store.insert_job(twin).await.unwrap(), Inserted::Existing(read_back(&done)));

    // Purged with its record.
    let retention = Retention { max_age_micros: 0, max_finished_per_account: 0 };
    assert_eq!(store.purge_finished(retention, 40, 10).await.unwrap(), 1);
    assert_eq!(store.get_job(job.id).await.unwrap(), None);
    let all = JobFilter { limit: 10, ..Default::default() };
    assert_eq!(store.list_jobs(&all).await.unwrap(), []);
    drop(store);
    let store = open(dir.path()).unwrap();
    assert_eq!(store.get_job(job.id).await.unwrap(), None);
}

/// A new batch record of `account`, running.
fn batch(account: &str) -> BatchState {
    BatchState {
        id: JobId::new().to_string(),
        account: account.into(),
        admin: false,
        limits: Default::default(),
        allow_network: false,
        template: crate::model::JobTemplate { function: "f".into(), ..Default::default() },
        total: 0,
        split: 2,
        retries: 0,
        strikes: 0,
        hook: None,
        status: cloudpipe_types::BatchStatus::Running,
        round: 0,
        created_at: 10,
        finished_at: None,
        final_counts: None,
        final_job_micros: 0,
        hook_called: false,
    }
}

/// `n` inputs, each one word naming its index.
fn inputs(n: usize) -> Vec<Vec<String>> {
    (0..n).map(|i| vec![format!("in{i}")]).collect()
}

async fn create<S: Store>(store: &S, b: &BatchState, n: usize, caps: BatchCaps) -> CreateBatch {
    store.create_batch(b.clone(), inputs(n), caps).await.unwrap()
}

fn ids(batches: &[BatchState]) -> Vec<String> {
    batches.iter().map(|b| b.id.clone()).collect()
}

pub(crate) async fn batch_inputs_are_stored_apart_and_read_by_range<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let n = 2 * super::BATCH_CHUNK + 5;
    let b = batch("alice");
    {
        let store = open(dir.path()).unwrap();
        assert_eq!(create(&store, &b, n, BatchCaps::default()).await, CreateBatch::Created);
    }
    let store = open(dir.path()).unwrap();
    let got = store.get_batch(&b.id).await.unwrap().expect("the batch survives a reopen");
    assert_eq!((got.total, got.account.as_str()), (n as u64, "alice"));
    let words = |v: Vec<Vec<String>>| v.into_iter().map(|w| w.join(" ")).collect::<Vec<_>>();
    let read = |start: u64, count: usize| store.batch_inputs(&b.id, start, count);
    assert_eq!(words(read(0, 2).await.unwrap()), ["in0", "in1"]);
    // Across a chunk's end.
    let edge = super::BATCH_CHUNK as u64 - 1;
    let across = words(read(edge, 3).await.unwrap());
    assert_eq!(across, [format!("in{edge}"), format!("in{}", edge + 1), format!("in{}", edge + 2)]);
    // Past the end: what there is, then nothing.
    assert_eq!(
        words(read(n as u64 - 2, 10).await.unwrap()),
        [format!("in{}", n - 2), format!("in{}", n - 1)]
    );
    assert!(read(n as u64, 10).await.unwrap().is_empty());
    assert_eq!(read(0, n + 10).await.unwrap().len(), n, "a read of many chunks");
    assert!(store.batch_inputs("no-such-batch", 0, 10).await.unwrap().is_empty());
}

pub(crate) async fn batches_are_listed_per_account_newest_first_in_pages<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let mut all = Vec::new();
    for account in ["alice", "bob", "alice", "alicia", "alice"] {
        let b = batch(account);
        create(&store, &b, 1, BatchCaps::default()).await;
        all.push(b);
    }
    let store = &store;
    let page = |account: Option<&str>, before: Option<&str>, limit: usize| {
        let filter = BatchFilter {
            account: account.map(str::to_string),
            before: before.map(str::to_string),
            limit,
        };
        async move { ids(&store.list_batches(&filter).await.unwrap()) }
    };
    let newest_first =
        |of: &[usize]| of.iter().rev().map(|i| all[*i].id.clone()).collect::<Vec<_>>();
    assert_eq!(page(Some("alice"), None, 2).await, newest_first(&[2, 4]));
    assert_eq!(page(Some("alice"), Some(&all[2].id), 2).await, newest_first(&[0]));
    assert_eq!(page(Some("alice"), None, 10).await, newest_first(&[0, 2, 4]));
    assert_eq!(page(Some("alicia"), None, 10).await, newest_first(&[3]));
    assert_eq!(page(Some("carol"), None, 10).await, Vec::<String>::new());
    assert_eq!(page(None, None, 10).await, newest_first(&[0, 1, 2, 3, 4]));
    assert_eq!(page(None, Some(&all[3].id), 2).await, newest_first(&[1, 2]));
    assert_eq!(page(None, None, 0).await, Vec::<String>::new());
}

pub(crate) async fn batch_caps_count_each_account_and_a_delete_frees_its_place<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    let dir = dir();
    let caps = BatchCaps { max_batches: Some(2), max_inputs: Some(10) };
    let (first, second) = (batch("alice"), batch("alice"));
    {
        let store = open(dir.path()).unwrap();
        assert_eq!(create(&store, &first, 4, caps).await, CreateBatch::Created);
        // Inputs: 4 stored, 7 more would pass 10.
        let over = create(&store, &batch("alice"), 7, caps).await;
        assert_eq!(over, CreateBatch::TooManyInputs { used: 4, limit: 10 });
        assert_eq!(create(&store, &second, 6, caps).await, CreateBatch::Created);
        let third = batch("alice");
        let over = create(&store, &third, 0, caps).await;
        assert_eq!(over, CreateBatch::TooManyBatches { used: 2, limit: 2 });
        assert!(store.get_batch(&third.id).await.unwrap().is_none(), "nothing written");
        // Another account counts apart.
        assert_eq!(create(&store, &batch("bob"), 10, caps).await, CreateBatch::Created);
    }
    // Counts survive a reopen; a delete frees the batch's place and inputs.
    let store = open(dir.path()).unwrap();
    assert_eq!(
        create(&store, &batch("alice"), 1, caps).await,
        CreateBatch::TooManyBatches { used: 2, limit: 2 }
    );
    let deleted = store.delete_batch(&first.id).await.unwrap().expect("it was there");
    assert_eq!((deleted.id.as_str(), deleted.total), (first.id.as_str(), 4));
    assert!(store.delete_batch(&first.id).await.unwrap().is_none());
    assert!(store.get_batch(&first.id).await.unwrap().is_none());
    assert!(store.batch_inputs(&first.id, 0, 10).await.unwrap().is_empty(), "inputs go too");
    let alice = BatchFilter { account: Some("alice".into()), before: None, limit: 10 };
    assert_eq!(ids(&store.list_batches(&alice).await.unwrap()), [second.id.as_str()]);
    assert_eq!(create(&store, &batch("alice"), 4, caps).await, CreateBatch::Created);
    assert_eq!(
        create(&store, &batch("alice"), 0, caps).await,
        CreateBatch::TooManyBatches { used: 2, limit: 2 }
    );
    assert_eq!(store.batch_inputs(&second.id, 0, 10).await.unwrap().len(), 6);
}

pub(crate) async fn put_batch_updates_only_what_exists_and_open_batches_follow_status<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    use cloudpipe_types::BatchStatus;
    let dir = dir();
    let open_ids = |v: Vec<BatchState>| {
        let mut v = ids(&v);
        v.sort();
        v
    };
    let mut hooked = batch("alice");
    hooked.hook = Some("http://example.com/done".into());
    let plain = batch("bob");
    {
        let store = open(dir.path()).unwrap();
        assert!(!store.put_batch(batch("alice")).await.unwrap(), "no such batch: nothing written");
        create(&store, &hooked, 3, BatchCaps::default()).await;
        create(&store, &plain, 2, BatchCaps::default()).await;
        let mut both = vec![hooked.id.clone(), plain.id.clone()];
        both.sort();
        assert_eq!(open_ids(store.open_batches().await.unwrap()), both);
        // Stopped with its hook still due: still open. Total and account stay.
        hooked.status = BatchStatus::Finished;
        hooked.finished_at = Some(50);
        let mut rewrite = hooked.clone();
        rewrite.total = 0;
        rewrite.account = "mallory".into();
        assert!(store.put_batch(rewrite).await.unwrap());
        let mut finished = plain.clone();
        finished.status = BatchStatus::Cancelled;
        finished.finished_at = Some(60);
        assert!(store.put_batch(finished).await.unwrap());
        assert_eq!(open_ids(store.open_batches().await.unwrap()), [hooked.id.clone()]);
    }
    let store = open(dir.path()).unwrap();
    let got = store.get_batch(&hooked.id).await.unwrap().unwrap();
    assert_eq!((got.status, got.total, got.account.as_str()), (BatchStatus::Finished, 3, "alice"));
    hooked.hook_called = true;
    assert!(store.put_batch(hooked.clone()).await.unwrap());
    assert!(store.open_batches().await.unwrap().is_empty());
    // Resumed: open again, and no longer stopped (retention leaves it alone).
    let mut resumed = plain.clone();
    resumed.finished_at = None;
    assert!(store.put_batch(resumed).await.unwrap());
    assert_eq!(open_ids(store.open_batches().await.unwrap()), [plain.id.as_str()]);
    assert_eq!(store.purge_batches(0, u64::MAX / 2, 10).await.unwrap(), 1, "only the stopped one");
    assert!(store.get_batch(&plain.id).await.unwrap().is_some());
}

pub(crate) async fn purge_batches_deletes_stopped_ones_past_the_age_oldest_first<S: Store>(
    open: impl Fn(&Path) -> Result<S>,
) {
    use cloudpipe_types::BatchStatus;
    let dir = dir();
    let store = open(dir.path()).unwrap();
    let caps = BatchCaps { max_batches: Some(3), max_inputs: None };
    let running = batch("alice");
    create(&store, &running, 2, caps).await;
    let mut stopped = Vec::new();
    for (status, at) in [(BatchStatus::Struck, 200), (BatchStatus::Finished, 100)] {
        let mut b = batch("alice");
        create(&store, &b, 2, caps).await;
        b.status = status;
        b.finished_at = Some(at);
        assert!(store.put_batch(b.clone()).await.unwrap());
        stopped.push(b);
    }
    // At 220 with an age of 50: the one stopped at 100 goes, the one at 200 stays.
    assert_eq!(store.purge_batches(50, 220, 10).await.unwrap(), 1);
    assert!(store.get_batch(&stopped[1].id).await.unwrap().is_none());
    assert!(store.batch_inputs(&stopped[1].id, 0, 10).await.unwrap().is_empty());
    assert!(store.get_batch(&stopped[0].id).await.unwrap().is_some());
    // Its place is free again.
    let next = batch("alice");
    assert_eq!(create(&store, &next, 1, caps).await, CreateBatch::Created);
    // Much later, in steps of one: the stopped one goes, running ones never.
    assert_eq!(store.purge_batches(50, 10_000, 1).await.unwrap(), 1);
    assert_eq!(store.purge_batches(50, 10_000, 1).await.unwrap(), 0);
    let alice = BatchFilter { account: Some("alice".into()), before: None, limit: 10 };
    let mut left = ids(&store.list_batches(&alice).await.unwrap());
    left.sort();
    let mut expected = vec![running.id.clone(), next.id.clone()];
    expected.sort();
    assert_eq!(left, expected);
}
