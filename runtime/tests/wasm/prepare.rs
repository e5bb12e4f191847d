//! What `prepare` refuses, and the compiled cache across executors.

use cloudpipe_runtime::executor::PrepareError;
use cloudpipe_types::JobStatus;

use super::*;

async fn refusal(h: &Harness, binary: &[u8]) -> String {
    let id = format!("sha256:{}", hex::encode(Sha256::digest(binary)));
    match h.executor.prepare(&id, binary).await {
        Err(PrepareError::Invalid(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn prepare_refuses_what_is_not_wasm() {
    let h = Harness::new();
    let message = refusal(&h, b"#!/bin/sh\necho hi\n").await;
    assert!(message.contains("not a WebAssembly binary"), "{message}");
    // The engine accepts WAT text; the executor takes binaries only.
    let message = refusal(&h, b"(module (func (export \"_start\")))").await;
    assert!(message.contains("not a WebAssembly binary"), "{message}");
}

#[tokio::test]
async fn prepare_refuses_malformed_binaries() {
    let h = Harness::new();
    let message = refusal(&h, b"\0asm\x01\0\0\0\xff\xff\xff").await;
    assert!(message.starts_with("invalid module"), "{message}");
    let hello = programs::read(programs::HELLO);
    let message = refusal(&h, &hello[..hello.len() / 2]).await;
    assert!(message.starts_with("invalid component"), "{message}");
}

#[tokio::test]
async fn prepare_refuses_a_component_that_is_not_a_command() {
    let h = Harness::new();
    let message = refusal(&h, &programs::read(programs::LIBRARY)).await;
    assert!(message.contains("not a wasi:cli/command"), "{message}");
    assert!(message.contains("add"), "lists its exports: {message}");
}

#[tokio::test]
async fn prepare_refuses_a_module_without_start() {
    let h = Harness::new();
    let message = refusal(&h, &programs::read(programs::NO_START)).await;
    assert!(message.contains("no `_start` export"), "{message}");
}

#[tokio::test]
async fn prepare_refuses_a_module_with_unknown_imports() {
    let h = Harness::new();
    let message = refusal(&h, &programs::read(programs::UNKNOWN_IMPORT)).await;
    assert!(message.contains("env::launch_rockets"), "{message}");
}

#[tokio::test]
async fn compiled_artefact_is_reused_by_a_new_executor() {
    let cache = tempfile::tempdir().unwrap();
    let binary = programs::read(programs::HELLO);

    let first = Harness::with_cache(cache.path());
    let id = put(&*first.store, &binary).await;
    first.executor.prepare(&id, &binary).await.unwrap();
    assert_eq!(first.executor.compiles(), 1);
    first.executor.prepare(&id, &binary).await.unwrap();
    assert_eq!(first.executor.compiles(), 1, "a prepared function is not compiled again");
    let store = first.store.clone();
    drop(first.executor);

    // A restart: a new executor over the same cache dir and store.
    let second = WasmExecutor::new(test_config(), cache.path(), stored_binaries(store)).unwrap();
    let outcome =
        second.run(request("hello", &id), Arc::new(NoLiveOutput), CancellationToken::new()).await;
    assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
    assert_eq!(text(&outcome.stdout), "hello, world\n");
    assert_eq!(second.compiles(), 0, "the artefact on disk was loaded, not recompiled");
    assert_eq!(second.prepare(&id, &binary).await.unwrap(), FunctionKind::Command);
    assert_eq!(second.compiles(), 0);
}

#[tokio::test]
async fn first_run_compiles_a_stored_function_once() {
    let cache = tempfile::tempdir().unwrap();
    let h = Harness::with_cache(cache.path());
    let id = put(&*h.store, &programs::read(programs::HELLO)).await;
    let runs = (0..4).map(|_| h.run(request("hello", &id)));
    for outcome in futures::future::join_all(runs).await {
        assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
    }
    assert_eq!(h.executor.compiles(), 1, "concurrent first runs share one compilation");
}

#[tokio::test]
async fn corrupt_artefact_is_compiled_again() {
    let cache = tempfile::tempdir().unwrap();
    let binary = programs::read(programs::HELLO);
    let first = Harness::with_cache(cache.path());
    let id = put(&*first.store, &binary).await;
    first.executor.prepare(&id, &binary).await.unwrap();
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"\x7fELF garbage").unwrap();
    }
    let second =
        WasmExecutor::new(test_config(), cache.path(), stored_binaries(first.store.clone()))
            .unwrap();
    let outcome =
        second.run(request("hello", &id), Arc::new(NoLiveOutput), CancellationToken::new()).await;
    assert_eq!(outcome.status, JobStatus::Succeeded, "{outcome:?}");
    assert_eq!(second.compiles(), 1);
}

#[tokio::test]
async fn prepare_refuses_a_component_over_the_limits_per_component() {
    let h = Harness::new();
    let binary = programs::read(programs::TOO_HEAVY);
    let id = format!("sha256:{}", hex::encode(Sha256::digest(&binary)));
    let message = match h.executor.prepare(&id, &binary).await {
        Err(PrepareError::OverLimits(message)) => message,
        other => panic!("expected a refusal over the limits, got {other:?}"),
    };
    assert!(message.contains("17 core module instances"), "{message}");
    assert!(message.contains("at most 16 core instances"), "{message}");
    // At the limits is fine.
    h.upload(programs::HEAVY).await;
}
