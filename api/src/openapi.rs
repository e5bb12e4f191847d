//! The OpenAPI document, derived from the wire types and the handlers' annotations.
//! `api/openapi.json` in the repo is this document; a test keeps the two equal
//! (`CLOUDPIPE_WRITE_OPENAPI=1 cargo test -p cloudpipe-api openapi` rewrites the file).

use utoipa::OpenApi;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use crate::routes::{accounts, batches, functions, invoke, jobs, secrets, system, v1compat};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cloudpipe",
        description = "Compute on demand: Wasm functions run as durable jobs. Every route but /healthz, /v1/openapi.json and public functions under /fn/ needs an API key: `Authorization: Bearer KEY`, or HTTP Basic with the account name and key."
    ),
    modifiers(&Security),
    security(("bearer" = []), ("basic" = [])),
    paths(
        accounts::create_account,
        accounts::list_accounts,
        accounts::get_account,
        accounts::update_account,
        accounts::create_key,
        accounts::list_keys,
        accounts::revoke_key,
        accounts::get_me,
        batches::create_batch,
        batches::list_batches,
        batches::get_batch,
        batches::resume_batch,
        batches::retry_batch,
        batches::cancel_batch,
        functions::create_function,
        functions::list_functions,
        functions::get_function,
        functions::delete_function,
        functions::update_function,
        invoke::get_function_logs,
        jobs::create_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::get_job_result,
        jobs::get_job_stdout,
        jobs::get_job_stderr,
        jobs::cancel_job,
        jobs::job_events,
        secrets::put_secret,
        secrets::list_secrets,
        secrets::delete_secret,
        system::get_health,
        system::get_metrics,
        system::get_openapi,
        v1compat::submit_v1_jobs,
        v1compat::list_v1_jobs,
        v1compat::kill_v1_jobs,
        v1compat::kill_all_v1_jobs,
        v1compat::get_v1_queue_stats,
    ),
    components(schemas(
        cloudpipe_types::FunctionInfo,
        cloudpipe_types::FunctionKind,
        cloudpipe_types::FunctionList,
        cloudpipe_types::JobSpec,
        cloudpipe_types::JobRecord,
        cloudpipe_types::JobStatus,
        cloudpipe_types::JobError,
        cloudpipe_types::JobList,
        cloudpipe_types::JobEvent,
        cloudpipe_types::ErrorBody,
        cloudpipe_types::ErrorDetail,
        cloudpipe_types::Health,
        cloudpipe_types::LogLine,
        cloudpipe_types::LogList,
        cloudpipe_types::Account,
        cloudpipe_types::AccountCreate,
        cloudpipe_types::AccountPatch,
        cloudpipe_types::AccountList,
        cloudpipe_types::ApiKeyCreate,
        cloudpipe_types::ApiKeyInfo,
        cloudpipe_types::NewApiKey,
        cloudpipe_types::ApiKeyList,
        cloudpipe_types::Me,
        cloudpipe_types::Quotas,
        cloudpipe_types::Role,
        cloudpipe_types::BatchSpec,
        cloudpipe_types::BatchStatus,
        cloudpipe_types::BatchCounts,
        cloudpipe_types::BatchRecord,
        cloudpipe_types::BatchList,
        cloudpipe_types::EnvValue,
        cloudpipe_types::SecretRef,
        cloudpipe_types::SecretPut,
        cloudpipe_types::SecretInfo,
        cloudpipe_types::SecretList,
        v1compat::V1SubmitRequest,
        v1compat::V1JobSpec,
        v1compat::V1Tags,
        v1compat::V1Submitted,
        v1compat::V1Job,
        v1compat::V1JobList,
        v1compat::V1Ok,
        v1compat::V1QueueStats,
        v1compat::V1ErrorBody,
        v1compat::V1ErrorDetail,
    ))
)]
pub struct ApiDoc;

/// The two ways to present an API key.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components
            .add_security_scheme("basic", SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)));
    }
}

/// The document as pretty JSON, with a trailing newline (as kept in the repo).
pub fn document_json() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_file_in_repo_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let doc = super::document_json();
        if std::env::var_os("CLOUDPIPE_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &doc).unwrap();
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == doc,
            "api/openapi.json is stale: run CLOUDPIPE_WRITE_OPENAPI=1 cargo test -p cloudpipe-api openapi"
        );
    }
}
