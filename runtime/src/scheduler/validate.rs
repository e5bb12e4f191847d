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
