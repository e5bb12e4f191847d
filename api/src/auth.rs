//! Authentication: every request but `/healthz`, `/v1/openapi.json` and the
//! invocation of public functions carries an API key, as `Authorization: Bearer KEY`
//! or HTTP Basic (account name and key, as the Cloudpipe and multyvac clients sent it).
//!
//! - [`Authenticator`] turns credentials into an account name. Two backends:
//!   [`BuiltinAuth`] (keys in the store, kept as SHA-256 hashes, compared in constant
//!   time) and [`ExternalAuth`] (Cloudpipe's auth protocol over HTTPS:
//!   `GET {url}/validate?accountName=…&apiKey=…`, 204 valid, 404 invalid; a short cache;
//!   the built-in keys, the admin's among them, keep working; the service never
//!   vouches for a name that is a local account, the admin's above all).
//! - [`Auth`] adds the account's record (disabled or not, its quotas) and the
//!   per-address limit on failed attempts, and [`require`] is the middleware that
//!   applies it to the whole router: a route added later is authenticated unless it
//!   is added to [`PUBLIC_PATHS`].
//! - [`Caller`] is what handlers see: the account, its role and its limits.
//!
//! Secrets are never logged: only key ids and account names are.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use cloudpipe_runtime::Store;
use cloudpipe_runtime::account::{AccountRecord, KeyRecord, Limits, Scope, Tenant};
use cloudpipe_runtime::model::now_micros;
use cloudpipe_types::{Quotas, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::Instrument;

use crate::{ApiError, AppState};

/// Routes anyone may call. `/fn/…` is also reachable without a key, for public
/// functions only: the invocation handler decides.
pub const PUBLIC_PATHS: &[&str] = &["/healthz", "/v1/openapi.json"];

/// Prefix of generated keys, so that they are recognisable (secret scanners, logs).
const KEY_PREFIX: &str = "cpk_";

// ---- keys ----

/// SHA-256 of a key, hex: what the store keeps.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

/// A new key: 256 random bits, `cpk_` and base64url.
pub fn generate_key() -> String {
    let secret = random_bytes::<32>();
    format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
}

/// A new key's record (its public id and the hash of `key`).
pub fn key_record(account: &str, key: &str, label: Option<String>) -> KeyRecord {
    KeyRecord {
        id: format!("key_{}", hex::encode(random_bytes::<8>())),
        account: account.to_string(),
        label,
        hash: hash_key(key),
        created_at: now_micros(),
    }
}

// ---- credentials ----

/// What a request presents.
#[derive(Clone)]
pub enum Credentials {
    /// `Authorization: Bearer KEY`. With the external backend the token may also be
    /// `ACCOUNT:KEY`, since that protocol validates a key together with its account.
    Bearer(String),
    /// `Authorization: Basic base64(ACCOUNT:KEY)`.
    Basic { account: String, key: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Bearer(_) => f.write_str("Bearer(<secret>)"),
            Credentials::Basic { account, .. } => write!(f, "Basic({account}, <secret>)"),
        }
    }
}

impl Credentials {
    fn key(&self) -> &str {
        match self {
            Credentials::Bearer(k) => k,
            Credentials::Basic { key, .. } => key,
        }
    }

    /// The account named alongside the key, if any.
    fn account(&self) -> Option<(&str, &str)> {
        match self {
            Credentials::Basic { account, key } => Some((account, key)),
            Credentials::Bearer(t) => t.split_once(':'),
        }
    }
}

/// The credentials of a request; `Ok(None)` when it has none.
pub fn credentials(headers: &HeaderMap) -> Result<Option<Credentials>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let bad = || {
        ApiError::Unauthorized(
            "invalid_credentials",
            "malformed Authorization header: use `Bearer KEY` or Basic with the account name and key".into(),
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    let (scheme, rest) = value.split_once(' ').ok_or_else(bad)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Some(Credentials::Bearer(rest.to_string())));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (account, key) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::Basic { account: account.into(), key: key.into() }));
    }
    Err(bad())
}

// ---- the cache ----

/// Entries a cache table holds before it starts again empty (a bound, not a tuning).
const MAX_CACHED: usize = 100_000;

/// Keys and accounts as the store last had them, so that an authenticated request
/// reads no disk. One per process, shared by the built-in backend and [`Auth`]; filled
/// on first use. Whoever changes a key or an account calls an `invalidate_*` method
/// after the store's commit and before answering (the accounts routes do); a node of a
/// cluster calls the same methods when another node tells it of a change. Unknown
/// keys are not remembered: guesses must not grow memory (the failure limiter bounds
/// them).
#[derive(Default)]
pub struct AuthCache {
    inner: RwLock<Cached>,
}

