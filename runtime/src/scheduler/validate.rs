//! What makes a job spec a job: [`job_from_spec`] checks a submitted spec against the
//! server's configuration and the account's limits, with the docker and vm parts of a
//! spec checked by [`container_spec`] and [`vm_spec`].

use base64::Engine as _;
use cloudpipe_types::{JobSpec, JobStatus};

use super::quota::resolve_limit;
use super::{SchedulerConfig, SubmitError};
use crate::account::Limits;
use crate::model::{ContainerSpec, Job, JobId, now_micros};
use crate::registry::is_function_id;

/// Checks `spec` against the server's configuration `c` and the account's `limits`:
/// the job it makes, owned by the admin and with its function not yet resolved
/// (the caller does both). `default_executor` runs a spec that names none.
pub(super) fn job_from_spec(
    spec: JobSpec,
    c: &SchedulerConfig,
    default_executor: &str,
    limits: &Limits,
) -> Result<Job, SubmitError> {
    let invalid = |m: String| Err(SubmitError::Invalid(m));
    let executor = spec.executor.clone().unwrap_or_else(|| default_executor.into());
    let container = match executor.as_str() {
        "docker" => Some(container_spec(&spec, &c.docker_images).map_err(SubmitError::Invalid)?),
        "vm" => Some(vm_spec(&spec).map_err(SubmitError::Invalid)?),
        _ => {
            if spec.image.is_some()
                || !spec.command.is_empty()
                || spec.cpus.is_some()
                || spec.result_source.is_some()
            {
                return invalid(format!(
                    "`image`, `command`, `cpus` and `result_source` are for `\"executor\": \"docker\"`, not {executor:?}"
                ));
            }
            None
        }
    };
    let function = match &container {
        Some(c) => c.image.clone(),
        None => spec.function.clone(),
    };
    if container.is_none() && spec.function.is_empty() {
        return invalid("`function` must name a function or give its id (sha256:…)".into());
    }
    if spec.function.starts_with("sha256:") && !is_function_id(&spec.function) {
        return invalid(format!(
            "{:?} is not a function id (sha256: and 64 lowercase hex digits)",
            spec.function
        ));
    }
    let stdin = match (spec.stdin, spec.stdin_base64) {
        (Some(_), Some(_)) => {
            return invalid("give `stdin` or `stdin_base64`, not both".into());
        }
        (Some(s), None) => s.into_bytes(),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.as_bytes()) {
            Ok(v) => v,
            Err(e) => return invalid(format!("`stdin_base64` is not valid base64: {e}")),
        },
        (None, None) => Vec::new(),
    };
    if stdin.len() > c.max_stdin {
        return invalid(format!(
            "stdin is {} bytes, over the limit of {} bytes",
            stdin.len(),
            c.max_stdin
        ));
    }
    let timeout_ms = resolve_limit(
        "timeout_ms",
        spec.timeout_ms,
        c.default_timeout.as_millis() as u64,
        limits.max_timeout_ms,
        c.max_timeout.as_millis() as u64,
    )?;
    let memory_mb = resolve_limit(
        "memory_mb",
        spec.memory_mb,
        c.default_memory_mb,
        limits.max_memory_mb,
        c.max_memory_mb,
    )?;
    let max_attempts = spec.max_attempts.unwrap_or(c.default_max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return invalid("`max_attempts` must be between 1 and 100".into());
    }
    for (k, v) in &spec.env {
        let text_ok = v.as_text().is_none_or(|t| !t.contains('\0'));
        let secret_ok = v.secret_name().is_none_or(crate::secrets::valid_name);
        if k.is_empty() || k.contains('=') || k.contains('\0') || !text_ok || !secret_ok {
            return invalid(format!(
                "environment variable {k:?} is not valid (no '=' or NUL in names, no NUL in values, secret names of A-Z a-z 0-9 _ . -)"
            ));
        }
    }
    if spec.args.iter().any(|a| a.contains('\0')) {
        return invalid("arguments may not contain NUL".into());
    }
    if spec.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
        return invalid("`idempotency_key` must be 1 to 256 bytes".into());
    }
    if spec.tags.len() > 32 || spec.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
        return invalid("at most 32 tags of 1 to 128 bytes each".into());
    }
    Ok(Job {
        id: JobId::new(),
        account: crate::model::ADMIN.to_string(),
        function,
        function_id: String::new(),
        args: spec.args,
        env: spec.env,
        stdin,
        tags: spec.tags,
        idempotency_key: spec.idempotency_key,
        timeout_ms,
        memory_mb,
        max_attempts,
        executor,
        container,
        batch: None,
        node: None,
        status: JobStatus::Queued,
        attempts: 0,
        created_at: now_micros(),
        started_at: None,
        finished_at: None,
        exit_code: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        error: None,
    })
}

