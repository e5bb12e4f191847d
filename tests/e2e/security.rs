//! The holes a review and a fuzzer found, each closed and kept closed: server-side
//! request forgery through wasi:http and batch hooks, external names taking local
//! accounts, lockout by revoking the last key, batches outliving their account,
//! invocation slots held without a body, quotas that skipped HTTP invocation, heavy
//! components taking other tenants' instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::server::{ADMIN_KEY, TestServer, code, program, serve};

/// A request with `key` as the bearer token.
async fn call(
    s_url: &str,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{s_url}{path}"))
        .header("authorization", format!("Bearer {key}"));
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = res.status();
    let bytes = res.bytes().await.unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
    (st, v)
}

/// A new account's key (see [`TestServer::account`]).
async fn key_of(s: &TestServer, name: &str, extra: Value) -> String {
    s.account(name, extra).await.0
}

/// Uploads a test program as the holder of `key`; `query` is the upload's query string.
async fn upload_as(s: &TestServer, key: &str, query: &str, wasm: &str) -> (StatusCode, Value) {
    call(&s.url, key, Method::POST, &format!("/v1/functions?{query}"), Some(program(wasm))).await
}

fn json_body(v: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&v).unwrap())
}

/// A loopback HTTP server answering every request with `body`; counts requests.
async fn secret_server(body: &'static str) -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            body
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

/// `GET /fn/{name}/outbound?url=URL` through the http_echo guest: the status and body.
async fn fetch_through(s: &TestServer, key: &str, name: &str, url: &str) -> (StatusCode, String) {
    let res = reqwest::Client::new()
        .get(format!("{}/fn/{name}/outbound?url={url}", s.url))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    (res.status(), res.text().await.unwrap())
}

#[tokio::test]
async fn a_tenant_cannot_read_internal_services_through_wasi_http() {
    let (port, hits) = secret_server("internal secret").await;
    let s = TestServer::start(&[]).await;
    let key = key_of(&s, "tenant", json!({})).await;
    let (st, f) = upload_as(&s, &key, "name=web", programs::HTTP_ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{f}");

    // Without an egress grant from the admin, a tenant may not open its function up.
    let anywhere = json_body(json!({"allowed_outbound_hosts": ["*"]}));
    let (st, body) = call(&s.url, &key, Method::PATCH, "/v1/functions/web", anywhere.clone()).await;
    assert_eq!((st, code(&body)), (StatusCode::FORBIDDEN, "egress_not_granted"), "{body}");
    let (st, body) = s
        .request(
            Method::PATCH,
            "/v1/accounts/tenant",
            json_body(json!({"allowed_outbound": ["*"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["allowed_outbound"], json!(["*"]));
    let (st, body) = call(&s.url, &key, Method::PATCH, "/v1/functions/web", anywhere).await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // Granted "anywhere", the function still reaches no internal address: not by IP,
    // not by a name that resolves to loopback, not the metadata service.
    for url in [
        format!("http://127.0.0.1:{port}/latest/meta-data/"),
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/".to_string(),
    ] {
        let (st, text) = fetch_through(&s, &key, "web", &url).await;
        assert_eq!(st, StatusCode::BAD_GATEWAY, "{url}: {text}");
        assert!(text.contains("DestinationIpProhibited"), "{url}: {text}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal server was reached");

    // The operator allows loopback: now the name is resolved, checked and connected to.
    drop(s);
    let s = TestServer::start(&["--allow-internal-outbound", "127.0.0.1/32"]).await;
    let key =
        key_of(&s, "tenant", json!({"allowed_outbound": [format!("localhost:{port}")]})).await;
    let (st, f) = upload_as(
        &s,
        &key,
        &format!("name=web&allowed_outbound_hosts=localhost:{port}"),
        programs::HTTP_ECHO,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{f}");
    let (st, text) = fetch_through(&s, &key, "web", &format!("http://localhost:{port}/x")).await;
    assert_eq!((st, text.as_str()), (StatusCode::OK, "status 200\ninternal secret"));
    // What the account was not granted stays refused: another port, and any name.
    let (_, text) = fetch_through(&s, &key, "web", &format!("http://127.0.0.1:{port}/x")).await;
    assert!(text.contains("HttpRequestDenied"), "{text}");
    // The admin narrows the account: its function's own list no longer suffices.
    let (st, _) = s
        .request(
            Method::PATCH,
            "/v1/accounts/tenant",
            json_body(json!({"allowed_outbound": ["example.com"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, text) = fetch_through(&s, &key, "web", &format!("http://localhost:{port}/x")).await;
    assert!(text.contains("HttpRequestDenied"), "{text}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Bad patterns are refused with their codes.
    let (st, body) = s
        .request(
            Method::PATCH,
            "/v1/accounts/tenant",
            json_body(json!({"allowed_outbound": ["a b"]})),
        )
        .await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"), "{body}");
}

#[tokio::test]
async fn redirects_are_never_followed_by_the_server() {
    // An allowed host answers with a redirect to an internal one: the guest gets the
    // redirect, and the internal server is never asked.
    let (secret_port, hits) = secret_server("internal secret").await;
    let app = axum::Router::new().fallback(move || async move {
        (StatusCode::FOUND, [("location", format!("http://127.0.0.2:{secret_port}/"))], "moved")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let s = TestServer::start(&["--allow-internal-outbound", "127.0.0.1/32"]).await;
    s.upload("web", &program(programs::HTTP_ECHO)).await;
    let patch = json_body(json!({"allowed_outbound_hosts": ["*"]}));
    assert_eq!(s.request(Method::PATCH, "/v1/functions/web", patch).await.0, StatusCode::OK);
    let (st, text) =
        fetch_through(&s, ADMIN_KEY, "web", &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!((st, text.as_str()), (StatusCode::OK, "status 302\nmoved"));
    let (_, text) =
        fetch_through(&s, ADMIN_KEY, "web", &format!("http://127.0.0.2:{secret_port}/")).await;
    assert!(text.contains("DestinationIpProhibited"), "the next hop is checked again: {text}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn batch_hooks_go_only_where_the_account_and_the_operator_allow() {
    let (port, hits) = secret_server("ok").await;
    let s = TestServer::start(&[]).await;
    let key = key_of(&s, "tenant", json!({"allowed_outbound": ["*"]})).await;
    let (st, _) = upload_as(&s, &key, "name=nap", programs::SLEEP).await;
    assert_eq!(st, StatusCode::CREATED);
    let batch = |hook: String| {
        json_body(json!({"template": {"function": "nap"}, "inputs": [["0"]], "hook": hook}))
    };
    // An internal address is refused at once.
    for hook in [
        format!("http://127.0.0.1:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]/".to_string(),
    ] {
        let (st, body) = call(&s.url, &key, Method::POST, "/v1/batches", batch(hook.clone())).await;
        assert_eq!(
            (st, code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{hook}: {body}"
        );
    }
    // A name is resolved when the hook is called: `localhost` is loopback, refused.
    let (st, b) = call(
        &s.url,
        &key,
        Method::POST,
        "/v1/batches",
        batch(format!("http://localhost:{port}/hook")),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains("calling the batch hook failed") {
        assert!(Instant::now() < deadline, "the hook was not tried:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the hook reached an internal address");
    // An account without a grant may not name a hook at all.
    let other = key_of(&s, "other", json!({})).await;
    let (st, _) = upload_as(&s, &other, "name=nap2", programs::SLEEP).await;
    assert_eq!(st, StatusCode::CREATED);
    let spec = json!({"template": {"function": "nap2"}, "inputs": [["0"]], "hook": "https://example.com/hook"});
    let (st, body) = call(&s.url, &other, Method::POST, "/v1/batches", json_body(spec)).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"), "{body}");
}

/// A Cloudpipe-protocol auth service that vouches for every name with key `good`.
async fn permissive_auth_service() -> String {
    use axum::extract::Query;
    use std::collections::HashMap;
    let app = axum::Router::new().route(
        "/auth/validate",
        axum::routing::get(|Query(q): Query<HashMap<String, String>>| async move {
            match q.get("apiKey").map(String::as_str) {
                Some("good") => StatusCode::NO_CONTENT,
                _ => StatusCode::NOT_FOUND,
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn an_external_name_never_becomes_a_local_account() {
    let url = permissive_auth_service().await;
    let s = TestServer::start(&["--auth-url", &url]).await;
    key_of(&s, "alice", json!({})).await;
    for token in ["admin:good", "alice:good"] {
        let (st, body) = call(&s.url, token, Method::GET, "/v1/accounts", None).await;
        assert_eq!(
            (st, code(&body)),
            (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            "{token}: {body}"
        );
    }
    let (st, me) = call(&s.url, "bob:good", Method::GET, "/v1/me", None).await;
    assert_eq!(
        (st, me["account"].as_str(), me["role"].as_str()),
        (StatusCode::OK, Some("bob"), Some("user"))
    );
    // A local account created after the service vouched for the name takes it over.
    key_of(&s, "bob", json!({})).await;
    let (st, _) = call(&s.url, "bob:good", Method::GET, "/v1/me", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_last_key_is_kept_unless_forced_and_the_admin_can_reset_one_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(dir.path(), &[]).await;
    let key = key_of(&s, "carol", json!({})).await;
    let (_, keys) = call(&s.url, &key, Method::GET, "/v1/accounts/carol/keys", None).await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let (st, body) = call(&s.url, &key, Method::DELETE, &format!("/v1/keys/{id}"), None).await;
    assert_eq!((st, code(&body)), (StatusCode::CONFLICT, "last_key"), "{body}");
    let (st, _) = call(&s.url, &key, Method::GET, "/v1/me", None).await;
    assert_eq!(st, StatusCode::OK, "the key still works");
    let (st, body) =
        call(&s.url, &key, Method::DELETE, &format!("/v1/keys/{id}?force=true"), None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(call(&s.url, &key, Method::GET, "/v1/me", None).await.0, StatusCode::UNAUTHORIZED);

    // The admin's one key: kept, then forced away, then recovered with the CLI.
    let (_, keys) = s.get("/v1/accounts/admin/keys").await;
    let admin_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let (st, body) = s.request(Method::DELETE, &format!("/v1/keys/{admin_id}"), None).await;
    assert_eq!((st, code(&body)), (StatusCode::CONFLICT, "last_key"), "{body}");
    let (st, _) = s.request(Method::DELETE, &format!("/v1/keys/{admin_id}?force=true"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.get("/v1/me").await.0, StatusCode::UNAUTHORIZED);
    assert!(s.terminate().success());

    let new_key = crate::server::admin_reset_key(&["--data-dir".as_ref(), dir.path().as_ref()]);
    // Started without CLOUDPIPE_ADMIN_KEY, so only the reset key can work.
    let mut p = serve::spawn_serve_with(&crate::server::bin(), dir.path(), &[], &[]);
    let (st, me) = call(&p.url, &new_key, Method::GET, "/v1/me", None).await;
    let (st2, _) = call(&p.url, ADMIN_KEY, Method::GET, "/v1/me", None).await;
    let _ = p.child.kill();
    let _ = p.child.wait();
    assert_eq!((st, me["role"].as_str()), (StatusCode::OK, Some("admin")), "{me}");
    assert_eq!(st2, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn disabling_an_account_pauses_its_batches() {
    let s = TestServer::start(&[]).await;
    let key = key_of(&s, "dana", json!({})).await;
    let (st, _) = upload_as(&s, &key, "name=nap", programs::SLEEP).await;
    assert_eq!(st, StatusCode::CREATED);
    let inputs: Vec<Value> = (0..40).map(|_| json!(["1"])).collect();
    let spec = json!({"template": {"function": "nap"}, "inputs": inputs, "split": 2});
    let (st, b) = call(&s.url, &key, Method::POST, "/v1/batches", json_body(spec)).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (st, _) =
        s.request(Method::PATCH, "/v1/accounts/dana", json_body(json!({"disabled": true}))).await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = s.get(&format!("/v1/batches/{id}")).await;
    assert_eq!((st, b["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{b}");
    let jobs = |list: Value| list["jobs"].as_array().unwrap().len();
    let (_, list) = s.get(&format!("/v1/jobs?batch={id}&limit=1000")).await;
    let launched = jobs(list);
    assert!(launched < 40, "{launched}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, list) = s.get(&format!("/v1/jobs?batch={id}&limit=1000")).await;
    assert_eq!(jobs(list.clone()), launched, "jobs launched after the account was disabled");
    assert!(
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["status"] != "running" && j["status"] != "queued"),
        "{list}"
    );
    // Resuming is the account's business once it is enabled again: while disabled,
    // a resume launches nothing.
    let (st, b) = s.post_json(&format!("/v1/batches/{id}/resume"), &json!({})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, list) = s.get(&format!("/v1/jobs?batch={id}&limit=1000")).await;
    assert_eq!(jobs(list), launched);
    let (_, b) = s.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(b["status"], "cancelled", "{b}");
}

/// Opens a connection that sends the head of a POST with a body it never sends.
async fn slow_drip(url: &str, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 100\r\n\r\nx");
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

#[tokio::test]
async fn slow_request_bodies_hold_no_invocation_slot() {
    let s = TestServer::start(&["--fn-max-concurrency", "2", "--fn-body-timeout-ms", "1500"]).await;
    s.upload("cgi", &program(programs::CGI)).await;
    s.upload("web", &program(programs::HTTP_ECHO)).await;
    let public = json_body(json!({"public": true}));
    for f in ["cgi", "web"] {
        assert_eq!(
            s.request(Method::PATCH, &format!("/v1/functions/{f}"), public.clone()).await.0,
            StatusCode::OK
        );
    }
    let mut drips = Vec::new();
    for f in ["cgi", "web"] {
        for _ in 0..4 {
            drips.push(slow_drip(&s.url, &format!("/fn/{f}/x")).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in ["cgi", "web"] {
        let res =
            reqwest::Client::new().get(format!("{}/fn/{f}/plain", s.url)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{f}: slots held by clients that send nothing");
    }
    // The drips get 408 once their time is up.
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), drips[0].read(&mut answer))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
}

#[tokio::test]
async fn account_quotas_bound_invocations_and_function_settings() {
    let s = TestServer::start(&["--fn-max-concurrency-per-account", "8"]).await;
    let quotas =
        json!({"quotas": {"max_timeout_ms": 500, "max_memory_mb": 64, "max_concurrent_jobs": 1}});
    let key = key_of(&s, "erin", quotas).await;
    let (st, _) = upload_as(&s, &key, "name=cgi", programs::CGI).await;
    assert_eq!(st, StatusCode::CREATED);
    for (patch, field) in
        [(json!({"timeout_ms": 5000}), "timeout_ms"), (json!({"memory_mb": 512}), "memory_mb")]
    {
        let (st, body) =
            call(&s.url, &key, Method::PATCH, "/v1/functions/cgi", json_body(patch)).await;
        assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_settings"), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{body}");
    }
    // The server's 30 s default does not apply: the account's 500 ms does.
    let t = Instant::now();
    let res = reqwest::Client::new()
        .get(format!("{}/fn/cgi/loop", s.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // One invocation at a time for this account (its concurrent-jobs quota).
    let get = |path: &'static str| {
        let (url, key) = (s.url.clone(), key.clone());
        async move {
            reqwest::Client::new()
                .get(format!("{url}/fn/cgi/{path}"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
        }
    };
    let (first, second) = tokio::join!(get("loop"), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        get("plain").await
    });
    assert_eq!(first.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = second.json().await.unwrap();
    assert_eq!(code(&body), "quota_exceeded");
    // Another account is not held up by this one.
    let other = key_of(&s, "frank", json!({})).await;
    let (st, _) = upload_as(&s, &other, "name=cgi2", programs::CGI).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, res) = tokio::join!(get("loop"), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        reqwest::Client::new()
            .get(format!("{}/fn/cgi2/plain", s.url))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap()
    });
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn keys_and_function_names_are_capped_per_account() {
    let s = TestServer::start(&[]).await;
    let key = key_of(&s, "gina", json!({})).await;
    for _ in 1..100 {
        let (st, body) = call(&s.url, &key, Method::POST, "/v1/accounts/gina/keys", None).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let (st, body) = call(&s.url, &key, Method::POST, "/v1/accounts/gina/keys", None).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");

    // The same stored binary under ever new names costs no bytes; names are capped.
    let wasm = program(programs::HELLO);
    let upload = |name: String| {
        let (url, key, wasm) = (s.url.clone(), key.clone(), wasm.clone());
        async move {
            call(&url, &key, Method::POST, &format!("/v1/functions?name={name}"), Some(wasm)).await
        }
    };
    for chunk in (0..1000).collect::<Vec<_>>().chunks(25) {
        let answers =
            futures::future::join_all(chunk.iter().map(|i| upload(format!("f{i}")))).await;
        for (st, body) in answers {
            assert_eq!(st, StatusCode::CREATED, "{body}");
        }
    }
    let (st, body) = upload("one-too-many".into()).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    // A name the account holds takes new versions still.
    assert_eq!(upload("f7".into()).await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn a_deleted_names_log_does_not_pass_to_its_next_owner() {
    let s = TestServer::start(&[]).await;
    let first = key_of(&s, "hana", json!({})).await;
    let second = key_of(&s, "ivan", json!({})).await;
    let (st, f) = upload_as(&s, &first, "name=shared", programs::CGI).await;
    assert_eq!(st, StatusCode::CREATED);
    let res = reqwest::Client::new()
        .get(format!("{}/fn/shared/fail", s.url))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let (_, logs) = call(&s.url, &first, Method::GET, "/v1/functions/shared/logs", None).await;
    assert!(logs.to_string().contains("something broke"), "{logs}");
    // Deleted by id: the name goes with its only version, and so does its log.
    let id = f["id"].as_str().unwrap();
    let (st, _) = call(&s.url, &first, Method::DELETE, &format!("/v1/functions/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = upload_as(&s, &second, "name=shared", programs::CGI).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, logs) = call(&s.url, &second, Method::GET, "/v1/functions/shared/logs", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!logs.to_string().contains("something broke"), "another account's stderr: {logs}");
}

#[tokio::test]
async fn an_upload_over_the_quota_is_refused_before_it_is_compiled() {
    let s = TestServer::start(&[]).await;
    let key = key_of(&s, "jo", json!({"quotas": {"max_function_bytes": 1000}})).await;
    let (st, body) = upload_as(&s, &key, "name=big", programs::CGI).await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    assert!(!s.log().contains("executor.compile"), "compiled before the quota check:\n{}", s.log());
}

/// Polls job `id` (with `key`) until it is running.
async fn until_running(s: &TestServer, key: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, job) = call(&s.url, key, Method::GET, &format!("/v1/jobs/{id}"), None).await;
        match job["status"].as_str() {
            Some("running") => return,
            Some("queued") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => panic!("job {id} did not start: {job}"),
        }
    }
}

#[tokio::test]
async fn heavy_components_cannot_take_other_tenants_instances() {
    // Four run slots, one invocation slot, an instance pool of two.
    let s = TestServer::start(&[
        "--no-runner-js",
        "--concurrency",
        "4",
        "--max-invocations",
        "1",
        "--wasm-instances",
        "2",
    ])
    .await;
    let heavy_owner = key_of(&s, "kim", json!({})).await;
    let other = key_of(&s, "lee", json!({})).await;

    // Over the limits admitted per component: refused at upload, with its own code.
    let (st, body) = upload_as(&s, &heavy_owner, "name=too-heavy", programs::TOO_HEAVY).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "component_too_large"), "{body}");
    assert!(body.to_string().contains("at most 16 core instances"), "{body}");

    // At the limits (16 core instances, 8 tables, 2 memories): admitted, and the pool
    // holds as many of them as it has slots.
    for (key, name, wasm) in
        [(&heavy_owner, "heavy", programs::HEAVY), (&other, "hello", programs::HELLO)]
    {
        let path = format!("/v1/functions?name={name}");
        let (st, body) = call(&s.url, key, Method::POST, &path, Some(program(wasm))).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let spin = |timeout_ms: u64| {
        let (url, key) = (s.url.clone(), heavy_owner.clone());
        async move {
            let spec = json!({"function": "heavy", "timeout_ms": timeout_ms});
            let (st, job) = call(&url, &key, Method::POST, "/v1/jobs", json_body(spec)).await;
            assert!(st.is_success(), "{st} {job}");
            job["id"].as_str().unwrap().to_string()
        }
    };
    let hello = |key: String| {
        let url = s.url.clone();
        async move {
            let spec = json_body(json!({"function": "hello"}));
            let (st, job) = call(&url, &key, Method::POST, "/v1/jobs", spec).await;
            assert!(st.is_success(), "{st} {job}");
            job["id"].as_str().unwrap().to_string()
        }
    };
    // A heavy job spins (until its time limit) on 16 core instances: the other
    // tenant's job still finds room.
    let first = spin(6000).await;
    until_running(&s, &heavy_owner, &first).await;
    let id = hello(other.clone()).await;
    let job = s.wait_terminal(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // A second heavy job fills the pool: the next job finds no room, goes back to the
    // queue (its attempt not counted) and runs once a heavy job ends.
    let second = spin(3000).await;
    until_running(&s, &heavy_owner, &second).await;
    let waiting = hello(other.clone()).await;
    let job = s.wait_terminal(&waiting).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let busy = s.metric("cloudpipe_jobs_requeued_busy_total").await;
    assert!(busy >= 1.0, "{job}\n{}", s.log());
    for id in [first, second] {
        let job = s.wait_terminal(&id).await;
        assert_eq!(job["status"], "timed_out", "{job}");
    }
}

#[tokio::test]
async fn one_accounts_volume_never_deletes_another_accounts_results() {
    // Three finished jobs kept per account; retention runs every second.
    let s = TestServer::start(&["--no-runner-js", "--retention-max-jobs", "3"]).await;
    let quiet = key_of(&s, "mia", json!({})).await;
    let busy = key_of(&s, "ned", json!({})).await;
    let small = key_of(&s, "ola", json!({"quotas": {"max_finished_jobs": 1}})).await;
    let (_, me) = call(&s.url, &quiet, Method::GET, "/v1/me", None).await;
    assert_eq!(me["quotas"]["max_finished_jobs"], 3, "the limit in force: {me}");
    for (key, name) in [(&quiet, "mia"), (&busy, "ned"), (&small, "ola")] {
        let path = format!("/v1/functions?name=hello-{name}");
        let (st, body) =
            call(&s.url, key, Method::POST, &path, Some(program(programs::HELLO))).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let run = |key: &str, name: &str, idem: String| {
        let (url, key) = (s.url.clone(), key.to_string());
        let spec = json!({"function": format!("hello-{name}"), "idempotency_key": idem});
        async move {
            let (st, job) =
                call(&url, &key, Method::POST, "/v1/jobs?wait=30s", json_body(spec)).await;
            assert!(st.is_success(), "{st} {job}");
            assert_eq!(job["status"], "succeeded", "{job}");
            job["id"].as_str().unwrap().to_string()
        }
    };
    // The quiet account's two results are the oldest on the server.
    let mut quiet_jobs = Vec::new();
    for i in 0..2 {
        quiet_jobs.push(run(&quiet, "mia", format!("q{i}")).await);
    }
    let mut small_jobs = Vec::new();
    for i in 0..3 {
        small_jobs.push(run(&small, "ola", format!("s{i}")).await);
    }
    let mut busy_jobs = Vec::new();
    for i in 0..12 {
        busy_jobs.push(run(&busy, "ned", format!("b{i}")).await);
    }
    let exists = |key: &str, id: &str| {
        let (url, key, path) = (s.url.clone(), key.to_string(), format!("/v1/jobs/{id}"));
        async move { call(&url, &key, Method::GET, &path, None).await.0 == StatusCode::OK }
    };
    // Retention trims the busy account to its three newest, the small one to its
    // quota of one.
    let deadline = Instant::now() + Duration::from_secs(15);
    while exists(&busy, &busy_jobs[8]).await || exists(&small, &small_jobs[1]).await {
        assert!(Instant::now() < deadline, "retention did not run:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, id) in busy_jobs.iter().enumerate() {
        assert_eq!(exists(&busy, id).await, i >= 9, "busy job {i}");
    }
    for (i, id) in small_jobs.iter().enumerate() {
        assert_eq!(exists(&small, id).await, i >= 2, "small job {i}");
    }
    // The quiet account keeps every result, and its idempotency keys still answer
    // with the same job: a client's retry does not run it twice.
    for (i, id) in quiet_jobs.iter().enumerate() {
        assert!(exists(&quiet, id).await, "quiet job {i} was deleted");
        assert_eq!(&run(&quiet, "mia", format!("q{i}")).await, id);
    }
}
