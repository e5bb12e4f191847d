//! [`Client`]: the async client of the Cloudpipe API.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cloudpipe_types::{
    Account, AccountCreate, AccountList, AccountPatch, ApiKeyCreate, ApiKeyInfo, ApiKeyList,
    BatchList, BatchRecord, BatchSpec, BatchStatus, FunctionInfo, FunctionList,
    FunctionSettingsPatch, Health, JobList, JobRecord, JobSpec, JobStatus, Me, NewApiKey,
    SecretInfo, SecretList,
};
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode, Url};

use crate::retry::parse_retry_after;
use crate::sse::JobEvents;
use crate::{Config, Error, Result, RetryPolicy};

/// The longest a single long-poll asks the server to hold (the server may cap it lower).
const POLL: Duration = Duration::from_secs(30);

/// How often [`Client::wait_batch`] looks at a batch (batches have no long-poll).
const BATCH_POLL: Duration = Duration::from_millis(250);

/// A client of one Cloudpipe server. Cheap to clone (clones share one connection
/// pool); make one per server and keep it.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    api_key: Option<String>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.base.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .finish()
    }
}

/// Which jobs [`Client::jobs`] lists; every field narrows the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    pub status: Option<JobStatus>,
    pub tag: Option<String>,
    /// A function name as submitted, or a `sha256:` id.
    pub function: Option<String>,
    /// The jobs of this batch (see [`Client::create_batch`]).
    pub batch: Option<String>,
    /// At most this many (the server allows 1 to 1000; 100 when absent).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Each job with its stdout and stderr (`include=output`); without it, listed jobs
    /// come without output. A page with output ends early (with a `next_cursor`) once
    /// it holds 16 MiB of output.
    pub include_output: bool,
}