#[derive(Default)]
struct Cached {
    /// Bumped by every invalidation: a store read that began before one is not cached,
    /// since it may predate the change.
    generation: u64,
    /// By the SHA-256 hex of the secret.
    keys: HashMap<String, KeyRecord>,
    accounts: HashMap<String, AccountRecord>,
}

impl AuthCache {
    /// The key whose secret hashes to `hash`, from memory or else from `store`.
    pub async fn key_by_hash(
        &self,
        store: &dyn Store,
        hash: &str,
    ) -> anyhow::Result<Option<KeyRecord>> {
        let generation = {
            let cached = self.inner.read().unwrap();
            if let Some(key) = cached.keys.get(hash) {
                return Ok(Some(key.clone()));
            }
            cached.generation
        };
        let key = store.key_by_hash(hash).await?;
        if let Some(key) = &key {
            self.remember(generation, |c| &mut c.keys, hash, key);
        }
        Ok(key)
    }

    /// An account by name, from memory or else from `store`.
    pub async fn account(
        &self,
        store: &dyn Store,
        name: &str,
    ) -> anyhow::Result<Option<AccountRecord>> {
        let generation = {
            let cached = self.inner.read().unwrap();
            if let Some(account) = cached.accounts.get(name) {
                return Ok(Some(account.clone()));
            }
            cached.generation
        };
        let account = store.get_account(name).await?;
        if let Some(account) = &account {
            self.remember(generation, |c| &mut c.accounts, name, account);
        }
        Ok(account)
    }

    fn remember<T: Clone>(
        &self,
        read_at: u64,
        table: impl FnOnce(&mut Cached) -> &mut HashMap<String, T>,
        key: &str,
        value: &T,
    ) {
        let mut cached = self.inner.write().unwrap();
        if cached.generation != read_at {
            return;
        }
        let table = table(&mut cached);
        if table.len() >= MAX_CACHED {
            table.clear();
        }
        table.insert(key.to_string(), value.clone());
    }

    /// Forgets the key whose secret hashes to `hash` (revoked, or changed elsewhere).
    pub fn invalidate_key(&self, hash: &str) {
        let mut cached = self.inner.write().unwrap();
        cached.generation += 1;
        cached.keys.remove(hash);
    }

    /// Forgets an account (disabled, its quotas or role changed, or deleted).
    pub fn invalidate_account(&self, name: &str) {
        let mut cached = self.inner.write().unwrap();
        cached.generation += 1;
        cached.accounts.remove(name);
    }

    /// Forgets everything (when a node cannot tell what changed).
    pub fn invalidate_all(&self) {
        let mut cached = self.inner.write().unwrap();
        cached.generation += 1;
        cached.keys.clear();
        cached.accounts.clear();
    }
}

// ---- backends ----

/// Why credentials were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid credentials")]
    Invalid,
    #[error("the authentication service is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Turns credentials into the name of the account they belong to.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    async fn authenticate(&self, creds: &Credentials) -> Result<String, AuthError>;

    /// True when accounts may exist outside the store (an external service vouches
    /// for them); they then get the default user quotas.
    fn external_accounts(&self) -> bool {
        false
    }

    /// The cache the backend reads the store's keys through, which [`Auth`] shares.
    fn cache(&self) -> Option<&Arc<AuthCache>> {
        None
    }
}

/// Keys in the store (read through an [`AuthCache`]).
pub struct BuiltinAuth {
    store: Arc<dyn Store>,
    cache: Arc<AuthCache>,
}

impl BuiltinAuth {
    pub fn new(store: Arc<dyn Store>) -> BuiltinAuth {
        BuiltinAuth { store, cache: Arc::default() }
    }
}

#[async_trait]
impl Authenticator for BuiltinAuth {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn cache(&self) -> Option<&Arc<AuthCache>> {
        Some(&self.cache)
    }

    async fn authenticate(&self, creds: &Credentials) -> Result<String, AuthError> {
        let hash = hash_key(creds.key());
        let Some(record) = self.cache.key_by_hash(&*self.store, &hash).await? else {
            return Err(AuthError::Invalid);
        };
        // The lookup found it by hash; compare again without early exit, so that the
        // answer's timing says nothing about how much of a guess matched.
        let same: bool = record.hash.as_bytes().ct_eq(hash.as_bytes()).into();
        if !same {
            return Err(AuthError::Invalid);
        }
        if let Credentials::Basic { account, .. } = creds
            && *account != record.account
        {
            return Err(AuthError::Invalid);
        }
        Ok(record.account)
    }
}

