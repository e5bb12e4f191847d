//! The PostgreSQL schema, as numbered migrations applied at start-up.
//!
//! Each migration runs in its own transaction under one advisory lock, so nodes that
//! start at once apply it once: the second waits for the lock, then sees it applied.
//! A migration is never edited once released; a change is a new migration.
//!
//! # Tables
//! | table | holds |
//! | --- | --- |
//! | `cp_jobs` | one row per job: the record (`Job::summary` as JSON) and the columns its queries use |
//! | `cp_job_data` | stdin and output of jobs, apart from the records that lists read (3) |
//! | `cp_job_counts` | jobs per status, in shards kept by statement triggers |
//! | `cp_finished_counts` | finished jobs per account, kept the same way (retention) |
//! | `cp_binaries` | function binaries, content-addressed, once whoever owns them |
//! | `cp_functions` | function versions per account (`FunctionMeta` as JSON) |
//! | `cp_names` | function names: owner, version, settings |
//! | `cp_accounts`, `cp_keys` | accounts and key hashes |
//! | `cp_batches` | batch records (no inputs), with the lease of the node driving each (6: input counts, when each stopped, which are open) |
//! | `cp_batch_inputs` | batch inputs in chunks, apart from the records (6) |
//! | `cp_secrets` | sealed secrets per account (never a value in clear) |
//! | `cp_claim_turn` | unused since schema 2 (read by schema-1 nodes during an upgrade) |
//! | `cp_nodes` | nodes and their heartbeats |
//! | `cp_leader` | the leader lease (one row) |
//!
//! Times are microseconds since the Unix epoch (`bigint`). Leases use the database's
//! clock (`cp_now()`), so nodes whose clocks disagree still agree on who holds what.

use anyhow::Context;
use tokio_postgres::Client;

/// Key of the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6370_6d69_6772; // "cpmigr"

/// The migrations, in order; the schema's version is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE FUNCTION cp_now() RETURNS bigint LANGUAGE sql VOLATILE AS
  $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;