/// One HTTP request to a function's endpoint (`/fn/{name}/{path}`), for
/// [`Client::invoke`].
#[derive(Debug, Clone)]
pub struct Invocation {
    pub method: Method,
    /// The path below the function (`/items/7?full=1`); empty for the function itself.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Invocation {
    /// A `GET` of this path below the function.
    pub fn get(path: impl Into<String>) -> Invocation {
        Invocation {
            method: Method::GET,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A `POST` of this body to this path below the function.
    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Invocation {
        Invocation { method: Method::POST, body: body.into(), ..Invocation::get(path) }
    }

    /// Adds a request header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Invocation {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A function's answer to an [`Invocation`], whatever its status.
#[derive(Debug, Clone)]
pub struct InvokeResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl InvokeResponse {
    /// The invocation's id (`x-cloudpipe-invocation`), which names it in the function's log.
    pub fn invocation(&self) -> Option<&str> {
        self.headers.get("x-cloudpipe-invocation").and_then(|v| v.to_str().ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `self` for a 2xx or 3xx answer; an [`Error::Api`] otherwise (carrying the
    /// server's code when the body is an API error, such as a function that failed).
    pub fn error_for_status(self) -> Result<InvokeResponse> {
        if self.status < 400 { Ok(self) } else { Err(Error::from_answer(self.status, &self.body)) }
    }
}

impl Client {
    /// A client for this configuration.
    ///
    /// ```
    /// let client = cloudpipe::Client::new(cloudpipe::Config::new("http://127.0.0.1:7070"))?;
    /// assert_eq!(client.url(), "http://127.0.0.1:7070/");
    /// # Ok::<(), cloudpipe::Error>(())
    /// ```
    pub fn new(config: Config) -> Result<Client> {
        let mut base = Url::parse(&config.url)
            .map_err(|e| Error::Config(format!("bad server URL {:?}: {e}", config.url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::Config(format!(
                "bad server URL {:?}: use http://HOST:PORT or https://HOST",
                config.url
            )));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cloudpipe-rust/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client { http, base, api_key: config.api_key, retry: RetryPolicy::default() })
    }

    /// A client configured from the environment and the credentials file (see
    /// [`Config::from_env`]).
    pub fn from_env() -> Result<Client> {
        Client::new(Config::from_env()?)
    }

    /// This client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Client {
        self.retry = retry;
        self
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    /// Where a named function answers over HTTP: `BASE/fn/NAME`.
    pub fn function_url(&self, name: &str) -> String {
        self.endpoint(&["fn", name], &[]).to_string()
    }

    fn endpoint(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in Client::new").pop_if_empty().extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    /// Sends a request, retrying as the [`RetryPolicy`] says, and returns a success
    /// answer (any 2xx, and 202 for long-polls) or the error.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<reqwest::Response> {
        let res = self.send_raw(method, url.clone(), body, &[]).await?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap_or_default();
        Err(Error::from_answer(status, &bytes))
    }

    /// Sends a request with retries and returns whatever the server answered last.
    async fn send_raw(
        &self,
        method: Method,
        url: Url,
        body: Option<(Bytes, &'static str)>,
        headers: &[(String, String)],
    ) -> Result<reqwest::Response> {
        let mut retry = 0;
        loop {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            if let Some((bytes, content_type)) = &body {
                if !content_type.is_empty() {
                    req = req.header(header::CONTENT_TYPE, *content_type);
                }
                req = req.body(bytes.clone());
            }
            let wait = match req.send().await {
                Ok(res) => {
                    let st = res.status();
                    if st != StatusCode::TOO_MANY_REQUESTS && st != StatusCode::SERVICE_UNAVAILABLE
                    {
                        return Ok(res);
                    }
                    let after = res
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    match self.retry.delay(retry, after) {
                        Some(d) => d,
                        None => return Ok(res),
                    }
                }
                Err(e) if e.is_connect() => match self.retry.delay(retry, None) {
                    Some(d) => d,
                    None => {
                        return Err(Error::Unreachable { url: self.base.to_string(), source: e });
                    }
                },
                Err(e) => return Err(Error::Request { url: url.to_string(), source: e }),
            };
            tracing::debug!(%url, retry, delay_ms = wait.as_millis() as u64, "cloudpipe.retry");
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<T> {
        let res = self.send(method, url.clone(), body).await?;
        decode(&url, res).await.map(|(_, v)| v)
    }

    fn json_body<T: serde::Serialize>(v: &T) -> Option<(Bytes, &'static str)> {
        Some((serde_json::to_vec(v).expect("wire types serialize").into(), "application/json"))
    }

    /// `GET /healthz`: the server's status and version (needs no key).
    pub async fn health(&self) -> Result<Health> {
        self.json(Method::GET, self.endpoint(&["healthz"], &[]), None).await
    }

    /// Uploads a Wasm binary (a `wasi:cli/command` component, a WASI preview1 module
    /// or a `wasi:http` component) and points `name` at it.
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// let wasm = std::fs::read("target/wasm32-wasip2/release/hello.wasm").unwrap();
    /// let info = client.upload_function("hello", wasm).await?;
    /// println!("uploaded {}", info.id); // sha256:…
    /// # Ok(()) }
    /// ```
    pub async fn upload_function(
        &self,
        name: &str,
        wasm: impl Into<Bytes>,
    ) -> Result<FunctionInfo> {
        self.upload_function_with(Some(name), wasm, &FunctionSettingsPatch::default()).await
    }

    /// Uploads a Wasm binary, under a name or none (then it is addressable by its
    /// `sha256:` id only), with settings for the name. `env` is not accepted at upload
    /// by the server, so it is applied right after with [`Client::update_function`].
    pub async fn upload_function_with(
        &self,
        name: Option<&str>,
        wasm: impl Into<Bytes>,
        settings: &FunctionSettingsPatch,
    ) -> Result<FunctionInfo> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(n) = name {
            q.push(("name", n.to_string()));
        }
        if let Some(v) = settings.timeout_ms {
            q.push(("timeout_ms", v.to_string()));
        }
        if let Some(v) = settings.memory_mb {
            q.push(("memory_mb", v.to_string()));
        }
        if let Some(v) = settings.max_concurrency {
            q.push(("max_concurrency", v.to_string()));
        }
        if let Some(v) = settings.public {
            q.push(("public", v.to_string()));
        }
        if let Some(v) = &settings.allowed_outbound_hosts {
            q.push(("allowed_outbound_hosts", v.join(",")));
        }
        let url = self.endpoint(&["v1", "functions"], &q);
        let info: FunctionInfo =
            self.json(Method::POST, url, Some((wasm.into(), "application/wasm"))).await?;
        match (name, &settings.env) {
            (Some(n), Some(env)) => {
                let patch = FunctionSettingsPatch { env: Some(env.clone()), ..Default::default() };
                self.update_function(n, &patch).await
            }
            _ => Ok(info),
        }
    }

    /// A function by name or `sha256:` id.
    pub async fn function(&self, name: &str) -> Result<FunctionInfo> {
        self.json(Method::GET, self.endpoint(&["v1", "functions", name], &[]), None).await
    }

    /// The named functions.
    pub async fn functions(&self) -> Result<Vec<FunctionInfo>> {
        let list: FunctionList =
            self.json(Method::GET, self.endpoint(&["v1", "functions"], &[]), None).await?;
        Ok(list.functions)
    }

    /// Changes the settings of a named function.
    pub async fn update_function(
        &self,
        name: &str,
        patch: &FunctionSettingsPatch,
    ) -> Result<FunctionInfo> {
        let url = self.endpoint(&["v1", "functions", name], &[]);
        self.json(Method::PATCH, url, Client::json_body(patch)).await
    }

    /// Deletes a name and its versions, or one version by id; returns what went.
    pub async fn delete_function(&self, name: &str) -> Result<Vec<FunctionInfo>> {
        let url = self.endpoint(&["v1", "functions", name], &[]);
        let list: FunctionList = self.json(Method::DELETE, url, None).await?;
        Ok(list.functions)
    }

    /// Submits a job and returns its record at once (status `queued` or later).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// use cloudpipe::JobSpec;
    /// let spec = JobSpec { function: "hello".into(), args: vec!["world".into()], ..JobSpec::default() };
    /// let job = client.submit(&spec).await?;
    /// let done = client.wait(&job.id, None).await?;
    /// print!("{}", done.stdout);
    /// # Ok(()) }
    /// ```
    pub async fn submit(&self, spec: &JobSpec) -> Result<JobRecord> {
        let url = self.endpoint(&["v1", "jobs"], &[]);
        self.json(Method::POST, url, Client::json_body(spec)).await
    }

    /// Submits a job and waits until it ends (or `timeout` passes: then the record
    /// is the latest, not terminal).
    pub async fn submit_and_wait(
        &self,
        spec: &JobSpec,
        timeout: Option<Duration>,
    ) -> Result<JobRecord> {
        let start = Instant::now();
        let first = timeout.map_or(POLL, |t| t.min(POLL));
        let url = self.endpoint(&["v1", "jobs"], &[("wait", wait_param(first))]);
        let job: JobRecord = self.json(Method::POST, url, Client::json_body(spec)).await?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        self.wait(&job.id, timeout.map(|t| t.saturating_sub(start.elapsed()))).await
    }

    /// Runs a typed function (`#[cloudpipe_guest::function]`) and returns its result:
    /// submits `function` (the uploaded name) with `name` as its first argument and
    /// `args` as the JSON array on stdin, waits, and parses stdout. `args` is a tuple:
    /// `(3, 4)`, `(x,)` for one argument, `()` for none (a lone value that is not a
    /// sequence is taken as the one argument).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// let sum: i64 = client.call("calc", "add", (3, 4)).await?;
    /// assert_eq!(sum, 7);
    /// # Ok(()) }
    /// ```
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        function: &str,
        name: &str,
        args: impl serde::Serialize,
    ) -> Result<T> {
        let mut args = serde_json::to_value(args)
            .map_err(|e| Error::Config(format!("the arguments do not serialize: {e}")))?;
        if !args.is_array() {
            // One argument that is not a tuple.
            args = serde_json::Value::Array(if args.is_null() { vec![] } else { vec![args] });
        }
        let spec = JobSpec {
            function: function.to_string(),
            args: vec![name.to_string()],
            stdin: Some(args.to_string()),
            ..JobSpec::default()
        };
        let job = self.submit_and_wait(&spec, None).await?;
        if job.status != JobStatus::Succeeded {
            return Err(Error::JobFailed(Box::new(job)));
        }
        serde_json::from_str(&job.stdout).map_err(|e| Error::Protocol {
            url: self.endpoint(&["v1", "jobs", &job.id], &[]).to_string(),
            message: format!(
                "the result of {name} is not the JSON expected: {e}: {:?}",
                job.stdout
            ),
        })
    }

    /// A job's record as it is now.
    pub async fn job(&self, id: &str) -> Result<JobRecord> {
        self.json(Method::GET, self.endpoint(&["v1", "jobs", id], &[]), None).await
    }

    /// Waits until the job ends and returns its record; with a `timeout`, returns the
    /// latest record (not terminal) once it passes. Long-polls, so it costs a request
    /// per 30 seconds of waiting, not a busy loop.
    pub async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<JobRecord> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left =
                deadline.map_or(POLL, |d| d.saturating_duration_since(Instant::now()).min(POLL));
            let url = self.endpoint(&["v1", "jobs", id, "result"], &[("wait", wait_param(left))]);
            let job: JobRecord = self.json(Method::GET, url, None).await?;
            if job.status.is_terminal() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(job);
            }
        }
    }

    /// Follows a job: its status, then live stdout/stderr, to its end.
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client, id: &str) -> cloudpipe::Result<()> {
    /// use cloudpipe::JobEvent;
    /// let mut events = client.events(id).await?;
    /// while let Some(ev) = events.next().await? {
    ///     match ev {
    ///         JobEvent::Stdout { data } => print!("{data}"),
    ///         JobEvent::Stderr { data } => eprint!("{data}"),
    ///         JobEvent::Status { status, .. } => eprintln!("[{}]", status.as_str()),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn events(&self, id: &str) -> Result<JobEvents> {
        let url = self.endpoint(&["v1", "jobs", id, "events"], &[]);
        let res = self.send(Method::GET, url.clone(), None).await?;
        let ct =
            res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.starts_with("text/event-stream") {
            return Err(Error::Protocol {
                url: url.to_string(),
                message: format!("expected text/event-stream, got {ct:?}"),
            });
        }
        Ok(JobEvents::new(url.to_string(), res))
    }

    /// Cancels a job (a queued one at once, a running one within moments) and returns
    /// its record; a job that already ended is returned unchanged.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.json(Method::POST, self.endpoint(&["v1", "jobs", id, "cancel"], &[]), None).await
    }

    /// One page of jobs, newest first.
    pub async fn jobs(&self, query: &JobQuery) -> Result<JobList> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = query.status {
            q.push(("status", s.as_str().to_string()));
        }
        if let Some(t) = &query.tag {
            q.push(("tag", t.clone()));
        }
        if let Some(f) = &query.function {
            q.push(("function", f.clone()));
        }
        if let Some(b) = &query.batch {
            q.push(("batch", b.clone()));
        }
        if let Some(l) = query.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &query.cursor {
            q.push(("cursor", c.clone()));
        }
        if query.include_output {
            q.push(("include", "output".into()));
        }
        self.json(Method::GET, self.endpoint(&["v1", "jobs"], &q), None).await
    }

    /// Starts a batch: the `template` job run once per input (each input's words
    /// appended to the template's `args`), at most `split` at once, each failure tried
    /// again up to `retries` times. Returns the batch's record at once (status
    /// `running`); follow it with [`Client::wait_batch`] or [`Client::batch`], and list
    /// its jobs with a [`JobQuery`] whose `batch` is its id.
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// use cloudpipe::{BatchSpec, JobQuery, JobSpec};
    /// let spec = BatchSpec {
    ///     template: JobSpec { function: "resize".into(), args: vec!["--width=64".into()], ..JobSpec::default() },
    ///     // One job per line, split into words: `resize --width=64 a.png`, ...
    ///     input_text: Some("a.png\nb.png\nc.png\n".into()),
    ///     split: Some(2),
    ///     retries: Some(1),
    ///     timeout_ms: Some(30_000),
    ///     ..BatchSpec::default()
    /// };
    /// let batch = client.create_batch(&spec).await?;
    /// let done = client.wait_batch(&batch.id, None).await?;
    /// println!("{}/{} OK", done.counts.ok, done.total);
    /// let q = JobQuery { batch: Some(batch.id.clone()), ..JobQuery::default() };
    /// for job in client.jobs(&q).await?.jobs {
    ///     println!("{:?} {}", job.batch_index, job.status.as_str());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn create_batch(&self, spec: &BatchSpec) -> Result<BatchRecord> {
        let url = self.endpoint(&["v1", "batches"], &[]);
        self.json(Method::POST, url, Client::json_body(spec)).await
    }

    /// A batch's record as it is now: its status and how many inputs are where.
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client, id: &str) -> cloudpipe::Result<()> {
    /// let b = client.batch(id).await?;
    /// println!("{} ok, {} failed, {} pending of {}", b.counts.ok, b.counts.failed, b.counts.pending, b.total);
    /// # Ok(()) }
    /// ```
    pub async fn batch(&self, id: &str) -> Result<BatchRecord> {
        self.json(Method::GET, self.endpoint(&["v1", "batches", id], &[]), None).await
    }

    /// The batches of the key's account (the admin's key: everyone's), newest first:
    /// every page of `GET /v1/batches` (an account stores at most its `max_batches`).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// for b in client.batches().await? {
    ///     println!("{} {:?} {}/{}", b.id, b.status, b.counts.ok, b.total);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn batches(&self) -> Result<Vec<BatchRecord>> {
        let mut all = Vec::new();
        let mut query = vec![("limit", "1000".to_string())];
        loop {
            let url = self.endpoint(&["v1", "batches"], &query);
            let page: BatchList = self.json(Method::GET, url, None).await?;
            all.extend(page.batches);
            match page.next_cursor {
                Some(c) => query = vec![("limit", "1000".to_string()), ("cursor", c)],
                None => return Ok(all),
            }
        }
    }