/// Cloudpipe's external auth protocol, with a short cache of valid answers.
pub struct ExternalAuth {
    builtin: BuiltinAuth,
    url: reqwest::Url,
    client: reqwest::Client,
    ttl: Duration,
    /// SHA-256 of (account, key) → when it was last vouched for.
    cache: Mutex<HashMap<[u8; 32], Instant>>,
}

impl ExternalAuth {
    pub fn new(store: Arc<dyn Store>, url: &str, ttl: Duration) -> anyhow::Result<ExternalAuth> {
        let mut url =
            reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("auth URL {url:?}: {e}"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "https" | "http"),
            "auth URL must be https:// (or http:// on a trusted network)"
        );
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ExternalAuth {
            builtin: BuiltinAuth::new(store),
            url: url.join("validate")?,
            client,
            ttl,
            cache: Mutex::default(),
        })
    }

    fn cache_key(account: &str, key: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(account.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        h.finalize().into()
    }
}

#[async_trait]
impl Authenticator for ExternalAuth {
    fn name(&self) -> &'static str {
        "external"
    }

    fn external_accounts(&self) -> bool {
        true
    }

    fn cache(&self) -> Option<&Arc<AuthCache>> {
        self.builtin.cache()
    }

    async fn authenticate(&self, creds: &Credentials) -> Result<String, AuthError> {
        match self.builtin.authenticate(creds).await {
            Err(AuthError::Invalid) => {}
            other => return other,
        }
        let Some((account, key)) = creds.account() else { return Err(AuthError::Invalid) };
        if !cloudpipe_runtime::registry::is_valid_name(account) || key.is_empty() {
            return Err(AuthError::Invalid);
        }
        // Local accounts are the store's alone: an external `admin:…` (or the name of
        // any local account) must never become that account. Checked before the cache,
        // since a local account may be created after the service vouched for the name.
        if account == cloudpipe_runtime::account::ADMIN
            || self.builtin.store.get_account(account).await?.is_some()
        {
            tracing::warn!(
                account,
                "the external auth service is not asked about a local account's name"
            );
            return Err(AuthError::Invalid);
        }
        let ck = Self::cache_key(account, key);
        if let Some(at) = lock(&self.cache).get(&ck)
            && at.elapsed() < self.ttl
        {
            return Ok(account.to_string());
        }
        let res = self
            .client
            .get(self.url.clone())
            .query(&[("accountName", account), ("apiKey", key)])
            .send()
            .await
            // The error text would carry the URL, key included: say only what failed.
            .map_err(|e| AuthError::Unavailable(describe(&e)))?;
        match res.status().as_u16() {
            204 | 200 => {
                let mut cache = lock(&self.cache);
                if cache.len() > 100_000 {
                    cache.retain(|_, at| at.elapsed() < self.ttl);
                }
                cache.insert(ck, Instant::now());
                Ok(account.to_string())
            }
            401 | 403 | 404 => Err(AuthError::Invalid),
            other => Err(AuthError::Unavailable(format!("it answered {other}"))),
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        "request failed".into()
    }
}

// ---- failed attempts ----

