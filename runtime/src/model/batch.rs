//! Batches as the store keeps them. The template is a [`JobTemplate`], the store's own
//! copy of the wire [`JobSpec`], so that a change to the API's JSON is not a change to
//! stored records; the two meet only in the conversions below.

use std::collections::BTreeMap;

use cloudpipe_types::{BatchCounts, BatchStatus, EnvValue, JobSpec};
use serde::{Deserialize, Serialize};

use super::clock::Micros;

/// A batch as stored: its spec and its status. Its inputs are stored apart, in
/// chunks (`Store::batch_inputs`), so that reading the record reads none of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchState {
    pub id: String,
    pub account: String,
    /// The submitter's limits and network policy, kept for the jobs launched later.
    pub admin: bool,
    pub limits: StoredLimits,
    pub allow_network: bool,
    pub template: JobTemplate,
    /// Number of inputs.
    #[serde(default)]
    pub total: u64,
    pub split: u32,
    pub retries: u32,
    pub strikes: u32,
    pub hook: Option<String>,
    pub status: BatchStatus,
    /// Retry rounds started by `retry`; an input gets `retries + 1` tries per round.
    pub round: u32,
    pub created_at: Micros,
    pub finished_at: Option<Micros>,
    /// Counts and summed job time when it stopped running.
    pub final_counts: Option<BatchCounts>,
    pub final_job_micros: u64,
    pub hook_called: bool,
}

impl BatchState {
    /// Whether a start-up has something to do with the batch: drive it, or call its
    /// report hook.
    pub fn is_open(&self) -> bool {
        self.status == BatchStatus::Running
            || (self.hook.is_some() && !self.hook_called && self.status != BatchStatus::Cancelled)
    }

    /// When the batch stopped (`None`: it runs); retention counts its age from this.
    pub fn stopped_at(&self) -> Option<Micros> {
        match self.status {
            BatchStatus::Running => None,
            _ => Some(self.finished_at.unwrap_or(self.created_at)),
        }
    }
}

/// [`Limits`](crate::account::Limits) as stored.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StoredLimits {
    pub max_concurrent_jobs: Option<u64>,
    pub max_timeout_ms: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_function_bytes: Option<u64>,
}

/// The job template of a batch as stored. Its fields and their serde names are those
/// that [`JobSpec`] had when batches were first stored: records written then read
/// back unchanged. A new wire field becomes a field here only on purpose (the
/// conversions name every field).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    #[serde(default)]
    pub function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_source: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// `From` both ways between two structs with the same fields, named once. The
/// destructuring names every field: a field added to either side is a compile error
/// here until it is placed on purpose.
macro_rules! convert_both_ways {
    ($a:ident, $b:ident, [$($field:ident),* $(,)?]) => {
        impl From<$a> for $b {
            fn from(v: $a) -> $b {
                let $a { $($field),* } = v;
                $b { $($field),* }
            }
        }
        impl From<$b> for $a {
            fn from(v: $b) -> $a {
                let $b { $($field),* } = v;
                $a { $($field),* }
            }
        }
    };
}

convert_both_ways!(
    JobSpec,
    JobTemplate,
    [
        function,
        executor,
        image,
        command,
        cpus,
        result_source,
        args,
        env,
        stdin,
        stdin_base64,
        timeout_ms,
        memory_mb,
        tags,
        idempotency_key,
        max_attempts,
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec with every field set, so that a field the conversions or the stored form
    /// lose shows up.
    fn full_spec() -> JobSpec {
        JobSpec {
            function: "f".into(),
            executor: Some("docker".into()),
            image: Some("alpine".into()),
            command: vec!["sh".into(), "-c".into()],
            cpus: Some(0.5),
            result_source: Some("file:/out".into()),
            args: vec!["a".into()],
            env: BTreeMap::from([
                ("K".into(), EnvValue::Text("v".into())),
                (
                    "S".into(),
                    EnvValue::Secret(cloudpipe_types::SecretRef { secret: "token".into() }),
                ),
            ]),
            stdin: Some("in".into()),
            stdin_base64: None,
            timeout_ms: Some(1000),
            memory_mb: Some(64),
            tags: vec!["t".into()],
            idempotency_key: Some("k".into()),
            max_attempts: Some(2),
        }
    }

    #[test]
    fn template_is_stored_as_the_wire_spec_was() {
        for spec in [full_spec(), JobSpec { function: "f".into(), ..JobSpec::default() }] {
            let wire = serde_json::to_string(&spec).unwrap();
            let stored = serde_json::to_string(&JobTemplate::from(spec.clone())).unwrap();
            assert_eq!(stored, wire);
            let back: JobTemplate = serde_json::from_str(&wire).unwrap();
            assert_eq!(JobSpec::from(back), spec);
        }
    }

    #[test]
    fn batch_written_before_the_template_had_its_own_type_reads() {
        let stored = r#"{"id":"b1","account":"admin","admin":true,
            "limits":{"max_concurrent_jobs":null,"max_timeout_ms":5000,"max_memory_mb":null,"max_function_bytes":null},
            "allow_network":false,"template":{"function":"hello","args":["x"],"timeout_ms":1000},
            "total":2,"split":8,"retries":1,"strikes":0,"hook":null,"status":"running",
            "round":0,"created_at":1,"finished_at":null,"final_counts":null,"final_job_micros":0,
            "hook_called":false}"#;
        let state: BatchState = serde_json::from_str(stored).unwrap();
        assert_eq!(state.template.function, "hello");
        assert_eq!(state.template.args, ["x"]);
        assert_eq!(state.template.timeout_ms, Some(1000));
        assert_eq!(state.limits.max_timeout_ms, Some(5000));
        assert_eq!(state.total, 2);
    }

    #[test]
    fn unknown_template_field_is_refused_as_the_wire_spec_refuses_it() {
        let err = serde_json::from_str::<JobTemplate>(r#"{"function":"f","bogus":1}"#);
        assert!(err.is_err());
    }
}
