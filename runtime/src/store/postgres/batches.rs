//! Batches in PostgreSQL: records in `cp_batches` (with the columns the caps,
//! retention and start-up read), inputs in chunks in `cp_batch_inputs`.

use anyhow::Context;
use tokio_postgres::Row;

use super::{Cached, PgStore, encode};
use crate::model::{BatchState, Micros};
use crate::store::{BATCH_CHUNK, BatchCaps, BatchFilter, CreateBatch, Result};

fn decode(row: &Row) -> Result<BatchState> {
    serde_json::from_slice(row.get(0)).context("stored batch")
}

fn stopped(b: &BatchState) -> Option<i64> {
    b.stopped_at().map(|at| at as i64)
}

impl PgStore {
    pub(super) async fn create_batch_row(
        &self,
        batch: BatchState,
        inputs: Vec<Vec<String>>,
        caps: BatchCaps,
    ) -> Result<CreateBatch> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One creator per account at a time, so that two cannot both pass its caps.
        tx.exec(
            "SELECT pg_advisory_xact_lock(hashtext('cp_batches'), hashtext($1))",
            &[&batch.account],
        )
        .await?;
        let row = tx
            .q_one(
                "SELECT count(*), coalesce(sum(inputs), 0)::int8 FROM cp_batches WHERE account = $1",
                &[&batch.account],
            )
            .await?;
        let (batches, stored) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        if let Some(limit) = caps.max_batches
            && batches >= limit
        {
            return Ok(CreateBatch::TooManyBatches { used: batches, limit });
        }
        if let Some(limit) = caps.max_inputs
            && stored.saturating_add(inputs.len() as u64) > limit
        {
            return Ok(CreateBatch::TooManyInputs { used: stored, limit });
        }
        let mut record = batch;
        record.total = inputs.len() as u64;
        let running = record.status == cloudpipe_types::BatchStatus::Running;
        tx.exec(
            "INSERT INTO cp_batches (id, account, running, record, inputs, stopped_at, open)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &record.id,
                &record.account,
                &running,
                &encode(&record)?,
                &(record.total as i64),
                &stopped(&record),
                &record.is_open(),
            ],
        )
        .await?;
        let mut chunks: Vec<i64> = Vec::new();
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for (n, chunk) in inputs.chunks(BATCH_CHUNK).enumerate() {
            chunks.push(n as i64);
            bodies.push(encode(&chunk)?);
        }
        tx.exec(
            "INSERT INTO cp_batch_inputs (batch, chunk, inputs)
             SELECT $1, c, i FROM unnest($2::int8[], $3::bytea[]) AS u(c, i)",
            &[&record.id, &chunks, &bodies],
        )
        .await?;
        tx.commit().await?;
        Ok(CreateBatch::Created)
    }

    pub(super) async fn put_batch_row(&self, batch: BatchState) -> Result<bool> {
        let client = self.client().await?;
        let running = batch.status == cloudpipe_types::BatchStatus::Running;
        // The stored total and account stay: the record is written with them.
        let n = client
            .exec(
                "UPDATE cp_batches SET running = $2, stopped_at = $3, open = $4,
                   record = convert_to((convert_from($5::bytea, 'UTF8')::jsonb
                     || jsonb_build_object('total', inputs, 'account', account))::text, 'UTF8')
                 WHERE id = $1",
                &[&batch.id, &running, &stopped(&batch), &batch.is_open(), &encode(&batch)?],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn get_batch_row(&self, id: &str) -> Result<Option<BatchState>> {
        let client = self.client().await?;
        let row = client.q_opt("SELECT record FROM cp_batches WHERE id = $1", &[&id]).await?;
        row.as_ref().map(decode).transpose()
    }

    pub(super) async fn batch_input_rows(
        &self,
        id: &str,
        start: u64,
        count: usize,
    ) -> Result<Vec<Vec<String>>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let chunk = BATCH_CHUNK as u64;
        let (first, last) = (start / chunk, (start + count as u64 - 1) / chunk);
        let client = self.client().await?;
        let rows = client
            .q(
                "SELECT inputs FROM cp_batch_inputs WHERE batch = $1 AND chunk BETWEEN $2 AND $3
                 ORDER BY chunk",
                &[&id, &(first as i64), &(last as i64)],
            )
            .await?;
        let mut out = Vec::with_capacity(count.min(BATCH_CHUNK));
        let mut skip = (start % chunk) as usize;
        for row in rows {
            let inputs: Vec<Vec<String>> =
                serde_json::from_slice(row.get(0)).context("stored batch inputs")?;
            out.extend(inputs.into_iter().skip(skip).take(count - out.len()));
            skip = 0;
        }
        Ok(out)
    }

    pub(super) async fn list_batch_rows(&self, filter: &BatchFilter) -> Result<Vec<BatchState>> {
        let client = self.client().await?;
        // Ids are UUIDv7 text: their order is creation order.
        let rows = client
            .q(
                "SELECT record FROM cp_batches
                 WHERE ($1::text IS NULL OR account = $1) AND ($2::text IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3",
                &[&filter.account, &filter.before, &(filter.limit as i64)],
            )
            .await?;
        rows.iter().map(decode).collect()
    }

    pub(super) async fn open_batch_rows(&self) -> Result<Vec<BatchState>> {
        let client = self.client().await?;
        let rows = client.q("SELECT record FROM cp_batches WHERE open ORDER BY id", &[]).await?;
        rows.iter().map(decode).collect()
    }

    pub(super) async fn delete_batch_row(&self, id: &str) -> Result<Option<BatchState>> {
        let client = self.client().await?;
        // Its inputs go with it (ON DELETE CASCADE).
        let row =
            client.q_opt("DELETE FROM cp_batches WHERE id = $1 RETURNING record", &[&id]).await?;
        row.as_ref().map(decode).transpose()
    }

    pub(super) async fn purge_batch_rows(
        &self,
        max_age_micros: u64,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize> {
        if max_batch == 0 {
            return Ok(0);
        }
        let cutoff = now.saturating_sub(max_age_micros).min(i64::MAX as u64) as i64;
        let client = self.client().await?;
        let n = client
            .exec(
                "DELETE FROM cp_batches WHERE id IN (
                   SELECT id FROM cp_batches WHERE stopped_at < $1
                   ORDER BY stopped_at, id LIMIT $2)",
                &[&cutoff, &(max_batch as i64)],
            )
            .await?;
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::NoTls;

    use super::super::{PgConfig, PgStore, testdb};
    use crate::cluster::NodeConfig;
    use crate::store::{BATCH_CHUNK, BatchCaps, BatchFilter, CreateBatch, Store};

    /// A schema-5 database (batch records with their inputs inline) is brought to
    /// schema 6 at open: inputs in chunks, counts, open and stopped batches known.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn schema_6_batch_inputs_move_out_of_the_records() {
        let db = testdb::shared();
        let config = || PgConfig {
            url: db.url(),
            schema: Some("mig_batches".into()),
            node: NodeConfig::new("mig"),
        };
        drop(PgStore::open(config()).await.unwrap());
        let n = BATCH_CHUNK + 2;
        let inputs: Vec<Vec<String>> =
            (0..n).map(|i| vec![format!("w{i}"), "\"q\"".into()]).collect();
        let batch = |id: &str, status: &str, finished_at: Option<u64>, hook: Option<&str>| {
            serde_json::json!({
                "id": id, "account": "alice", "admin": false, "limits": {},
                "allow_network": false, "template": {"function": "f"},
                "inputs": inputs, "split": 2, "retries": 0, "strikes": 0, "hook": hook,
                "status": status, "round": 0, "created_at": 5, "finished_at": finished_at,
                "final_counts": null, "final_job_micros": 0, "hook_called": false
            })
        };
        let running = crate::model::JobId::new().to_string();
        let hooked = crate::model::JobId::new().to_string();
        let done = crate::model::JobId::new().to_string();

        // Back to schema 5, as its code wrote the rows.
        let (client, conn) = tokio_postgres::connect(&db.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute("SET search_path = mig_batches").await.unwrap();
        client
            .batch_execute(
                "DROP TABLE cp_batch_inputs;
                 ALTER TABLE cp_batches DROP COLUMN inputs, DROP COLUMN stopped_at, DROP COLUMN open;
                 DELETE FROM cp_migrations WHERE version = 6",
            )
            .await
            .unwrap();
        for (id, record, running) in [
            (&running, batch(&running, "running", None, None), true),
            (&hooked, batch(&hooked, "finished", Some(90), Some("http://h/")), false),
            (&done, batch(&done, "cancelled", Some(80), Some("http://h/")), false),
        ] {
            client
                .execute(
                    "INSERT INTO cp_batches (id, account, running, record) VALUES ($1, 'alice', $2, $3)",
                    &[id, &running, &serde_json::to_vec(&record).unwrap()],
                )
                .await
                .unwrap();
        }

        let store = PgStore::open(config()).await.unwrap();
        let b = store.get_batch(&running).await.unwrap().unwrap();
        assert_eq!((b.total, b.account.as_str()), (n as u64, "alice"));
        assert_eq!(store.batch_inputs(&running, 0, n).await.unwrap(), inputs);
        assert_eq!(
            store.batch_inputs(&done, BATCH_CHUNK as u64, 5).await.unwrap(),
            &inputs[BATCH_CHUNK..]
        );
        let mut open: Vec<String> =
            store.open_batches().await.unwrap().into_iter().map(|b| b.id).collect();
        open.sort();
        let mut expected = vec![running.clone(), hooked.clone()];
        expected.sort();
        assert_eq!(open, expected, "the running batch and the one whose hook is due");
        let alice = BatchFilter { account: Some("alice".into()), before: None, limit: 10 };
        assert_eq!(store.list_batches(&alice).await.unwrap().len(), 3);
        let caps = BatchCaps { max_batches: None, max_inputs: Some(3 * n as u64) };
        let mut another = b.clone();
        another.id = crate::model::JobId::new().to_string();
        let refused = store.create_batch(another, vec![vec![]], caps).await.unwrap();
        assert_eq!(refused, CreateBatch::TooManyInputs { used: 3 * n as u64, limit: 3 * n as u64 });
        // Stopped at 80 and 90: both past an age of 5 at 100; the running one stays.
        assert_eq!(store.purge_batches(5, 100, 10).await.unwrap(), 2);
        assert_eq!(store.list_batches(&alice).await.unwrap().len(), 1);
        let record: Vec<u8> = client
            .query_one("SELECT record FROM cp_batches WHERE id = $1", &[&running])
            .await
            .unwrap()
            .get(0);
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert!(record.get("inputs").is_none(), "the record holds no inputs: {record}");
    }
}