/// A lock that outlives a panic of another holder. The maps behind these locks stay
/// consistent whatever panics (each update is one insert or one counter), so a
/// poisoned lock is used as it is rather than failing every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Failed authentications per client: past `max` within `window`, the client is
/// refused (429) until the window ends, without checking its credentials. A client is
/// its IPv4 address, or its IPv6 /64 (one host usually holds a whole /64).
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    /// `max` 0: no limit.
    pub fn new(max: u32, window: Duration) -> FailureLimiter {
        FailureLimiter { max, window, seen: Mutex::default() }
    }

    /// The key of a client address: IPv4 as it is (also when mapped into IPv6), IPv6
    /// cut to its /64.
    fn client(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        }
    }

    /// `Err(retry_after)` while `ip` is over the limit.
    fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let started = match lock(&self.seen).get(&Self::client(ip)) {
            Some((start, n)) if *n >= self.max => *start,
            _ => return Ok(()),
        };
        // One reading of the clock: the window may end between two.
        match self.window.saturating_sub(started.elapsed()) {
            left if left.is_zero() => Ok(()),
            left => Err(left),
        }
    }

    fn failed(&self, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        if seen.len() >= 100_000 {
            seen.retain(|_, (start, _)| now.saturating_duration_since(*start) < self.window);
        }
        let entry = seen.entry(Self::client(ip)).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

// ---- callers ----

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: String,
    pub role: Role,
    pub limits: Limits,
    pub allow_network: bool,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// True when the caller may see what `account` owns.
    pub fn sees(&self, account: &str) -> bool {
        self.is_admin() || self.account == account
    }

    pub fn scope(&self) -> Scope {
        self.tenant().scope()
    }

    pub fn tenant(&self) -> Tenant {
        Tenant {
            account: self.account.clone(),
            admin: self.is_admin(),
            limits: self.limits,
            allow_network: self.allow_network,
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.is_admin() {
            true => Ok(()),
            false => Err(ApiError::Forbidden("forbidden", "this needs the admin's key".into())),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Option<Caller>>() {
            Some(Some(c)) => Ok(c.clone()),
            _ => Err(ApiError::Unauthorized("unauthenticated", missing_key_message())),
        }
    }
}

/// The caller if the request had credentials (routes reachable without a key).
pub struct MaybeCaller(pub Option<Caller>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(MaybeCaller(parts.extensions.get::<Option<Caller>>().cloned().flatten()))
    }
}

fn missing_key_message() -> String {
    "this needs an API key: send `Authorization: Bearer KEY`".into()
}

/// Authentication as the router applies it.
pub struct Auth {
    backend: Arc<dyn Authenticator>,
    store: Arc<dyn Store>,
    cache: Arc<AuthCache>,
    /// Quotas of accounts that set none.
    pub defaults: Quotas,
    limiter: FailureLimiter,
}

impl Auth {
    pub fn new(
        backend: Arc<dyn Authenticator>,
        store: Arc<dyn Store>,
        defaults: Quotas,
        limiter: FailureLimiter,
    ) -> Auth {
        let cache = backend.cache().cloned().unwrap_or_default();
        Auth { backend, store, cache, defaults, limiter }
    }

    /// The keys and accounts in memory: invalidate them when they change.
    pub fn cache(&self) -> &AuthCache {
        &self.cache
    }

    pub fn backend(&self) -> &dyn Authenticator {
        &*self.backend
    }

    /// The limits of an account: none for the admin.
    pub fn limits(&self, account: &AccountRecord) -> Limits {
        match account.role {
            Role::Admin => Limits::default(),
            Role::User => Limits::resolve(&account.quotas, &self.defaults),
        }
    }

    /// The record of account `name`. One vouched for by the external service has none
    /// in the store: it gets a default user's (no quotas of its own, no network, no
    /// egress).
    pub async fn account(&self, name: &str) -> anyhow::Result<Option<AccountRecord>> {
        Ok(match self.cache.account(&*self.store, name).await? {
            Some(a) => Some(a),
            None if self.backend.external_accounts() => Some(AccountRecord {
                name: name.to_string(),
                role: Role::User,
                disabled: false,
                quotas: Quotas::default(),
                allow_network: false,
                allowed_outbound: Vec::new(),
                created_at: 0,
            }),
            None => None,
        })
    }

    /// The caller behind `creds`.
    pub async fn caller(&self, creds: &Credentials) -> Result<Caller, ApiError> {
        let name = self.backend.authenticate(creds).await.map_err(|e| match e {
            AuthError::Invalid => ApiError::Unauthorized(
                "invalid_credentials",
                "the API key is not valid (unknown, revoked, or not this account's)".into(),
            ),
            AuthError::Unavailable(m) => ApiError::AuthUnavailable(m),
            AuthError::Internal(e) => ApiError::Internal(e),
        })?;
        let account = match self.account(&name).await? {
            Some(a) => a,
            // A key whose account is gone.
            None => {
                return Err(ApiError::Unauthorized(
                    "invalid_credentials",
                    "the API key is not valid (unknown, revoked, or not this account's)".into(),
                ));
            }
        };
        if account.disabled {
            return Err(ApiError::Forbidden(
                "account_disabled",
                format!("account {name:?} is disabled"),
            ));
        }
        Ok(Caller {
            limits: self.limits(&account),
            role: account.role,
            allow_network: account.allow_network,
            account: name,
        })
    }
}

/// The address a connection comes from, whatever the listener (plain TCP or TLS).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

/// The middleware: authenticates every request, except on [`PUBLIC_PATHS`] and
/// `/fn/…` without credentials, and puts an `Option<Caller>` in its extensions.
pub async fn require(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if PUBLIC_PATHS.contains(&path) {
        req.extensions_mut().insert(None::<Caller>);
        return next.run(req).await;
    }
    let invoke = path == "/fn" || path.starts_with("/fn/");
    let creds = match credentials(req.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let Some(creds) = creds else {
        if invoke {
            req.extensions_mut().insert(None::<Caller>);
            return next.run(req).await;
        }
        return ApiError::Unauthorized("unauthenticated", missing_key_message()).into_response();
    };
    let ip = req.extensions().get::<ConnectInfo<ClientAddr>>().map(|c| c.0.0.ip());
    let auth = &state.auth;
    if let Some(ip) = ip
        && let Err(retry) = auth.limiter.check(ip)
    {
        return ApiError::TooManyAuthFailures(retry).into_response();
    }
    match auth.caller(&creds).instrument(tracing::debug_span!("api.auth")).await {
        Ok(caller) => {
            req.extensions_mut().insert(Some(caller));
            next.run(req).await
        }
        Err(e) => {
            if let (Some(ip), ApiError::Unauthorized(..) | ApiError::Forbidden(..)) = (ip, &e) {
                auth.limiter.failed(ip);
                tracing::info!(client = %ip, "authentication failed");
            }
            e.into_response()
        }
    }
}

// ---- first start ----

/// What [`bootstrap`] did.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// A key made for a new admin account: shown once, then only its hash remains.
    pub new_admin_key: Option<String>,
}

/// Makes sure the admin account exists. With `admin_key`, that key is the admin's
/// (added if new). Without one, on a store with no account yet, a key is generated
/// and returned, to be shown once. Accounts disabled while jobs of theirs were
/// queued (a crash between the two writes) have those jobs cancelled here.
pub async fn bootstrap(state: &AppState, admin_key: Option<&str>) -> anyhow::Result<Bootstrap> {
    let store = &state.runtime.store;
    let admin = cloudpipe_runtime::account::ADMIN;
    let first = store.list_accounts().await?.is_empty();
    if store.get_account(admin).await?.is_none() {
        store
            .insert_account(AccountRecord {
                name: admin.into(),
                role: Role::Admin,
                disabled: false,
                quotas: Quotas::default(),
                allow_network: false,
                allowed_outbound: Vec::new(),
                created_at: now_micros(),
            })
            .await?;
    }
    let mut out = Bootstrap::default();
    match admin_key {
        Some(key) => {
            anyhow::ensure!(key.len() >= 16, "CLOUDPIPE_ADMIN_KEY must be at least 16 characters");
            let known = store.key_by_hash(&hash_key(key)).await?;
            match known {
                Some(k) if k.account == admin => {}
                Some(_) => anyhow::bail!("CLOUDPIPE_ADMIN_KEY is another account's key"),
                None => {
                    let record = key_record(admin, key, Some("CLOUDPIPE_ADMIN_KEY".into()));
                    store.insert_key(record).await?;
                }
            }
        }
        None if first => {
            let key = generate_key();
            store.insert_key(key_record(admin, &key, Some("first start".into()))).await?;
            out.new_admin_key = Some(key);
        }
        None => {}
    }
    for account in store.list_accounts().await? {
        if account.disabled {
            crate::routes::accounts::stop_jobs(state, &account.name).await?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hashed() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 43, "{a}");
        let record = key_record("alice", &a, None);
        assert_eq!(record.hash, hash_key(&a));
        assert!(!record.hash.contains(&a[KEY_PREFIX.len()..]));
        assert!(record.id.starts_with("key_") && record.id.len() == 20);
    }

    #[test]
    fn credentials_parse_bearer_and_basic() {
        let mut h = HeaderMap::new();
        assert!(credentials(&h).unwrap().is_none());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert!(matches!(credentials(&h).unwrap(), Some(Credentials::Bearer(k)) if k == "abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:sec:ret");
        h.insert(header::AUTHORIZATION, format!("Basic {basic}").parse().unwrap());
        match credentials(&h).unwrap() {
            Some(Credentials::Basic { account, key }) => {
                assert_eq!((account.as_str(), key.as_str()), ("alice", "sec:ret"));
            }
            other => panic!("{other:?}"),
        }
        for bad in ["Bearer", "Token x", "Basic !!!", "Basic YWxpY2U="] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(credentials(&h).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn cache_serves_from_memory_until_invalidated_and_skips_reads_older_than_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloudpipe_runtime::store::open(Default::default(), dir.path()).unwrap();
        let account = AccountRecord {
            name: "alice".into(),
            role: Role::User,
            disabled: false,
            quotas: Quotas::default(),
            allow_network: false,
            allowed_outbound: Vec::new(),
            created_at: 1,
        };
        assert!(store.insert_account(account.clone()).await.unwrap());
        let key = key_record("alice", "cpk_secret", None);
        assert!(store.insert_key(key.clone()).await.unwrap());
        let cache = AuthCache::default();
        assert_eq!(cache.key_by_hash(&*store, &key.hash).await.unwrap(), Some(key.clone()));
        assert_eq!(cache.key_by_hash(&*store, "unknown").await.unwrap(), None);
        assert_eq!(cache.account(&*store, "alice").await.unwrap(), Some(account.clone()));

        // Changed in the store behind the cache's back: memory answers until told.
        store.delete_key(&key.id).await.unwrap();
        let disabled = AccountRecord { disabled: true, ..account.clone() };
        store.update_account(disabled.clone()).await.unwrap();
        assert_eq!(cache.key_by_hash(&*store, &key.hash).await.unwrap(), Some(key.clone()));
        assert!(!cache.account(&*store, "alice").await.unwrap().unwrap().disabled);
        cache.invalidate_key(&key.hash);
        cache.invalidate_account("alice");
        assert_eq!(cache.key_by_hash(&*store, &key.hash).await.unwrap(), None);
        assert_eq!(cache.account(&*store, "alice").await.unwrap(), Some(disabled.clone()));
        cache.invalidate_all();
        assert!(cache.inner.read().unwrap().accounts.is_empty());

        // A read that began before an invalidation is not remembered: it may predate
        // the change.
        let before = cache.inner.read().unwrap().generation;
        cache.invalidate_account("bob");
        cache.remember(before, |c| &mut c.accounts, "alice", &account);
        assert!(cache.inner.read().unwrap().accounts.is_empty());
        let now = cache.inner.read().unwrap().generation;
        cache.remember(now, |c| &mut c.accounts, "alice", &disabled);
        assert_eq!(cache.account(&*store, "alice").await.unwrap(), Some(disabled));
    }

    #[test]
    fn limiter_blocks_after_max_failures_in_window() {
        let l = FailureLimiter::new(3, Duration::from_millis(200));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(ip).is_ok());
            l.failed(ip);
        }
        assert!(l.check(ip).is_err());
        assert!(l.check(other).is_ok());
        std::thread::sleep(Duration::from_millis(220));
        assert!(l.check(ip).is_ok());
        assert!(FailureLimiter::new(0, Duration::from_secs(1)).check(ip).is_ok());
    }

    #[test]
    fn limiter_keys_ipv6_clients_on_their_64() {
        let l = FailureLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.failed(a);
        l.failed(b);
        assert!(l.check(a).is_err(), "two addresses of one /64 are one client");
        assert!(l.check("2001:db8:1:2::77".parse().unwrap()).is_err());
        assert!(l.check(other).is_ok());
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        l.failed(v4);
        l.failed("::ffff:10.0.0.1".parse().unwrap());
        assert!(l.check(v4).is_err(), "an IPv4-mapped address is its IPv4 address");
    }

    #[test]
    fn limiter_keeps_working_after_a_panic_under_its_lock() {
        let l = Arc::new(FailureLimiter::new(1, Duration::from_secs(60)));
        let poisoner = l.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.seen.lock().unwrap();
            panic!("a panic while holding the limiter's lock");
        })
        .join();
        assert!(l.seen.is_poisoned());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(l.check(ip).is_ok());
        l.failed(ip);
        assert!(l.check(ip).is_err());
    }

    #[test]
    fn limiter_counts_saturate_and_the_window_end_never_underflows() {
        let l = FailureLimiter::new(u32::MAX, Duration::ZERO);
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        l.seen.lock().unwrap().insert(ip, (Instant::now(), u32::MAX));
        l.failed(ip);
        // The window (zero) has always just ended: no subtraction may go below zero.
        for _ in 0..1000 {
            assert!(l.check(ip).is_ok());
        }
        let l = FailureLimiter::new(1, Duration::from_secs(60));
        l.seen.lock().unwrap().insert(ip, (Instant::now(), u32::MAX));
        l.failed(ip);
        assert_eq!(l.seen.lock().unwrap()[&ip].1, u32::MAX);
    }
}
