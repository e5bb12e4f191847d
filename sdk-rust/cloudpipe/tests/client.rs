//! The client against the real `cloudpipe serve`: every call, its errors, and its
//! retries while the server comes up.

use std::time::{Duration, Instant};

use cloudpipe::{
    BatchSpec, BatchStatus, Client, Config, Error, Invocation, JobEvent, JobQuery, JobSpec,
    JobStatus, RetryPolicy,
};
use cloudpipe_test_programs_artifacts as programs;

use cloudpipe_test_support::serve::ADMIN_KEY as KEY;
use cloudpipe_test_support::server;
use server::Server;

fn client(url: &str) -> Client {
    Client::new(Config { api_key: Some(KEY.into()), ..Config::new(url) }).unwrap()
}

fn spec(function: &str, args: &[&str]) -> JobSpec {
    JobSpec {
        function: function.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..JobSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_functions_and_invocations_through_the_client() {
    let server = Server::start();
    let c = client(&server.url);

    let info = c.upload_function("hello", programs::read(programs::HELLO)).await.unwrap();
    assert!(info.id.starts_with("sha256:"), "{info:?}");
    assert_eq!(c.function("hello").await.unwrap().id, info.id);
    c.upload_function("sleep", programs::read(programs::SLEEP)).await.unwrap();
    c.upload_function("cgi", programs::read(programs::CGI)).await.unwrap();
    let names: Vec<String> =
        c.functions().await.unwrap().into_iter().filter_map(|f| f.name).collect();
    assert!(names.contains(&"sleep".to_string()), "{names:?}");

    // Submit and wait.
    let done = c.submit_and_wait(&spec("hello", &[]), None).await.unwrap();
    assert_eq!((done.status, done.stdout.as_str()), (JobStatus::Succeeded, "hello, world\n"));

    // Follow a job live: its status, then its output as it comes, then its end.
    let job = c.submit(&spec("sleep", &["1"])).await.unwrap();
    let mut events = c.events(&job.id).await.unwrap();
    let mut out = String::new();
    let mut last = None;
    while let Some(ev) = events.next().await.unwrap() {
        match ev {
            JobEvent::Stdout { data } => out.push_str(&data),
            JobEvent::Stderr { .. } => {}
            JobEvent::Status { status, record } => last = Some((status, record)),
        }
    }
    let (status, record) = last.expect("no status event");
    assert_eq!(status, JobStatus::Succeeded);
    let record = record.expect("the last event carries the record");
    assert_eq!(record.stdout, "sleeping\nwoke up\n");
    // At least the line written a second after the start came live.
    assert!(out.ends_with("woke up\n"), "{out:?}");

    // Cancel, and list by function.
    let job = c.submit(&spec("sleep", &["60"])).await.unwrap();
    c.cancel(&job.id).await.unwrap();
    let job = c.wait(&job.id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    let q = JobQuery {
        function: Some("sleep".into()),
        status: Some(JobStatus::Cancelled),
        ..JobQuery::default()
    };
    let list = c.jobs(&q).await.unwrap();
    assert_eq!(list.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);

    // Raw stdout.
    assert_eq!(&c.stdout(&done.id).await.unwrap()[..], b"hello, world\n");

    // Invocation over HTTP, whatever the status.
    let res = c.invoke("cgi", Invocation::get("/plain")).await.unwrap();
    assert_eq!((res.status, res.text().as_str()), (200, "just text"));
    assert!(res.invocation().is_some());
    let res = c.invoke("cgi", Invocation::get("/status")).await.unwrap();
    assert_eq!((res.status, res.text().as_str()), (404, "nope"));
    let res = c.invoke("cgi", Invocation::post("/binary", vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(&res.body[..], [0u8, 1, 2]);

    // Typed errors with the API's codes.
    let e = c.job("0190b1c2-0000-7000-8000-000000000000").await.unwrap_err();
    assert!(e.is_not_found() && e.code() == Some("not_found"), "{e:?}");
    let e = c.submit(&spec("no-such-function", &[])).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e:?}");
    let e = c.upload_function("bad", b"not wasm".to_vec()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("invalid_wasm")), "{e:?}");
    let wrong = Client::new(Config {
        api_key: Some("wrong-key-0123456789".into()),
        ..Config::new(&server.url)
    })
    .unwrap();
    let e = wrong.jobs(&JobQuery::default()).await.unwrap_err();
    assert!(e.is_auth(), "{e:?}");

    // The blocking facade, from a thread of its own.
    let url = server.url.clone();
    let stdout = tokio::task::spawn_blocking(move || {
        let c = cloudpipe::blocking::Client::new(Config {
            api_key: Some(KEY.into()),
            ..Config::new(url)
        })
        .unwrap();
        let job = c.submit_and_wait(&spec("hello", &[]), None).unwrap();
        let events: Vec<JobEvent> = c.events(&job.id).unwrap().map(Result::unwrap).collect();
        assert!(
            matches!(events.last(), Some(JobEvent::Status { status: JobStatus::Succeeded, .. })),
            "{events:?}"
        );
        job.stdout
    })
    .await
    .unwrap();
    assert_eq!(stdout, "hello, world\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_through_the_client() {
    let server = Server::start();
    let c = client(&server.url);
    c.upload_function("sleep", programs::read(programs::SLEEP)).await.unwrap();

    // Three inputs of a second, two at a time, and one that fails (`sleep bad` panics).
    let inputs = ["1", "1", "1", "bad"].map(|a| vec![a.to_string()]).to_vec();
    let bspec = BatchSpec {
        template: spec("sleep", &[]),
        inputs: Some(inputs),
        split: Some(2),
        ..BatchSpec::default()
    };
    let b = c.create_batch(&bspec).await.unwrap();
    assert_eq!((b.status, b.total, b.split), (BatchStatus::Running, 4, 2), "{b:?}");
    let e = c.resume_batch(&b.id).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "a running batch is not resumed: {e:?}");

    // Cancelled while its first jobs sleep: what did not end is pending again.
    let stopped = c.cancel_batch(&b.id).await.unwrap();
    assert_eq!(stopped.status, BatchStatus::Cancelled, "{stopped:?}");
    assert_eq!(stopped.counts.running, 0, "{stopped:?}");
    assert!(stopped.counts.pending >= 2, "{stopped:?}");
    assert_eq!(c.batch(&b.id).await.unwrap().status, BatchStatus::Cancelled);
    let listed = c.batches().await.unwrap();
    assert_eq!(listed.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), [b.id.as_str()]);
    let q = JobQuery { batch: Some(b.id.clone()), ..JobQuery::default() };
    let jobs = c.jobs(&q).await.unwrap().jobs;
    assert!(!jobs.is_empty() && jobs.iter().all(|j| j.batch.as_ref() == Some(&b.id)), "{jobs:?}");
    assert!(jobs.iter().any(|j| j.status == JobStatus::Cancelled), "{jobs:?}");

    // Resumed, it runs what was left to the end.
    let resumed = c.resume_batch(&b.id).await.unwrap();
    assert_eq!(resumed.status, BatchStatus::Running);
    let done = c.wait_batch(&b.id, Some(Duration::from_secs(60))).await.unwrap();
    assert_eq!(done.status, BatchStatus::Finished, "{done:?}");
    assert_eq!((done.counts.ok, done.counts.failed, done.counts.pending), (3, 1, 0), "{done:?}");

    // Retried (from the blocking facade), the failed input runs once more, and fails.
    let (url, id) = (server.url.clone(), b.id.clone());
    let again = tokio::task::spawn_blocking(move || {
        let c = cloudpipe::blocking::Client::new(Config {
            api_key: Some(KEY.into()),
            ..Config::new(url)
        })
        .unwrap();
        c.retry_batch(&id).unwrap();
        c.wait_batch(&id, Some(Duration::from_secs(30))).unwrap()
    })
    .await
    .unwrap();
    assert_eq!((again.status, again.counts.ok, again.counts.failed), (BatchStatus::Finished, 3, 1));
    let failed = JobQuery { status: Some(JobStatus::Failed), ..q };
    let jobs = c.jobs(&failed).await.unwrap().jobs;
    assert_eq!(jobs.len(), 2, "two tries of `bad`: {jobs:?}");
    assert!(jobs.iter().all(|j| j.batch_index == Some(3)), "{jobs:?}");

    let e = c.batch("no-such-batch").await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_retried_until_the_server_is_up() {
    // Built first, so that the wait below is the server's start alone.
    server::server_bin();
    // A free port; the server takes it a moment after the first request failed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Server::start_on(&addr.to_string())
    });
    let policy = RetryPolicy {
        max_retries: 40,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..RetryPolicy::default()
    };
    let c = client(&format!("http://{addr}")).with_retry(policy);
    let start = Instant::now();
    let list = c.jobs(&JobQuery::default()).await;
    let _server = starter.join().unwrap();
    let list =
        list.unwrap_or_else(|e: Error| panic!("no answer after {:?}: {e:?}", start.elapsed()));
    assert!(list.jobs.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_answers_are_retried_after_their_retry_after() {
    let server = Server::start();
    let c = client(&server.url);
    let one_at_a_time =
        cloudpipe::FunctionSettingsPatch { max_concurrency: Some(1), ..Default::default() };
    c.upload_function_with(Some("cgi"), programs::read(programs::CGI), &one_at_a_time)
        .await
        .unwrap();

    // `/sleep` holds the function's only slot for a second.
    let holder = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("cgi", Invocation::get("/sleep")).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Without retries the 503 comes back as it is.
    let res = c
        .clone()
        .with_retry(RetryPolicy::none())
        .invoke("cgi", Invocation::get("/plain"))
        .await
        .unwrap();
    assert_eq!(res.status, 503, "{}", res.text());
    assert!(res.headers.contains_key("retry-after"));

    // With retries, the call waits for Retry-After (1 s) and gets through once the
    // slot is free; its own backoff alone (10 ms, then 20 ms) would have given up.
    let quick = RetryPolicy {
        max_retries: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        ..RetryPolicy::default()
    };
    let start = Instant::now();
    let res = c.clone().with_retry(quick).invoke("cgi", Invocation::get("/plain")).await.unwrap();
    assert_eq!((res.status, res.text().as_str()), (200, "just text"));
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    assert_eq!(holder.await.unwrap().status, 200);
}