    /// Deletes a batch, its record and inputs (its jobs stay until job retention takes
    /// them); a running batch is cancelled first.
    pub async fn delete_batch(&self, id: &str) -> Result<()> {
        self.send(Method::DELETE, self.endpoint(&["v1", "batches", id], &[]), None).await?;
        Ok(())
    }

    /// Runs the pending inputs of a stopped batch (cancelled, or struck by its
    /// `strikes`); a batch still running is a conflict (409).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client, id: &str) -> cloudpipe::Result<()> {
    /// let b = client.resume_batch(id).await?;
    /// let done = client.wait_batch(&b.id, None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn resume_batch(&self, id: &str) -> Result<BatchRecord> {
        let url = self.endpoint(&["v1", "batches", id, "resume"], &[]);
        self.json(Method::POST, url, None).await
    }

    /// Runs the failed and timed-out inputs of an ended batch again, each with a
    /// fresh set of `retries`.
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client, id: &str) -> cloudpipe::Result<()> {
    /// let b = client.retry_batch(id).await?;
    /// let done = client.wait_batch(&b.id, None).await?;
    /// assert_eq!(done.counts.failed + done.counts.timed_out, 0, "failed again");
    /// # Ok(()) }
    /// ```
    pub async fn retry_batch(&self, id: &str) -> Result<BatchRecord> {
        let url = self.endpoint(&["v1", "batches", id, "retry"], &[]);
        self.json(Method::POST, url, None).await
    }

    /// Stops launching a batch's jobs and cancels its running ones; their inputs stay
    /// pending, so [`Client::resume_batch`] runs them later. Returns the stopped
    /// batch (an ended batch unchanged).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client, id: &str) -> cloudpipe::Result<()> {
    /// let b = client.cancel_batch(id).await?;
    /// println!("{} inputs left for a resume", b.counts.pending);
    /// # Ok(()) }
    /// ```
    pub async fn cancel_batch(&self, id: &str) -> Result<BatchRecord> {
        let url = self.endpoint(&["v1", "batches", id, "cancel"], &[]);
        self.json(Method::POST, url, None).await
    }

    /// Waits until a batch stops running (finished, struck or cancelled) and returns
    /// its record; with a `timeout`, returns the latest record (still `running`) once
    /// it passes. Batches have no long-poll: this looks every 250 ms.
    pub async fn wait_batch(&self, id: &str, timeout: Option<Duration>) -> Result<BatchRecord> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let b = self.batch(id).await?;
            if b.status != BatchStatus::Running {
                return Ok(b);
            }
            let left = deadline.map_or(BATCH_POLL, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Ok(b);
            }
            tokio::time::sleep(left.min(BATCH_POLL)).await;
        }
    }

    /// Creates or replaces one of the account's secrets. The value is write-only: no
    /// answer carries it back; jobs and functions name it in their env as
    /// [`EnvValue::secret`](cloudpipe_types::EnvValue::secret).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// use cloudpipe::{EnvValue, JobSpec};
    /// client.put_secret("api-token", "s3cr3t").await?;
    /// let mut spec = JobSpec { function: "fetch".into(), ..JobSpec::default() };
    /// spec.env.insert("TOKEN".into(), EnvValue::secret("api-token"));
    /// client.submit(&spec).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put_secret(&self, name: &str, value: &str) -> Result<SecretInfo> {
        let body = cloudpipe_types::SecretPut { value: value.to_string() };
        let url = self.endpoint(&["v1", "secrets", name], &[]);
        self.json(Method::PUT, url, Client::json_body(&body)).await
    }

    /// The account's secrets: names and times, never values.
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>> {
        let list: SecretList =
            self.json(Method::GET, self.endpoint(&["v1", "secrets"], &[]), None).await?;
        Ok(list.secrets)
    }

    /// Deletes one of the account's secrets.
    pub async fn delete_secret(&self, name: &str) -> Result<()> {
        self.send(Method::DELETE, self.endpoint(&["v1", "secrets", name], &[]), None).await?;
        Ok(())
    }

    /// `GET /v1/me`: the account the key belongs to, its quotas in force and its usage.
    pub async fn me(&self) -> Result<Me> {
        self.json(Method::GET, self.endpoint(&["v1", "me"], &[]), None).await
    }

    /// Creates an account (admin).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// use cloudpipe::{AccountCreate, Quotas, Role};
    /// let quotas = Quotas { max_concurrent_jobs: Some(3), ..Quotas::default() };
    /// let spec = AccountCreate {
    ///     name: "erin".into(),
    ///     role: Role::User,
    ///     quotas,
    ///     allow_network: false,
    ///     allowed_outbound: vec![],
    /// };
    /// client.create_account(&spec).await?;
    /// let key = client.create_key("erin", Some("laptop")).await?;
    /// println!("erin's key (shown once): {}", key.key);
    /// # Ok(()) }
    /// ```
    pub async fn create_account(&self, spec: &AccountCreate) -> Result<Account> {
        let url = self.endpoint(&["v1", "accounts"], &[]);
        self.json(Method::POST, url, Client::json_body(spec)).await
    }

    /// Every account (admin); a user's key sees its own only.
    pub async fn accounts(&self) -> Result<Vec<Account>> {
        let list: AccountList =
            self.json(Method::GET, self.endpoint(&["v1", "accounts"], &[]), None).await?;
        Ok(list.accounts)
    }

    /// One account.
    pub async fn account(&self, name: &str) -> Result<Account> {
        self.json(Method::GET, self.endpoint(&["v1", "accounts", name], &[]), None).await
    }

    /// Changes an account's settings (admin): each field given replaces that setting.
    pub async fn update_account(&self, name: &str, patch: &AccountPatch) -> Result<Account> {
        let url = self.endpoint(&["v1", "accounts", name], &[]);
        self.json(Method::PATCH, url, Client::json_body(patch)).await
    }

    /// Creates an API key for an account; the answer is the only one carrying its secret.
    pub async fn create_key(&self, account: &str, label: Option<&str>) -> Result<NewApiKey> {
        let body = ApiKeyCreate { label: label.map(str::to_string) };
        let url = self.endpoint(&["v1", "accounts", account, "keys"], &[]);
        self.json(Method::POST, url, Client::json_body(&body)).await
    }

    /// An account's keys: ids and labels, never secrets.
    pub async fn keys(&self, account: &str) -> Result<Vec<ApiKeyInfo>> {
        let url = self.endpoint(&["v1", "accounts", account, "keys"], &[]);
        let list: ApiKeyList = self.json(Method::GET, url, None).await?;
        Ok(list.keys)
    }

    /// Revokes a key by its id (`key_…`).
    pub async fn revoke_key(&self, id: &str) -> Result<()> {
        self.send(Method::DELETE, self.endpoint(&["v1", "keys", id], &[]), None).await?;
        Ok(())
    }

    /// A job's standard output as raw bytes (the record's `stdout` is lossy text).
    pub async fn stdout(&self, id: &str) -> Result<Bytes> {
        let res =
            self.send(Method::GET, self.endpoint(&["v1", "jobs", id, "stdout"], &[]), None).await?;
        let url = res.url().to_string();
        res.bytes().await.map_err(|e| Error::Request { url, source: e })
    }

    /// Calls a function over HTTP (`/fn/{name}/{path}`) and returns its answer,
    /// whatever the status (see [`InvokeResponse::error_for_status`]).
    ///
    /// ```no_run
    /// # async fn f(client: cloudpipe::Client) -> cloudpipe::Result<()> {
    /// use cloudpipe::Invocation;
    /// let res = client.invoke("web", Invocation::get("/hello?name=you")).await?.error_for_status()?;
    /// print!("{}", res.text());
    /// # Ok(()) }
    /// ```
    pub async fn invoke(&self, name: &str, inv: Invocation) -> Result<InvokeResponse> {
        let (path, query) = match inv.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (inv.path.as_str(), None),
        };
        let mut segments = vec!["fn", name];
        let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        segments.extend(&rest);
        let mut url = self.endpoint(&segments, &[]);
        if path.ends_with('/') && !rest.is_empty() || path == "/" {
            let p = format!("{}/", url.path());
            url.set_path(&p);
        }
        url.set_query(query);
        let has_type = inv.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        // An empty content type leaves the header to the caller's own.
        let content_type = if has_type { "" } else { "application/octet-stream" };
        let body = (!inv.body.is_empty()).then(|| (inv.body.clone(), content_type));
        let res = self.send_raw(inv.method.clone(), url.clone(), body, &inv.headers).await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body =
            res.bytes().await.map_err(|e| Error::Request { url: url.to_string(), source: e })?;
        Ok(InvokeResponse { status, headers, body })
    }
}

