//! The client commands (`accounts`, `keys`, `secrets`, `me`, `batch`) on the
//! `cloudpipe` client crate, and `admin reset-key`, which works on a stopped server's
//! store directly. Each client command prints the server's answer as JSON.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use cloudpipe::{AccountCreate, AccountPatch, Client, Config, Quotas, Role};
use cloudpipe_runtime::cluster::{NodeConfig, Role as NodeRole};
use cloudpipe_runtime::store::Backend;
use cloudpipe_runtime::store::postgres::{PgConfig, PgStore};
use serde::Serialize;

use crate::flags::default_data_dir;

/// Where the server is and which key to use: flags, then the environment, then the
/// credentials file (an empty value counts as unset).
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Server URL [default: from the credentials file, else http://127.0.0.1:7070].
    #[arg(long, env = "CLOUDPIPE_URL")]
    url: Option<String>,
    /// API key [default: from the credentials file].
    #[arg(long, env = "CLOUDPIPE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

impl ClientArgs {
    /// A client of the server these flags name; an error when there is no key.
    pub fn client(&self) -> anyhow::Result<Client> {
        let config = Config::resolve(self.url.clone(), self.api_key.clone())?;
        if config.api_key.is_none() {
            let file = cloudpipe::Credentials::path()
                .map_or_else(|| "the credentials file".into(), |p| p.display().to_string());
            anyhow::bail!(
                "no API key: pass --api-key, set CLOUDPIPE_API_KEY, or keep one in {file}"
            );
        }
        Ok(Client::new(config)?)
    }
}

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    Create {
        name: String,
        /// Make it an admin.
        #[arg(long)]
        admin: bool,
        /// Jobs queued or running at once.
        #[arg(long)]
        max_concurrent_jobs: Option<u64>,
        /// Longest job timeout, in milliseconds.
        #[arg(long)]
        max_timeout_ms: Option<u64>,
        /// Largest job memory cap, in MiB.
        #[arg(long)]
        max_memory_mb: Option<u64>,
        /// Total bytes of stored function versions.
        #[arg(long)]
        max_function_bytes: Option<u64>,
        /// Finished jobs kept (the account's oldest go first).
        #[arg(long)]
        max_finished_jobs: Option<u64>,
        /// Inputs of one batch.
        #[arg(long)]
        max_batch_inputs: Option<u64>,
        /// Batches stored, whatever their status.
        #[arg(long)]
        max_batches: Option<u64>,
        /// Inputs of all the account's stored batches.
        #[arg(long)]
        max_stored_batch_inputs: Option<u64>,
    },
    /// List accounts.
    List,
    /// Show one account.
    Show { name: String },
    /// Disable an account: its keys are refused and its jobs cancelled.
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key for an account (printed once).
    Create {
        account: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// List an account's keys (ids and labels, never secrets).
    List { account: String },
    /// Revoke a key by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Create or replace a secret; its value is read from stdin (one trailing newline
    /// dropped), so that it never shows in a process list or a shell history.
    Put { name: String },
    /// List the secrets: names and times, never values.
    List,
    /// Delete a secret.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Make a new API key for an account (the admin's by default) straight in the
    /// store and print it: the way back in after its last key was revoked. On an
    /// embedded store, run it with the server stopped (the store is locked while it
    /// runs); on PostgreSQL, while the cluster runs.
    ResetKey {
        /// The server's data directory (embedded stores).
        #[arg(long, env = "CLOUDPIPE_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// Store: redb (default), sled, or the cluster's PostgreSQL URL.
        #[arg(long, env = "CLOUDPIPE_STORE", default_value = "redb")]
        store: String,
        /// The account that gets the key.
        #[arg(long, default_value = "admin")]
        account: String,
    },
}

/// `cloudpipe batch`: the batch command shared with `cargo cloudpipe batch`, on a
/// function already uploaded.
#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The function every input runs.
    #[arg(long, required_unless_present_any = ["resume", "retry"], conflicts_with_all = ["resume", "retry"])]
    function: Option<String>,
    #[command(flatten)]
    batch: cloudpipe_cli::batch::BatchFlags,
}

