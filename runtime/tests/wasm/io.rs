//! What goes into a guest and what comes out of it.

use super::*;
use cloudpipe_types::JobStatus;

#[tokio::test]
async fn echo_gets_args_env_and_stdin_and_gives_back_stdout_stderr_and_exit_code() {
    let h = Harness::new();
    let id = h.upload(programs::ECHO).await;
    let mut req = request("echo", &id);
    req.job_id = "job-42".into();
    req.args = vec!["a b".into(), "c".into()];
    req.env = vec![("GREETING".into(), "hi".into()), ("CLOUDPIPE_ATTEMPT".into(), "forged".into())];
    req.stdin = bytes::Bytes::from_static(b"in\0put\n");
    req.attempt = 2;
    let live = Arc::new(Recorder::default());

    let outcome = h.executor.run(req, live.clone(), CancellationToken::new()).await;

    let expected = "argv=[\"echo\", \"a b\", \"c\"]\n\
                    CLOUDPIPE_JOB_ID=job-42\n\
                    CLOUDPIPE_FUNCTION=echo\n\
                    CLOUDPIPE_ATTEMPT=2\n\
                    GREETING=hi\n\
                    env_count=4\n\
                    stdin=in\0put\n";
    assert_eq!(text(&outcome.stdout), expected);
    assert_eq!(text(&outcome.stderr), "to stderr\n");
    assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.error, None);
    assert!(!outcome.stdout_truncated && !outcome.stderr_truncated);
    assert_eq!(text(&live.stdout.lock().unwrap()), expected, "live stdout");
    assert_eq!(text(&live.stderr.lock().unwrap()), "to stderr\n", "live stderr");
}

#[tokio::test]
async fn component_exiting_with_failure_gives_exit_code_1() {
    // Rust's `std::process::exit(7)` goes through `wasi:cli/exit.exit(err)`, which
    // carries no code: the job sees 1.
    let h = Harness::new();
    let id = h.upload(programs::ECHO).await;
    let mut req = request("echo", &id);
    req.args = vec!["--exit=7".into()];
    let outcome = h.run(req).await;
    assert_eq!(outcome.status, JobStatus::Failed);
    assert_eq!(outcome.exit_code, Some(1));
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, "exit");
    assert_eq!(error.message, "exited with code 1");
    assert!(text(&outcome.stdout).starts_with("argv="), "output before exit is kept");
}

#[tokio::test]
async fn component_calling_exit_with_code_gives_its_code() {
    let h = Harness::new();
    let id = h.upload(programs::EXIT_WITH_CODE).await;
    let outcome = h.run(request("exit_with_code", &id)).await;
    assert_eq!(text(&outcome.stdout), "exiting with 3\n");
    assert_eq!(outcome.status, JobStatus::Failed);
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.error.unwrap().kind, "exit");
}

#[tokio::test]
async fn preview1_module_proc_exit_gives_its_code() {
    let h = Harness::new();
    let binary = programs::read(programs::PROC_EXIT);
    let id = put(&*h.store, &binary).await;
    assert_eq!(h.executor.prepare(&id, &binary).await.unwrap(), FunctionKind::Module);
    let outcome = h.run(request("proc_exit", &id)).await;
    assert_eq!(text(&outcome.stdout), "hello from preview1\n");
    assert_eq!(outcome.status, JobStatus::Failed);
    assert_eq!(outcome.exit_code, Some(3));
}

#[tokio::test]
async fn hello_succeeds() {
    let h = Harness::new();
    let binary = programs::read(programs::HELLO);
    let id = put(&*h.store, &binary).await;
    assert_eq!(h.executor.prepare(&id, &binary).await.unwrap(), FunctionKind::Command);
    let outcome = h.run(request("hello", &id)).await;
    assert_eq!(outcome.status, JobStatus::Succeeded);
    assert_eq!(text(&outcome.stdout), "hello, world\n");
}

#[tokio::test]
async fn unknown_function_is_reported_not_found() {
    let h = Harness::new();
    let outcome = h.run(request("ghost", &format!("sha256:{}", "0".repeat(64)))).await;
    assert_eq!(outcome.status, JobStatus::Failed);
    assert_eq!(outcome.error.unwrap().kind, "function_not_found");
}
