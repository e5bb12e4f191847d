//! Many jobs at once.

use std::time::Instant;

use cloudpipe_types::JobStatus;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_jobs_run_concurrently_each_with_its_own_io() {
    let h = Arc::new(Harness::new());
    let id = h.upload(programs::ECHO).await;
    let jobs = (0..24).map(|i| {
        let h = h.clone();
        let mut req = request("echo", &id);
        req.job_id = format!("job-{i}");
        req.args = vec![i.to_string()];
        req.stdin = format!("input {i}").into_bytes().into();
        tokio::spawn(async move { (i, h.run(req).await) })
    });
    for job in futures::future::join_all(jobs).await {
        let (i, outcome) = job.unwrap();
        assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
        let stdout = text(&outcome.stdout);
        assert!(
            stdout.starts_with(&format!("argv=[\"echo\", \"{i}\"]\nCLOUDPIPE_JOB_ID=job-{i}\n")),
            "{stdout}"
        );
        assert!(stdout.ends_with(&format!("stdin=input {i}")), "{stdout}");
    }
}

/// On a single-threaded runtime a spinning guest must yield at each epoch tick, or the
/// short jobs beside it could not run until it is stopped.
#[tokio::test(flavor = "current_thread")]
async fn spinning_guest_does_not_hold_the_thread() {
    let h = Harness::new();
    let spin = h.upload(programs::LOOP_FOREVER).await;
    let hello = h.upload(programs::HELLO).await;
    let mut req = request("loop_forever", &spin);
    req.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let spinning = h.run(req);
    let quick = async {
        let mut took = Vec::new();
        for _ in 0..8 {
            let outcome = h.run(request("hello", &hello)).await;
            assert_eq!(outcome.status, JobStatus::Succeeded);
            took.push(started.elapsed());
        }
        took
    };
    let (spun, took) = tokio::join!(spinning, quick);
    assert_eq!(spun.status, JobStatus::TimedOut);
    let last = *took.last().unwrap();
    assert!(last < Duration::from_secs(1), "short jobs ended at {took:?}, beside a 2 s spin");
}

/// The pool holds every instance at the limits admitted per component: jobs of a
/// component with 16 core instances, 8 tables and 2 memories fill every slot at once,
/// and a job past the pool's slots is busy (given back to the queue), not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_components_fill_every_slot_and_the_next_job_is_busy() {
    let data = tempfile::tempdir().unwrap();
    let store = store::open(Backend::Redb, data.path()).unwrap();
    let config = WasmConfig { max_instances: 3, ..WasmConfig::default() };
    let executor = Arc::new(
        WasmExecutor::new(config, shared_cache_dir(), stored_binaries(store.clone())).unwrap(),
    );
    let binary = programs::read(programs::HEAVY);
    let heavy = put(&*store, &binary).await;
    executor.prepare(&heavy, &binary).await.unwrap();
    let binary = programs::read(programs::HELLO);
    let hello = put(&*store, &binary).await;
    executor.prepare(&hello, &binary).await.unwrap();

    let spinners: Vec<_> = (0..3)
        .map(|i| {
            let mut req = request("heavy", &heavy);
            req.job_id = format!("heavy-{i}");
            req.timeout = Duration::from_millis(1500);
            let executor = executor.clone();
            tokio::spawn(async move {
                executor.run(req, Arc::new(NoLiveOutput), CancellationToken::new()).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = executor
        .run(request("hello", &hello), Arc::new(NoLiveOutput), CancellationToken::new())
        .await;
    assert!(busy.is_busy(), "a fourth instance in a pool of three: {busy:?}");
    for spinner in spinners {
        let outcome = spinner.await.unwrap();
        assert_eq!(outcome.status, JobStatus::TimedOut, "{outcome:?}");
    }
    let outcome = executor
        .run(request("hello", &hello), Arc::new(NoLiveOutput), CancellationToken::new())
        .await;
    assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
}
