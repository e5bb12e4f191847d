//! The client for code without an async runtime: [`Client`] runs each call of
//! [`crate::Client`] to completion on a small runtime of its own.
//!
//! Do not use it from inside an async runtime (a tokio task): blocking there panics;
//! use [`crate::Client`] instead.
//!
//! ```no_run
//! use cloudpipe::blocking::Client;
//! use cloudpipe::JobSpec;
//!
//! let client = Client::from_env()?;
//! let spec = JobSpec { function: "hello".into(), args: vec!["world".into()], ..JobSpec::default() };
//! let job = client.submit_and_wait(&spec, None)?;
//! print!("{}", job.stdout);
//! # Ok::<(), cloudpipe::Error>(())
//! ```

use std::time::Duration;

use bytes::Bytes;
use cloudpipe_types::{
    BatchRecord, BatchSpec, FunctionInfo, FunctionSettingsPatch, JobEvent, JobList, JobRecord,
    JobSpec,
};

use crate::{Config, Error, Invocation, InvokeResponse, JobQuery, Result, RetryPolicy};

/// A blocking client of one Cloudpipe server; owns a single-threaded runtime, so make
/// one and keep it.
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for this configuration.
    pub fn new(config: Config) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the client's runtime: {e}")))?;
        Ok(Client { inner: crate::Client::new(config)?, rt })
    }

    /// A client configured from the environment and the credentials file.
    pub fn from_env() -> Result<Client> {
        Client::new(Config::from_env()?)
    }

    /// This client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Client {
        self.inner = self.inner.with_retry(retry);
        self
    }

    /// The async client underneath.
    pub fn inner(&self) -> &crate::Client {
        &self.inner
    }

    /// See [`crate::Client::upload_function`].
    pub fn upload_function(&self, name: &str, wasm: impl Into<Bytes>) -> Result<FunctionInfo> {
        self.rt.block_on(self.inner.upload_function(name, wasm))
    }

    /// See [`crate::Client::upload_function_with`].
    pub fn upload_function_with(
        &self,
        name: Option<&str>,
        wasm: impl Into<Bytes>,
        settings: &FunctionSettingsPatch,
    ) -> Result<FunctionInfo> {
        self.rt.block_on(self.inner.upload_function_with(name, wasm, settings))
    }

    /// See [`crate::Client::functions`].
    pub fn functions(&self) -> Result<Vec<FunctionInfo>> {
        self.rt.block_on(self.inner.functions())
    }

    /// See [`crate::Client::submit`].
    pub fn submit(&self, spec: &JobSpec) -> Result<JobRecord> {
        self.rt.block_on(self.inner.submit(spec))
    }

    /// See [`crate::Client::submit_and_wait`].
    pub fn submit_and_wait(&self, spec: &JobSpec, timeout: Option<Duration>) -> Result<JobRecord> {
        self.rt.block_on(self.inner.submit_and_wait(spec, timeout))
    }

    /// See [`crate::Client::call`].
    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        function: &str,
        name: &str,
        args: impl serde::Serialize,
    ) -> Result<T> {
        self.rt.block_on(self.inner.call(function, name, args))
    }

    /// See [`crate::Client::job`].
    pub fn job(&self, id: &str) -> Result<JobRecord> {
        self.rt.block_on(self.inner.job(id))
    }

    /// See [`crate::Client::wait`].
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<JobRecord> {
        self.rt.block_on(self.inner.wait(id, timeout))
    }

    /// See [`crate::Client::cancel`].
    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        self.rt.block_on(self.inner.cancel(id))
    }

    /// See [`crate::Client::jobs`].
    pub fn jobs(&self, query: &JobQuery) -> Result<JobList> {
        self.rt.block_on(self.inner.jobs(query))
    }

    /// See [`crate::Client::create_batch`].
    ///
    /// ```no_run
    /// use cloudpipe::{BatchSpec, JobSpec};
    /// let client = cloudpipe::blocking::Client::from_env()?;
    /// let spec = BatchSpec {
    ///     template: JobSpec { function: "resize".into(), ..JobSpec::default() },
    ///     inputs: Some(vec![vec!["a.png".into()], vec!["b.png".into()]]),
    ///     ..BatchSpec::default()
    /// };
    /// let batch = client.create_batch(&spec)?;
    /// let done = client.wait_batch(&batch.id, None)?;
    /// println!("{}/{} OK", done.counts.ok, done.total);
    /// # Ok::<(), cloudpipe::Error>(())
    /// ```
    pub fn create_batch(&self, spec: &BatchSpec) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.create_batch(spec))
    }

    /// See [`crate::Client::batch`].
    pub fn batch(&self, id: &str) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.batch(id))
    }

    /// See [`crate::Client::batches`].
    pub fn batches(&self) -> Result<Vec<BatchRecord>> {
        self.rt.block_on(self.inner.batches())
    }

    /// See [`crate::Client::resume_batch`].
    pub fn resume_batch(&self, id: &str) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.resume_batch(id))
    }

    /// See [`crate::Client::retry_batch`].
    pub fn retry_batch(&self, id: &str) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.retry_batch(id))
    }

    /// See [`crate::Client::cancel_batch`].
    pub fn cancel_batch(&self, id: &str) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.cancel_batch(id))
    }

    /// See [`crate::Client::delete_batch`].
    pub fn delete_batch(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.delete_batch(id))
    }

    /// See [`crate::Client::wait_batch`].
    pub fn wait_batch(&self, id: &str, timeout: Option<Duration>) -> Result<BatchRecord> {
        self.rt.block_on(self.inner.wait_batch(id, timeout))
    }

    /// See [`crate::Client::invoke`].
    pub fn invoke(&self, name: &str, inv: Invocation) -> Result<InvokeResponse> {
        self.rt.block_on(self.inner.invoke(name, inv))
    }

    /// A job's events as an iterator; see [`crate::Client::events`].
    pub fn events(&self, id: &str) -> Result<JobEvents<'_>> {
        let inner = self.rt.block_on(self.inner.events(id))?;
        Ok(JobEvents { client: self, inner })
    }
}

/// A job's events, read as they arrive; made by [`Client::events`].
#[derive(Debug)]
pub struct JobEvents<'a> {
    client: &'a Client,
    inner: crate::JobEvents,
}

impl Iterator for JobEvents<'_> {
    type Item = Result<JobEvent>;

    fn next(&mut self) -> Option<Result<JobEvent>> {
        self.client.rt.block_on(self.inner.next()).transpose()
    }
}