/// The container of a `docker` job spec, checked.
fn container_spec(spec: &JobSpec, allowed: &[String]) -> Result<ContainerSpec, String> {
    let image = spec.image.clone().filter(|i| !i.trim().is_empty()).ok_or_else(|| {
        "a docker job needs `image` (an image present on the Docker engine)".to_string()
    })?;
    if image.len() > 512 || image.contains(char::is_whitespace) {
        return Err(format!("{image:?} is not an image reference"));
    }
    if !image_allowed(&image, allowed) {
        return Err(format!(
            "image {image:?} is not one this server runs (allowed: {})",
            allowed.join(", ")
        ));
    }
    if !spec.function.is_empty() {
        return Err("a docker job runs `image` and `command`, not `function`".into());
    }
    if spec.command.len() > 4096 || spec.command.iter().any(|a| a.contains('\0')) {
        return Err("`command`: at most 4096 arguments, without NUL".into());
    }
    let nano_cpus = match spec.cpus {
        None => None,
        Some(c) if c.is_finite() && c > 0.0 && c <= 1024.0 => Some((c * 1e9) as u64),
        Some(c) => return Err(format!("`cpus` {c} must be more than 0 and at most 1024")),
    };
    let result_file = match spec.result_source.as_deref() {
        None | Some("stdout") => None,
        Some(s) => match s.strip_prefix("file:") {
            Some(p) if p.starts_with('/') && !p.contains('\0') && p.len() <= 4096 => {
                Some(p.to_string())
            }
            _ => {
                return Err(format!(
                    "`result_source` {s:?}: use `stdout` or `file:/absolute/path`"
                ));
            }
        },
    };
    Ok(ContainerSpec {
        image,
        command: spec.command.clone(),
        nano_cpus,
        result_file,
        network: false,
    })
}

/// Whether `image` matches one of the operator's patterns (exact, or a prefix ending
/// in `*`); every image when there are none.
fn image_allowed(image: &str, allowed: &[String]) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => image.starts_with(prefix),
            None => image == p,
        })
}