CREATE TABLE cp_jobs (
  id uuid PRIMARY KEY,
  account text NOT NULL,
  status text NOT NULL,
  executor text NOT NULL,
  function text NOT NULL,
  function_id text NOT NULL,
  batch text,
  tags text[] NOT NULL,
  idempotency_key text,
  created_at bigint NOT NULL,
  -- terminal jobs only: when they ended (retention's order)
  finished_at bigint,
  attempts integer NOT NULL,
  -- where the job runs or last ran
  node text,
  -- running jobs only, by cp_now(): the claim holds until then
  lease_expires bigint,
  cancel_requested boolean NOT NULL DEFAULT false,
  record bytea NOT NULL
);
CREATE UNIQUE INDEX cp_jobs_idempotency ON cp_jobs (account, idempotency_key)
  WHERE idempotency_key IS NOT NULL;
CREATE INDEX cp_jobs_queue ON cp_jobs (created_at, id) WHERE status = 'queued';
CREATE INDEX cp_jobs_leases ON cp_jobs (lease_expires) WHERE status = 'running';
CREATE INDEX cp_jobs_finished ON cp_jobs (finished_at, id) WHERE finished_at IS NOT NULL;
CREATE INDEX cp_jobs_account ON cp_jobs (account, id);
CREATE INDEX cp_jobs_account_status ON cp_jobs (account, status, id);
CREATE INDEX cp_jobs_status ON cp_jobs (status, id);
CREATE INDEX cp_jobs_function ON cp_jobs (function, id);
CREATE INDEX cp_jobs_function_id ON cp_jobs (function_id, id);
CREATE INDEX cp_jobs_batch ON cp_jobs (batch, id) WHERE batch IS NOT NULL;
CREATE INDEX cp_jobs_tags ON cp_jobs USING gin (tags);
CREATE INDEX cp_jobs_node ON cp_jobs (node, id) WHERE node IS NOT NULL;

-- Jobs per status. Each connection adds to its own shard, so concurrent
-- transactions do not queue on one counter row; a read sums the shards.
CREATE TABLE cp_job_counts (
  status text NOT NULL,
  shard integer NOT NULL,
  n bigint NOT NULL,
  PRIMARY KEY (status, shard)
);
CREATE FUNCTION cp_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO cp_job_counts
      SELECT status, pg_backend_pid() % 16, count(*) FROM new_rows GROUP BY status
      ON CONFLICT (status, shard) DO UPDATE SET n = cp_job_counts.n + EXCLUDED.n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO cp_job_counts
      SELECT status, pg_backend_pid() % 16, -count(*) FROM old_rows GROUP BY status
      ON CONFLICT (status, shard) DO UPDATE SET n = cp_job_counts.n + EXCLUDED.n;
  ELSE
    INSERT INTO cp_job_counts
      SELECT status, pg_backend_pid() % 16, sum(d) FROM (
        SELECT status, 1 AS d FROM new_rows
        UNION ALL SELECT status, -1 AS d FROM old_rows
      ) changes GROUP BY status HAVING sum(d) <> 0
      ON CONFLICT (status, shard) DO UPDATE SET n = cp_job_counts.n + EXCLUDED.n;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER cp_jobs_count_insert AFTER INSERT ON cp_jobs
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cp_count_jobs();
CREATE TRIGGER cp_jobs_count_update AFTER UPDATE ON cp_jobs
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION cp_count_jobs();
CREATE TRIGGER cp_jobs_count_delete AFTER DELETE ON cp_jobs
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cp_count_jobs();

CREATE TABLE cp_binaries (id text PRIMARY KEY, bytes bytea NOT NULL);
CREATE TABLE cp_functions (
  account text NOT NULL,
  id text NOT NULL,
  size bigint NOT NULL,
  meta bytea NOT NULL,
  PRIMARY KEY (account, id)
);
CREATE INDEX cp_functions_id ON cp_functions (id);
CREATE TABLE cp_names (
  name text PRIMARY KEY,
  account text NOT NULL,
  id text NOT NULL,
  settings bytea
);
CREATE INDEX cp_names_account ON cp_names (account);

CREATE TABLE cp_accounts (name text PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE cp_keys (
  hash text PRIMARY KEY,
  id text NOT NULL UNIQUE,
  account text NOT NULL,
  record bytea NOT NULL
);
CREATE INDEX cp_keys_account ON cp_keys (account);

CREATE TABLE cp_batches (
  id text PRIMARY KEY,
  account text NOT NULL,
  running boolean NOT NULL,
  record bytea NOT NULL,
  driver text,
  driver_expires bigint
);
CREATE INDEX cp_batches_account ON cp_batches (account, id);
CREATE INDEX cp_batches_running ON cp_batches (driver_expires) WHERE running;

CREATE TABLE cp_secrets (
  account text NOT NULL,
  name text NOT NULL,
  record bytea NOT NULL,
  PRIMARY KEY (account, name)
);

-- The account whose queued job the last claim took: claims go on after it.
CREATE TABLE cp_claim_turn (id integer PRIMARY KEY CHECK (id = 1), account text NOT NULL);

CREATE TABLE cp_nodes (
  name text PRIMARY KEY,
  role text NOT NULL,
  executors text[] NOT NULL,
  version text NOT NULL,
  advertise_url text,
  started_at bigint NOT NULL,
  heartbeat_at bigint NOT NULL,
  running bigint NOT NULL
);

CREATE TABLE cp_leader (
  id integer PRIMARY KEY CHECK (id = 1),
  node text NOT NULL,
  expires bigint NOT NULL
);
"#,
    // 2: claims find the accounts with queued work and each account's oldest jobs in
    // one index, and keep their turn in the node (no row every claim must lock).
    // `cp_claim_turn` stays for nodes of schema 1 still running during an upgrade.
    r#"
CREATE INDEX cp_jobs_queue_accounts ON cp_jobs (account, created_at, id) WHERE status = 'queued';
DROP INDEX cp_jobs_queue;
"#,
    // 3: finished jobs per account, for retention's count per account.
    r#"
CREATE INDEX cp_jobs_account_finished ON cp_jobs (account, finished_at, id)
  WHERE finished_at IS NOT NULL;

-- Finished jobs per account, sharded as cp_job_counts is.
CREATE TABLE cp_finished_counts (
  account text NOT NULL,
  shard integer NOT NULL,
  n bigint NOT NULL,
  PRIMARY KEY (account, shard)
);
CREATE FUNCTION cp_count_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO cp_finished_counts
      SELECT account, pg_backend_pid() % 16, count(*) FROM new_rows
        WHERE finished_at IS NOT NULL GROUP BY account
      ON CONFLICT (account, shard) DO UPDATE SET n = cp_finished_counts.n + EXCLUDED.n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO cp_finished_counts
      SELECT account, pg_backend_pid() % 16, -count(*) FROM old_rows
        WHERE finished_at IS NOT NULL GROUP BY account
      ON CONFLICT (account, shard) DO UPDATE SET n = cp_finished_counts.n + EXCLUDED.n;
  ELSE
    INSERT INTO cp_finished_counts
      SELECT account, pg_backend_pid() % 16, sum(d) FROM (
        SELECT account, 1 AS d FROM new_rows WHERE finished_at IS NOT NULL
        UNION ALL SELECT account, -1 AS d FROM old_rows WHERE finished_at IS NOT NULL
      ) changes GROUP BY account HAVING sum(d) <> 0
      ON CONFLICT (account, shard) DO UPDATE SET n = cp_finished_counts.n + EXCLUDED.n;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER cp_jobs_finished_insert AFTER INSERT ON cp_jobs
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cp_count_finished();
CREATE TRIGGER cp_jobs_finished_update AFTER UPDATE ON cp_jobs
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION cp_count_finished();
CREATE TRIGGER cp_jobs_finished_delete AFTER DELETE ON cp_jobs
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cp_count_finished();

INSERT INTO cp_finished_counts
  SELECT account, 0, count(*) FROM cp_jobs WHERE finished_at IS NOT NULL GROUP BY account;
"#,
    // 4: stdin and output apart from the job records, so that lists read records only.
    r#"
CREATE TABLE cp_job_data (
  id uuid PRIMARY KEY REFERENCES cp_jobs (id) ON DELETE CASCADE,
  stdin bytea NOT NULL DEFAULT '',
  stdout bytea NOT NULL DEFAULT '',
  stderr bytea NOT NULL DEFAULT ''
);
-- Records of schemas 1 to 3 held the three as base64 inside the JSON. Each key appears once,
-- at the top level, and unescaped (quotes inside strings are escaped), so a pattern
-- finds it exactly.
INSERT INTO cp_job_data (id, stdin, stdout, stderr)
  SELECT id,
    decode(coalesce(substring(r FROM '"stdin":"([A-Za-z0-9+/=]*)"'), ''), 'base64'),
    decode(coalesce(substring(r FROM '"stdout":"([A-Za-z0-9+/=]*)"'), ''), 'base64'),
    decode(coalesce(substring(r FROM '"stderr":"([A-Za-z0-9+/=]*)"'), ''), 'base64')
  FROM (SELECT id, convert_from(record, 'UTF8') AS r FROM cp_jobs) j
  WHERE r ~ '"std(in|out|err)":"[A-Za-z0-9+/=]+"';
UPDATE cp_jobs SET record = convert_to(
    regexp_replace(regexp_replace(regexp_replace(convert_from(record, 'UTF8'),
      '"stdin":"[A-Za-z0-9+/=]*"', '"stdin":""'),
      '"stdout":"[A-Za-z0-9+/=]*"', '"stdout":""'),
      '"stderr":"[A-Za-z0-9+/=]*"', '"stderr":""'), 'UTF8')
  WHERE id IN (SELECT id FROM cp_job_data);
"#,
    // 5: claims, renewals, cancels and requeues are HOT updates. No index reads a
    // column they change (status, node, attempts, lease_expires, cancel_requested,
    // record), so such an update writes no index entry: before this, each of them
    // added one to each of the table's twelve indexes. Queued and running jobs are
    // found through one index of the unfinished jobs (a claim steps over the running
    // ones); finished jobs by status and node through columns that change only when
    // a job finishes. Rows leave room on their page for their next versions.
    r#"
ALTER TABLE cp_jobs
  ADD COLUMN outcome text GENERATED ALWAYS AS (CASE WHEN finished_at IS NOT NULL THEN status END) STORED,
  ADD COLUMN ran_on text GENERATED ALWAYS AS (CASE WHEN finished_at IS NOT NULL THEN node END) STORED;
ALTER TABLE cp_jobs SET (fillfactor = 60);
DROP INDEX cp_jobs_queue_accounts, cp_jobs_leases, cp_jobs_account_status, cp_jobs_status,
  cp_jobs_node, cp_jobs_tags;
CREATE INDEX cp_jobs_active ON cp_jobs (account, created_at, id) WHERE finished_at IS NULL;
CREATE INDEX cp_jobs_account_outcome ON cp_jobs (account, outcome, id) WHERE outcome IS NOT NULL;
CREATE INDEX cp_jobs_outcome ON cp_jobs (outcome, id) WHERE outcome IS NOT NULL;
CREATE INDEX cp_jobs_ran_on ON cp_jobs (ran_on, id) WHERE ran_on IS NOT NULL;
CREATE INDEX cp_jobs_tags ON cp_jobs USING gin (tags) WHERE tags <> '{}';
"#,
    // 6: batch inputs apart from the batch records, in chunks of `BATCH_CHUNK` (1024)
    // inputs; each batch's input count, when it stopped and whether a start-up takes
    // it up, as columns (caps, retention, start-up).
    r#"
ALTER TABLE cp_batches
  ADD COLUMN inputs bigint NOT NULL DEFAULT 0,
  ADD COLUMN stopped_at bigint,
  ADD COLUMN open boolean NOT NULL DEFAULT false;
CREATE TABLE cp_batch_inputs (
  batch text NOT NULL REFERENCES cp_batches (id) ON DELETE CASCADE,
  chunk bigint NOT NULL,
  inputs bytea NOT NULL,
  PRIMARY KEY (batch, chunk)
);
-- Records of schemas 1 to 5 held the inputs inline, as a JSON array.
CREATE TEMPORARY TABLE cp_old_batches ON COMMIT DROP AS
  SELECT id, convert_from(record, 'UTF8')::jsonb AS r FROM cp_batches;
INSERT INTO cp_batch_inputs (batch, chunk, inputs)
  SELECT b.id, (e.ord - 1) / 1024, convert_to(jsonb_agg(e.v ORDER BY e.ord)::text, 'UTF8')
  FROM cp_old_batches b,
    jsonb_array_elements(coalesce(b.r -> 'inputs', '[]'::jsonb)) WITH ORDINALITY AS e(v, ord)
  GROUP BY b.id, (e.ord - 1) / 1024;
UPDATE cp_batches SET
  inputs = jsonb_array_length(coalesce(o.r -> 'inputs', '[]'::jsonb)),
  stopped_at = CASE WHEN o.r ->> 'status' = 'running' THEN NULL
    ELSE coalesce((o.r ->> 'finished_at')::bigint, (o.r ->> 'created_at')::bigint) END,
  open = o.r ->> 'status' = 'running'
    OR (o.r ->> 'hook' IS NOT NULL AND NOT coalesce((o.r ->> 'hook_called')::boolean, false)
        AND o.r ->> 'status' <> 'cancelled'),
  record = convert_to(((o.r - 'inputs')
    || jsonb_build_object('total', jsonb_array_length(coalesce(o.r -> 'inputs', '[]'::jsonb))))::text,
    'UTF8')
  FROM cp_old_batches o WHERE cp_batches.id = o.id;
CREATE INDEX cp_batches_stopped ON cp_batches (stopped_at, id) WHERE stopped_at IS NOT NULL;
CREATE INDEX cp_batches_open ON cp_batches (id) WHERE open;
"#,
];

/// The schema version this code writes.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the schema of the connection's `search_path` up to [`VERSION`]. Refuses a
/// database written by a newer version of the code.
pub async fn migrate(client: &mut Client, schema: Option<&str>) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    if let Some(schema) = schema {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema))).await?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS cp_migrations (
           version integer PRIMARY KEY,
           applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let current: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM cp_migrations", &[]).await?.get(0);
    if current > VERSION {
        anyhow::bail!(
            "the database's schema is version {current}, newer than this cloudpipe's {VERSION}: \
             upgrade this node before starting it"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).await.with_context(|| format!("schema migration {version}"))?;
        tx.execute("INSERT INTO cp_migrations (version) VALUES ($1)", &[&version]).await?;
        tracing::info!(version, "applied a schema migration");
    }
    tx.commit().await?;
    Ok(())
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