/// Prints an answer as the API sent it (pretty JSON).
fn print(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn accounts(client: ClientArgs, command: AccountsCommand) -> anyhow::Result<()> {
    let client = client.client()?;
    let disabled = |d: bool| AccountPatch { disabled: Some(d), ..AccountPatch::default() };
    match command {
        AccountsCommand::Create {
            name,
            admin,
            max_concurrent_jobs,
            max_timeout_ms,
            max_memory_mb,
            max_function_bytes,
            max_finished_jobs,
            max_batch_inputs,
            max_batches,
            max_stored_batch_inputs,
        } => {
            let spec = AccountCreate {
                name,
                role: if admin { Role::Admin } else { Role::User },
                quotas: Quotas {
                    max_concurrent_jobs,
                    max_timeout_ms,
                    max_memory_mb,
                    max_function_bytes,
                    max_finished_jobs,
                    max_batch_inputs,
                    max_batches,
                    max_stored_batch_inputs,
                },
                allow_network: false,
                allowed_outbound: Vec::new(),
            };
            print(&client.create_account(&spec).await?)
        }
        AccountsCommand::List => {
            print(&cloudpipe_types::AccountList { accounts: client.accounts().await? })
        }
        AccountsCommand::Show { name } => print(&client.account(&name).await?),
        AccountsCommand::Disable { name } => {
            print(&client.update_account(&name, &disabled(true)).await?)
        }
        AccountsCommand::Enable { name } => {
            print(&client.update_account(&name, &disabled(false)).await?)
        }
    }
}

pub async fn keys(client: ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    let client = client.client()?;
    match command {
        KeysCommand::Create { account, label } => {
            print(&client.create_key(&account, label.as_deref()).await?)
        }
        KeysCommand::List { account } => {
            print(&cloudpipe_types::ApiKeyList { keys: client.keys(&account).await? })
        }
        KeysCommand::Revoke { id } => Ok(client.revoke_key(&id).await?),
    }
}

pub async fn secrets(client: ClientArgs, command: SecretsCommand) -> anyhow::Result<()> {
    let client = client.client()?;
    match command {
        SecretsCommand::Put { name } => {
            use std::io::Read;
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).context("reading the value from stdin")?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            print(&client.put_secret(&name, value).await?)
        }
        SecretsCommand::List => {
            print(&cloudpipe_types::SecretList { secrets: client.secrets().await? })
        }
        SecretsCommand::Rm { name } => Ok(client.delete_secret(&name).await?),
    }
}

pub async fn me(client: ClientArgs) -> anyhow::Result<()> {
    print(&client.client()?.me().await?)
}

/// Returns the process's exit code.
pub async fn batch(args: BatchArgs) -> anyhow::Result<i32> {
    let client = args.client.client()?;
    let function = async || Ok(args.function.clone().unwrap_or_default());
    let ui = cloudpipe_cli::Ui::new(false);
    cloudpipe_cli::batch::run(&client, &args.batch, function, ui, "cloudpipe").await
}

/// `cloudpipe admin reset-key`: a new key for `account`, written to the store of a
/// stopped server and printed once.
pub async fn reset_key(data_dir: &Path, store: &str, account: &str) -> anyhow::Result<()> {
    let store: std::sync::Arc<dyn cloudpipe_runtime::store::Store> = if store
        .starts_with("postgres://")
        || store.starts_with("postgresql://")
    {
        // A node of the cluster for as long as the command runs, one that runs nothing.
        let mut node = NodeConfig::new(format!("reset-key-{}", std::process::id()));
        node.role = NodeRole::Api;
        node.max_connections = 2;
        let config = PgConfig { url: store.to_string(), schema: None, node };
        std::sync::Arc::new(PgStore::open(config).await.context("opening the PostgreSQL store")?)
    } else {
        let backend =
            Backend::parse(store).context("--store: use redb, sled or a postgres:// URL")?;
        let dir = data_dir.join("store").join(backend.as_str());
        anyhow::ensure!(
            dir.exists(),
            "no {store} store in {} (is --data-dir right?)",
            data_dir.display()
        );
        tokio::task::spawn_blocking(move || cloudpipe_runtime::store::open(backend, &dir))
            .await?
            .context("opening the store (stop the server first: it holds the store's lock)")?
    };
    let record = store
        .get_account(account)
        .await?
        .with_context(|| format!("there is no account {account:?} in this store"))?;
    anyhow::ensure!(!record.disabled, "account {account:?} is disabled: enable it first");
    let key = cloudpipe_api::auth::generate_key();
    let record = cloudpipe_api::auth::key_record(account, &key, Some("admin reset-key".into()));
    anyhow::ensure!(store.insert_key(record.clone()).await?, "the account vanished");
    eprintln!("Added key {} to account {account:?}. Its secret (shown only now):", record.id);
    println!("{key}");
    Ok(())
}