/// The command of a `vm` job spec, checked: it runs as a container without an image
/// (`function` is `vm`).
fn vm_spec(spec: &JobSpec) -> Result<ContainerSpec, String> {
    if !spec.function.is_empty() || spec.image.is_some() {
        return Err("a vm job runs `command` (in busybox), not `function` or `image`".into());
    }
    if spec.cpus.is_some() || spec.result_source.is_some() {
        return Err("`cpus` and `result_source` are for docker jobs, not vm jobs".into());
    }
    if spec.command.is_empty() {
        return Err("a vm job needs `command` (argv, e.g. [\"sh\", \"-c\", \"echo hi\"])".into());
    }
    if spec.command.len() > 4096 || spec.command.iter().any(|a| a.contains('\0')) {
        return Err("`command`: at most 4096 arguments, without NUL".into());
    }
    Ok(ContainerSpec {
        image: "vm".into(),
        command: spec.command.clone(),
        nano_cpus: None,
        result_file: None,
        network: false,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(60),
            default_memory_mb: 128,
            max_memory_mb: 1024,
            max_stdin: 16,
            docker_images: vec!["alpine*".into(), "docker.io/library/busybox".into()],
            ..SchedulerConfig::default()
        }
    }

    fn job(spec: serde_json::Value) -> Result<Job, SubmitError> {
        let spec: JobSpec = serde_json::from_value(spec).unwrap();
        job_from_spec(spec, &config(), "wasm", &Limits::default())
    }

    /// The message of an `Invalid` refusal of `spec`.
    fn invalid(spec: serde_json::Value) -> String {
        match job(spec.clone()) {
            Err(SubmitError::Invalid(m)) => m,
            other => panic!("{spec} gave {other:?}, not Invalid"),
        }
    }

    #[test]
    fn a_plain_spec_takes_the_server_defaults() {
        let job = job(json!({"function": "hello", "args": ["a"]})).unwrap();
        assert_eq!(job.function, "hello");
        assert_eq!(job.executor, "wasm");
        assert_eq!((job.timeout_ms, job.memory_mb, job.max_attempts), (30_000, 128, 3));
        assert_eq!(job.status, JobStatus::Queued);
        assert!(job.container.is_none());
        assert!(job.function_id.is_empty(), "resolved by the caller");
    }

    #[test]
    fn a_job_without_function_or_with_a_bad_id_is_refused() {
        assert!(invalid(json!({})).contains("`function` must name a function"));
        assert!(invalid(json!({"function": "sha256:abc"})).contains("is not a function id"));
        let id = format!("sha256:{}", "a".repeat(64));
        assert_eq!(job(json!({ "function": id })).unwrap().function, id);
    }

    #[test]
    fn container_fields_on_a_wasm_job_are_refused() {
        for extra in [json!({"image": "x"}), json!({"command": ["x"]}), json!({"cpus": 1.0})] {
            let mut spec = json!({"function": "f"});
            spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            assert!(invalid(spec).contains("are for `\"executor\": \"docker\"`"));
        }
    }

    #[test]
    fn stdin_is_text_or_base64_within_the_cap() {
        assert_eq!(job(json!({"function": "f", "stdin": "hi"})).unwrap().stdin, b"hi");
        assert_eq!(job(json!({"function": "f", "stdin_base64": "AP8="})).unwrap().stdin, [0, 255]);
        assert!(
            invalid(json!({"function": "f", "stdin": "a", "stdin_base64": "YQ=="}))
                .contains("not both")
        );
        assert!(
            invalid(json!({"function": "f", "stdin_base64": "!!"})).contains("not valid base64")
        );
        assert_eq!(
            invalid(json!({"function": "f", "stdin": "x".repeat(17)})),
            "stdin is 17 bytes, over the limit of 16 bytes"
        );
    }

    #[test]
    fn limits_past_the_account_are_over_quota_and_past_the_server_invalid() {
        let spec: JobSpec =
            serde_json::from_value(json!({"function": "f", "timeout_ms": 5000})).unwrap();
        let limits = Limits { max_timeout_ms: Some(1000), ..Limits::default() };
        match job_from_spec(spec, &config(), "wasm", &limits) {
            Err(SubmitError::OverQuota(m)) => {
                assert_eq!(m, "`timeout_ms` 5000 is over the account's limit of 1000")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            invalid(json!({"function": "f", "memory_mb": 2048})),
            "`memory_mb` must be between 1 and 1024"
        );
        assert_eq!(
            invalid(json!({"function": "f", "timeout_ms": 0})),
            "`timeout_ms` must be between 1 and 60000"
        );
    }

    #[test]
    fn attempts_env_args_keys_and_tags_are_checked() {
        assert!(invalid(json!({"function": "f", "max_attempts": 0})).contains("max_attempts"));
        assert!(invalid(json!({"function": "f", "env": {"A=B": "x"}})).contains("\"A=B\""));
        assert!(
            invalid(json!({"function": "f", "env": {"S": {"secret": "no/slash"}}}))
                .contains("\"S\"")
        );
        assert!(invalid(json!({"function": "f", "args": ["a\u{0}"]})).contains("NUL"));
        assert!(invalid(json!({"function": "f", "idempotency_key": ""})).contains("1 to 256"));
        let tags: Vec<String> = (0..33).map(|i| i.to_string()).collect();
        assert!(invalid(json!({"function": "f", "tags": tags})).contains("at most 32 tags"));
        let env = json!({"function": "f", "env": {"T": "v", "S": {"secret": "token"}}});
        assert_eq!(job(env).unwrap().env.len(), 2);
    }

    #[test]
    fn a_docker_spec_becomes_a_container_named_by_its_image() {
        let job = job(json!({
            "executor": "docker", "image": "alpine:3", "command": ["sh", "-c", "true"],
            "cpus": 0.5, "result_source": "file:/out/result.json"
        }))
        .unwrap();
        assert_eq!(job.function, "alpine:3");
        let c = job.container.unwrap();
        assert_eq!(c.image, "alpine:3");
        assert_eq!(c.command, ["sh", "-c", "true"]);
        assert_eq!(c.nano_cpus, Some(500_000_000));
        assert_eq!(c.result_file.as_deref(), Some("/out/result.json"));
        assert!(!c.network, "the network is the account's policy, set by the caller");
    }

    #[test]
    fn docker_specs_are_refused_with_the_reason() {
        let docker = |extra: serde_json::Value| {
            let mut spec = json!({"executor": "docker", "image": "alpine"});
            spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            invalid(spec)
        };
        assert!(invalid(json!({"executor": "docker"})).contains("needs `image`"));
        assert!(docker(json!({"image": "al pine"})).contains("is not an image reference"));
        assert!(docker(json!({"image": "ubuntu"})).contains("is not one this server runs"));
        assert!(docker(json!({"function": "f"})).contains("not `function`"));
        assert!(docker(json!({"cpus": 0.0})).contains("more than 0"));
        assert!(docker(json!({"result_source": "file:relative"})).contains("file:/absolute/path"));
    }

    #[test]
    fn images_match_exactly_or_by_a_star_prefix() {
        let allowed = ["alpine*".to_string(), "docker.io/library/busybox".to_string()];
        assert!(image_allowed("alpine:3.20", &allowed));
        assert!(image_allowed("docker.io/library/busybox", &allowed));
        assert!(!image_allowed("docker.io/library/busybox:latest", &allowed));
        assert!(image_allowed("anything", &[]));
    }

    #[test]
    fn a_vm_spec_is_a_command_without_image_or_function() {
        let job = job(json!({"executor": "vm", "command": ["echo", "hi"]})).unwrap();
        assert_eq!(job.function, "vm");
        assert_eq!(job.container.unwrap().command, ["echo", "hi"]);
        assert!(invalid(json!({"executor": "vm"})).contains("needs `command`"));
        assert!(
            invalid(json!({"executor": "vm", "command": ["x"], "image": "i"}))
                .contains("not `function` or `image`")
        );
        assert!(
            invalid(json!({"executor": "vm", "command": ["x"], "cpus": 1.0}))
                .contains("for docker jobs")
        );
    }
}
