//! Accounts, API keys and tenant isolation, over real HTTP (and HTTPS).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::server::{ADMIN_KEY, TestServer, code, program};

/// A request with the given `Authorization` value (none: `None`).
async fn call(
    s: &TestServer,
    auth: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, format!("{}{path}", s.url));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = res.status();
    let bytes = res.bytes().await.unwrap();
    (
        st,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
    )
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn basic(account: &str, key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{account}:{key}"))
    )
}

/// Every route of the API, as the OpenAPI document lists them, plus HTTP invocation:
/// without a key, with a wrong key, with a key of the wrong account, and with account
/// B's key against account A's resources. A route missing from the table below fails
/// this test: whoever adds a route says here how it treats strangers.
#[tokio::test]
async fn every_route_refuses_strangers_and_hides_other_accounts_resources() {
    let s = TestServer::start(&["--auth-failures-per-minute", "0"]).await;
    let (alice, alice_key_id) = s.account("alice", json!({})).await;
    let (bob, _) = s.account("bob", json!({})).await;
    let a = bearer(&alice);
    let b = bearer(&bob);

    // Alice's resources: a function (invoked once, so it has a log) and a job.
    let (st, f) = call(
        &s,
        Some(&a),
        Method::POST,
        "/v1/functions?name=alice-fn",
        Some(program(programs::HELLO)),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{f}");
    assert_eq!(f["account"], "alice");
    let (st, job) = call(
        &s,
        Some(&a),
        Method::POST,
        "/v1/jobs?wait=30s",
        Some(br#"{"function":"alice-fn"}"#.to_vec()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    assert_eq!(job["account"], "alice");
    let job_id = job["id"].as_str().unwrap().to_string();
    let batch = br#"{"template":{"function":"alice-fn"},"inputs":[["x"]]}"#.to_vec();
    let (st, batch) = call(&s, Some(&a), Method::POST, "/v1/batches", Some(batch)).await;
    assert_eq!(st, StatusCode::CREATED, "{batch}");
    let batch_id = batch["id"].as_str().unwrap().to_string();
    let (st, _) = call(&s, Some(&a), Method::GET, "/fn/alice-fn", None).await;
    assert_eq!(st, StatusCode::OK);
    let secret = br#"{"value":"alice-value"}"#.to_vec();
    let (st, _) = call(&s, Some(&a), Method::PUT, "/v1/secrets/alice-token", Some(secret)).await;
    assert_eq!(st, StatusCode::CREATED);

    // The route list, from the server itself.
    let (st, doc) = call(&s, None, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(st, StatusCode::OK);
    let mut routes: Vec<(Method, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            if !["get", "post", "put", "patch", "delete"].contains(&m.as_str()) {
                continue;
            }
            routes.push((m.to_uppercase().parse().unwrap(), path.clone()));
        }
    }
    for m in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
        routes.push((m.clone(), "/fn/{name}".into()));
        routes.push((m, "/fn/{name}/{path}".into()));
    }

    // What B's key gets on each route when it points at A's resources.
    enum Stranger {
        Public,
        NotFound,
        AdminOnly,
        /// Answers, but shows nothing of A's.
        OwnOnly,
        /// Creates B's own resource (of the same name), showing nothing of A's.
        CreatesOwn,
        Status(StatusCode, &'static str),
    }
    use Stranger::*;
    let expected = |m: &Method, p: &str| -> Option<Stranger> {
        Some(match (m.as_str(), p) {
            ("GET", "/healthz") | ("GET", "/v1/openapi.json") => Public,
            ("GET", "/metrics") => AdminOnly,
            ("GET", "/v1/nodes") => AdminOnly,
            // The server's executors: the same for every account.
            ("GET", "/v1/executors") => OwnOnly,
            ("POST", "/v1/accounts") | ("GET", "/v1/accounts") => AdminOnly,
            ("PATCH", "/v1/accounts/{name}") => AdminOnly,
            ("GET", "/v1/accounts/{name}") => NotFound,
            ("POST", "/v1/accounts/{name}/keys") | ("GET", "/v1/accounts/{name}/keys") => NotFound,
            ("DELETE", "/v1/keys/{id}") => NotFound,
            ("GET", "/v1/me") => OwnOnly,
            ("GET", "/v1/batches") => OwnOnly,
            // A batch of A's function: there is no such function for B.
            ("POST", "/v1/batches") => NotFound,
            ("GET" | "DELETE", "/v1/batches/{id}") => NotFound,
            ("POST", p) if p.starts_with("/v1/batches/{id}/") => NotFound,
            ("GET", "/v1/functions") | ("GET", "/v1/jobs") => OwnOnly,
            // Uploading under A's name: the name is taken (names are global URLs).
            ("POST", "/v1/functions") => Status(StatusCode::CONFLICT, "name_taken"),
            // Submitting a job of A's function: there is no such function for B.
            ("POST", "/v1/jobs") => NotFound,
            ("GET" | "PATCH" | "DELETE", "/v1/functions/{name}") => NotFound,
            ("GET", "/v1/functions/{name}/logs") => NotFound,
            ("GET", p) if p.starts_with("/v1/jobs/{id}") => NotFound,
            ("POST", "/v1/jobs/{id}/cancel") => NotFound,
            (_, "/fn/{name}") | (_, "/fn/{name}/{path}") => NotFound,
            // Cloudpipe v1's API. A submit creates B's own job: a bad one here, so
            // that no engine is needed.
            ("POST", "/v1/job") => Status(StatusCode::BAD_REQUEST, "JCMD"),
            // Asked for A's job by jid: B's (empty) list.
            ("GET", "/v1/job") | ("GET", "/v1/job/queue_stats") => OwnOnly,
            ("POST", "/v1/job/kill") => NotFound,
            ("POST", "/v1/job/kill_all") => OwnOnly,
            // Secrets are per account: B's list is B's; A's names are B's to reuse.
            ("GET", "/v1/secrets") => OwnOnly,
            ("PUT", "/v1/secrets/{name}") => CreatesOwn,
            ("DELETE", "/v1/secrets/{name}") => NotFound,
            _ => return None,
        })
    };
    let unlisted: Vec<_> = routes
        .iter()
        .filter(|(m, p)| expected(m, p).is_none())
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(unlisted.is_empty(), "routes without an entry in this test's table: {unlisted:?}");

    let fill = |p: &str| {
        let name = if p.starts_with("/v1/accounts") {
            "alice"
        } else if p.starts_with("/v1/secrets") {
            "alice-token"
        } else {
            "alice-fn"
        };
        let id = if p.starts_with("/v1/keys") {
            alice_key_id.as_str()
        } else if p.starts_with("/v1/batches") {
            batch_id.as_str()
        } else {
            job_id.as_str()
        };
        p.replace("{name}", name).replace("{id}", id).replace("{path}", "x")
    };
    // A's job as v1 names it: its id's 128 bits.
    let jid = u128::from_str_radix(&job_id.replace('-', ""), 16).unwrap();
    let body_for = |m: &Method, p: &str| -> Option<Vec<u8>> {
        match (m.as_str(), p) {
            ("POST", "/v1/job") => Some(br#"{"jobs":[{"name":"no command"}]}"#.to_vec()),
            ("POST", "/v1/job/kill") => Some(format!("jid={jid}").into_bytes()),
            ("POST", "/v1/functions") => Some(program(programs::HELLO)),
            ("POST", "/v1/jobs") => Some(br#"{"function":"alice-fn"}"#.to_vec()),
            ("POST", "/v1/batches") => {
                Some(br#"{"template":{"function":"alice-fn"},"inputs":[["y"]]}"#.to_vec())
            }
            ("POST", "/v1/accounts") => Some(br#"{"name":"mallory"}"#.to_vec()),
            ("PATCH", "/v1/accounts/{name}") => Some(br#"{"disabled":true}"#.to_vec()),
            ("PATCH", "/v1/functions/{name}") => Some(br#"{"public":true}"#.to_vec()),
            ("POST", "/v1/accounts/{name}/keys") => Some(b"{}".to_vec()),
            ("PUT", "/v1/secrets/{name}") => Some(br#"{"value":"bob-value"}"#.to_vec()),
            _ => None,
        }
    };
    let wrong_keys = [
        bearer("cpk_not_a_key_at_all_0000000000000000000000000"),
        basic("alice", &bob),
        basic("bob", "cpk_wrong"),
        "Bearer ".to_string() + &alice[..alice.len() - 1],
    ];
    let mut checked = BTreeSet::new();
    for (m, p) in &routes {
        let path = match (m.as_str(), p.as_str()) {
            ("POST", "/v1/functions") => "/v1/functions?name=alice-fn".to_string(),
            ("GET", "/v1/jobs/{id}/result") => format!("/v1/jobs/{job_id}/result?wait=1ms"),
            ("GET", "/v1/job") => format!("/v1/job?jid={jid}"),
            // Under a name of B's own, so that the delete above (of A's name) still
            // finds nothing of B's, whatever the order.
            ("PUT", "/v1/secrets/{name}") => "/v1/secrets/bobs-own".to_string(),
            _ => fill(p),
        };
        let public = matches!(expected(m, p), Some(Public));
        let (st, body) = call(&s, None, m.clone(), &path, body_for(m, p)).await;
        if public {
            assert_eq!(st, StatusCode::OK, "{m} {path} without a key: {body}");
            continue;
        }
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{m} {path} without a key: {body}");
        assert_eq!(code(&body), "unauthenticated", "{m} {path}");
        for wrong in &wrong_keys {
            let (st, body) = call(&s, Some(wrong), m.clone(), &path, body_for(m, p)).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{m} {path} with a wrong key: {body}");
            assert_eq!(code(&body), "invalid_credentials", "{m} {path}");
        }
        let (st, body) = call(&s, Some(&b), m.clone(), &path, body_for(m, p)).await;
        match expected(m, p).unwrap() {
            Public => unreachable!(),
            NotFound => {
                assert_eq!(st, StatusCode::NOT_FOUND, "{m} {path} with B's key: {body}");
            }
            AdminOnly => {
                assert_eq!(st, StatusCode::FORBIDDEN, "{m} {path} with B's key: {body}");
                assert_eq!(code(&body), "forbidden");
            }
            OwnOnly => {
                assert_eq!(st, StatusCode::OK, "{m} {path} with B's key: {body}");
                let text = body.to_string();
                assert!(!text.contains("alice"), "{m} {path} shows A's resources to B: {text}");
            }
            CreatesOwn => {
                assert_eq!(st, StatusCode::CREATED, "{m} {path} with B's key: {body}");
                let text = body.to_string();
                assert!(!text.contains("alice"), "{m} {path} shows A's resources to B: {text}");
            }
            Status(want, want_code) => {
                assert_eq!(st, want, "{m} {path} with B's key: {body}");
                assert_eq!(code(&body), want_code);
            }
        }
        checked.insert(format!("{m} {p}"));
    }
    assert!(checked.len() >= 25, "too few routes checked: {checked:?}");

    // After all that, A's resources are untouched and A's key still works.
    let (st, f) = call(&s, Some(&a), Method::GET, "/v1/functions/alice-fn", None).await;
    assert_eq!((st, f["settings"]["public"].as_bool()), (StatusCode::OK, Some(false)), "{f}");
    let (st, j) = call(&s, Some(&a), Method::GET, &format!("/v1/jobs/{job_id}"), None).await;
    assert_eq!((st, j["status"].as_str()), (StatusCode::OK, Some("succeeded")));
    let (st, me) = call(&s, Some(&a), Method::GET, "/v1/me", None).await;
    assert_eq!((st, me["account"].as_str()), (StatusCode::OK, Some("alice")));
    let (st, batch) =
        call(&s, Some(&a), Method::GET, &format!("/v1/batches/{batch_id}"), None).await;
    assert_eq!((st, batch["account"].as_str()), (StatusCode::OK, Some("alice")), "{batch}");
    let (st, secrets) = call(&s, Some(&a), Method::GET, "/v1/secrets", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(secrets["secrets"].as_array().unwrap().len(), 1, "A's secret stays A's alone");
    // Basic auth with the right account works like Bearer.
    let (st, me) = call(&s, Some(&basic("alice", &alice)), Method::GET, "/v1/me", None).await;
    assert_eq!((st, me["account"].as_str()), (StatusCode::OK, Some("alice")));
    // The admin sees everyone's.
    let (st, all) = s.get("/v1/jobs").await;
    assert_eq!(st, StatusCode::OK);
    assert!(all["jobs"].as_array().unwrap().iter().any(|j| j["id"] == job_id.as_str()));
    let (st, _) = s.get("/v1/functions/alice-fn").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn public_functions_answer_anyone_private_ones_only_their_account() {
    let s = TestServer::start(&["--auth-failures-per-minute", "0"]).await;
    let (alice, _) = s.account("alice", json!({})).await;
    let (bob, _) = s.account("bob", json!({})).await;
    let (a, b) = (bearer(&alice), bearer(&bob));
    let hello = program(programs::HELLO);
    let up = |name: &str, public: bool| {
        let path = format!("/v1/functions?name={name}&public={public}");
        let (a, hello) = (a.clone(), hello.clone());
        let s = &s;
        async move { call(s, Some(&a), Method::POST, &path, Some(hello)).await }
    };
    assert_eq!(up("open", true).await.0, StatusCode::CREATED);
    assert_eq!(up("closed", false).await.0, StatusCode::CREATED);

    assert_eq!(call(&s, None, Method::GET, "/fn/open", None).await.0, StatusCode::OK);
    assert_eq!(call(&s, Some(&b), Method::GET, "/fn/open", None).await.0, StatusCode::OK);
    let (st, body) = call(&s, None, Method::GET, "/fn/closed", None).await;
    assert_eq!((st, code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    // Without a key, a missing function looks the same as a private one.
    let (st, body) = call(&s, None, Method::GET, "/fn/missing", None).await;
    assert_eq!((st, code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    assert_eq!(call(&s, Some(&b), Method::GET, "/fn/closed", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&s, Some(&a), Method::GET, "/fn/closed", None).await.0, StatusCode::OK);
    // The admin reaches it too.
    let (st, _) = call(&s, Some(&bearer(ADMIN_KEY)), Method::GET, "/fn/closed", None).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_key_fails_on_the_next_request_and_a_disabled_accounts_jobs_do_not_run() {
    let data = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(data.path(), &["--concurrency", "1"]).await;
    let (key1, key1_id) = s.account("carol", json!({})).await;
    let (st, key2) = s.post_json("/v1/accounts/carol/keys", &json!({})).await;
    assert_eq!(st, StatusCode::CREATED);
    let key2 = bearer(key2["key"].as_str().unwrap());
    let (k1, me) = (bearer(&key1), "/v1/me");
    assert_eq!(call(&s, Some(&k1), Method::GET, me, None).await.0, StatusCode::OK);

    // Carol revokes her own first key; it fails on the very next request.
    let (st, revoked) =
        call(&s, Some(&k1), Method::DELETE, &format!("/v1/keys/{key1_id}"), None).await;
    assert_eq!((st, revoked["id"].as_str()), (StatusCode::OK, Some(key1_id.as_str())));
    let (st, body) = call(&s, Some(&k1), Method::GET, me, None).await;
    assert_eq!((st, code(&body)), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    assert_eq!(call(&s, Some(&key2), Method::GET, me, None).await.0, StatusCode::OK);
    let (st, keys) = s.get("/v1/accounts/carol/keys").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert!(!keys.to_string().contains("cpk_"), "listing shows no secret: {keys}");

    // One slot: Carol's first job sleeps in it, three more wait in the queue.
    let (st, _) = call(
        &s,
        Some(&key2),
        Method::POST,
        "/v1/functions?name=nap",
        Some(program(programs::SLEEP)),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let spec = br#"{"function":"nap","args":["30"],"timeout_ms":60000}"#.to_vec();
        let (st, job) = call(&s, Some(&key2), Method::POST, "/v1/jobs", Some(spec)).await;
        assert_eq!(st, StatusCode::CREATED, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let (st, acct) = call(
        &s,
        Some(&bearer(ADMIN_KEY)),
        Method::PATCH,
        "/v1/accounts/carol",
        Some(br#"{"disabled":true}"#.to_vec()),
    )
    .await;
    assert_eq!((st, acct["disabled"].as_bool()), (StatusCode::OK, Some(true)), "{acct}");
    let (st, body) = call(&s, Some(&key2), Method::GET, me, None).await;
    assert_eq!((st, code(&body)), (StatusCode::FORBIDDEN, "account_disabled"));
    for (i, id) in ids.iter().enumerate() {
        let job = s.wait_terminal(id).await;
        assert_eq!(job["status"], "cancelled", "{job}");
        if i > 0 {
            assert!(job["started_at"].is_null(), "a queued job of a disabled account ran: {job}");
        }
    }
    // Still disabled, and still refused, after a restart.
    s.kill9();
    let s = TestServer::start_in(data.path(), &["--concurrency", "1"]).await;
    let (st, body) = call(&s, Some(&key2), Method::GET, me, None).await;
    assert_eq!((st, code(&body)), (StatusCode::FORBIDDEN, "account_disabled"));
    // An admin cannot be disabled (nobody could undo it).
    let (st, body) = s
        .request(Method::PATCH, "/v1/accounts/admin", Some(br#"{"disabled":true}"#.to_vec()))
        .await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    // Enabled again, the key works.
    let (st, _) = s
        .request(Method::PATCH, "/v1/accounts/carol", Some(br#"{"disabled":false}"#.to_vec()))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(call(&s, Some(&key2), Method::GET, me, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn quotas_are_enforced_with_429() {
    let s = TestServer::start(&["--concurrency", "1"]).await;
    let sleep_size = program(programs::SLEEP).len() as u64;
    let quotas = json!({
        "max_concurrent_jobs": 2,
        "max_timeout_ms": 5000,
        "max_memory_mb": 64,
        "max_function_bytes": sleep_size + 100,
    });
    let (key, _) = s.account("dave", json!({"quotas": quotas})).await;
    let d = bearer(&key);
    let (st, _) =
        call(&s, Some(&d), Method::POST, "/v1/functions?name=nap", Some(program(programs::SLEEP)))
            .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, body) =
        call(&s, Some(&d), Method::POST, "/v1/functions?name=echo", Some(program(programs::ECHO)))
            .await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    // The same version again costs nothing.
    let (st, _) =
        call(&s, Some(&d), Method::POST, "/v1/functions?name=nap", Some(program(programs::SLEEP)))
            .await;
    assert_eq!(st, StatusCode::CREATED);

    let submit = |spec: Value| {
        let d = d.clone();
        let s = &s;
        async move {
            call(s, Some(&d), Method::POST, "/v1/jobs", Some(spec.to_string().into_bytes())).await
        }
    };
    let (st, body) = submit(json!({"function": "nap", "timeout_ms": 6000})).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    let (st, body) = submit(json!({"function": "nap", "memory_mb": 65})).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");

    let mut ids = Vec::new();
    for _ in 0..2 {
        let (st, job) = submit(json!({"function": "nap", "args": ["4"]})).await;
        assert_eq!(st, StatusCode::CREATED, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let (st, body) = submit(json!({"function": "nap", "args": ["4"]})).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    let (st, me) = call(&s, Some(&d), Method::GET, "/v1/me", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(me["active_jobs"], 2, "{me}");
    assert_eq!(me["function_bytes"], sleep_size, "{me}");
    assert_eq!(me["quotas"]["max_concurrent_jobs"], 2);
    // The admin has no quotas.
    let (_, admin_me) = s.get("/v1/me").await;
    assert_eq!(admin_me["quotas"], json!({}), "{admin_me}");

    // A job that ends frees its place.
    let (st, _) =
        call(&s, Some(&d), Method::POST, &format!("/v1/jobs/{}/cancel", ids[1]), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, job) = submit(json!({"function": "nap", "args": ["0"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    // A job that names no timeout gets at most the account's.
    let (_, rec) =
        call(&s, Some(&d), Method::GET, &format!("/v1/jobs/{}", job["id"].as_str().unwrap()), None)
            .await;
    assert_eq!(rec["account"], "dave");
}

/// A small Cloudpipe-protocol auth service: `GET /auth/validate?accountName&apiKey`,
/// 204 for (`ext`, `good`) and (`ext2`, `good`), 404 otherwise; counts its calls.
async fn start_auth_service(calls: Arc<AtomicUsize>) -> (String, tokio::task::JoinHandle<()>) {
    use axum::extract::Query;
    use std::collections::HashMap;
    let app = axum::Router::new().route(
        "/auth/validate",
        axum::routing::get(move |Query(q): Query<HashMap<String, String>>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let ok = matches!(q.get("accountName").map(String::as_str), Some("ext" | "ext2"))
                    && q.get("apiKey").map(String::as_str) == Some("good");
                if ok {
                    axum::http::StatusCode::NO_CONTENT
                } else {
                    axum::http::StatusCode::NOT_FOUND
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, task)
}

#[tokio::test]
async fn external_auth_service_validates_keys_with_a_cache_and_503_when_down() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (url, service) = start_auth_service(calls.clone()).await;
    let s = TestServer::start(&["--auth-url", &url, "--auth-cache-secs", "60"]).await;
    let ext = basic("ext", "good");
    let (st, me) = call(&s, Some(&ext), Method::GET, "/v1/me", None).await;
    assert_eq!((st, me["account"].as_str()), (StatusCode::OK, Some("ext")), "{me}");
    assert_eq!(me["role"], "user");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Cached: no second call. `Bearer ACCOUNT:KEY` is the same credential.
    let (st, _) = call(&s, Some("Bearer ext:good"), Method::GET, "/v1/me", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the valid answer is cached");
    let (st, body) = call(&s, Some(&basic("ext", "bad")), Method::GET, "/v1/me", None).await;
    assert_eq!((st, code(&body)), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // External accounts own what they make, like built-in ones.
    let (st, f) = call(
        &s,
        Some(&ext),
        Method::POST,
        "/v1/functions?name=ext-fn",
        Some(program(programs::HELLO)),
    )
    .await;
    assert_eq!((st, f["account"].as_str()), (StatusCode::CREATED, Some("ext")), "{f}");
    let (st, _) =
        call(&s, Some(&basic("ext2", "good")), Method::GET, "/v1/functions/ext-fn", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The admin's built-in key works without asking the service.
    let before = calls.load(Ordering::SeqCst);
    let (st, _) = s.get("/v1/accounts").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), before);

    // The service goes down: a credential not in the cache gets a clear 503.
    service.abort();
    let _ = service.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = reqwest::Client::new()
        .get(format!("{}/v1/me", s.url))
        .header("authorization", basic("ext3", "good"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "auth_unavailable", "{body}");
    // A cached credential keeps working meanwhile.
    assert_eq!(call(&s, Some(&ext), Method::GET, "/v1/me", None).await.0, StatusCode::OK);
    assert!(!s.log().contains("good"), "a secret reached the log:\n{}", s.log());
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address_and_secrets_stay_out_of_logs() {
    let s = TestServer::start(&["--auth-failures-per-minute", "5"]).await;
    let guesses: Vec<String> =
        (0..5).map(|i| format!("cpk_guess_number_{i}_xxxxxxxxxxxx")).collect();
    for g in &guesses {
        let (st, _) = call(&s, Some(&bearer(g)), Method::GET, "/v1/me", None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    let res = reqwest::Client::new()
        .get(format!("{}/v1/me", s.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "even a right key waits out the block");
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "too_many_auth_failures");
    // Requests without credentials are not guesses.
    assert_eq!(call(&s, None, Method::GET, "/healthz", None).await.0, StatusCode::OK);
    let log = s.log();
    assert!(log.contains("authentication failed"), "{log}");
    for secret in guesses.iter().map(String::as_str).chain([ADMIN_KEY]) {
        assert!(!log.contains(secret), "a key reached the log:\n{log}");
    }
}

#[test]
fn first_start_prints_the_admin_key_once_and_writes_credentials_for_the_cli() {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("cfg/credentials.json");
    let bin = env!("CARGO_BIN_EXE_cloudpipe");
    let start = || {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env_remove("CLOUDPIPE_ADMIN_KEY")
            .env("CLOUDPIPE_CREDENTIALS", &creds)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read stderr to the end in a thread: the server must not write into a
        // closed pipe.
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            let mut tx = Some(tx);
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log += &line;
                log.push('\n');
                if line.contains("cloudpipe serving")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(log.clone());
                }
            }
        });
        let log = rx.recv_timeout(Duration::from_secs(60)).expect("the server did not start");
        (child, log)
    };
    let (mut child, log) = start();
    let file: Value = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    let key = file["api_key"].as_str().unwrap().to_string();
    assert_eq!(file["account"], "admin");
    assert!(key.starts_with("cpk_") && key.len() >= 40, "{key}");
    assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!log.contains(&key), "the key reached the log:\n{log}");

    // The CLI reads the file: create an account and a key, then read the account.
    let cli = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("CLOUDPIPE_CREDENTIALS", &creds)
            .env_remove("CLOUDPIPE_URL")
            .env_remove("CLOUDPIPE_API_KEY")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, out, err) = cli(&["accounts", "create", "erin", "--max-concurrent-jobs", "3"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["keys", "create", "erin", "--label", "laptop"]);
    assert!(ok, "{out}{err}");
    let erin_key =
        serde_json::from_str::<Value>(&out).unwrap()["key"].as_str().unwrap().to_string();
    let out = Command::new(bin)
        .args(["me"])
        .env("CLOUDPIPE_CREDENTIALS", &creds)
        .env("CLOUDPIPE_API_KEY", &erin_key)
        .output()
        .unwrap();
    let me: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (me["account"].as_str(), me["quotas"]["max_concurrent_jobs"].as_u64()),
        (Some("erin"), Some(3))
    );
    let (ok, _, err) = cli(&["accounts", "create", "erin"]);
    assert!(!ok && err.contains("account_exists"), "{err}");

    let _ = child.kill();
    let _ = child.wait();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.contains(&key), "the key is shown once on first start: {stdout}");

    // A second start makes no new key and leaves the file alone.
    let (mut child, _) = start();
    let _ = child.kill();
    let _ = child.wait();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(!stdout.contains("cpk_"), "{stdout}");
    let again: Value = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    assert_eq!(again["api_key"].as_str(), Some(key.as_str()));
}

#[tokio::test]
async fn serves_https_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let s = TestServer::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ])
    .await;
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let res = client.get(format!("{}/v1/me", s.url)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["account"], "admin");
    let res = client.get(format!("{}/v1/me", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Plain HTTP on the TLS port gets no API answer.
    let plain = s.url.replace("https://", "http://");
    let res = reqwest::Client::new().get(format!("{plain}/healthz")).send().await;
    assert!(res.is_err() || !res.unwrap().status().is_success());
}