/// The `wait` query value for a duration, in milliseconds.
fn wait_param(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

async fn decode<T: serde::de::DeserializeOwned>(
    url: &Url,
    res: reqwest::Response,
) -> Result<(u16, T)> {
    let status = res.status().as_u16();
    let bytes =
        res.bytes().await.map_err(|e| Error::Request { url: url.to_string(), source: e })?;
    serde_json::from_slice(&bytes).map(|v| (status, v)).map_err(|e| Error::Protocol {
        url: url.to_string(),
        message: format!("{e} in {:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> Client {
        Client::new(Config::new(url)).unwrap()
    }

    #[test]
    fn endpoints_escape_names_and_keep_a_base_path() {
        let c = client("https://example.com/cp");
        assert_eq!(
            c.endpoint(&["v1", "jobs", "a/b c"], &[]).as_str(),
            "https://example.com/cp/v1/jobs/a%2Fb%20c"
        );
        let u = c.endpoint(&["v1", "jobs"], &[("tag", "x&y".into())]);
        assert_eq!(u.as_str(), "https://example.com/cp/v1/jobs?tag=x%26y");
        assert_eq!(client("http://h:1/").function_url("web"), "http://h:1/fn/web");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for bad in ["127.0.0.1:7070", "ftp://h", "not a url"] {
            let e = Client::new(Config::new(bad)).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable_after_the_retries() {
        // A port just bound and released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let policy = RetryPolicy {
            max_retries: 2,
            initial_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        };
        let c = client(&format!("http://127.0.0.1:{port}")).with_retry(policy);
        let start = Instant::now();
        let e = c.job("x").await.unwrap_err();
        assert!(e.is_unreachable(), "{e:?}");
        // Two retries waited 20 ms then 40 ms.
        assert!(start.elapsed() >= Duration::from_millis(60), "{:?}", start.elapsed());
    }
}
