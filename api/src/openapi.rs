//! The OpenAPI document, derived from the wire types and the handlers' annotations.
//! `api/openapi.json` in the repo is this document; a test keeps the two equal
//! (`CLOUDPIPE_WRITE_OPENAPI=1 cargo test -p cloudpipe-api openapi` rewrites the file).

use utoipa::OpenApi;

use crate::routes::{functions, invoke, jobs, system};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cloudpipe",
        description = "Compute on demand: Wasm functions run as durable jobs."
    ),
    paths(
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
        system::get_health,
        system::get_metrics,
        system::get_openapi,
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
    ))
)]
pub struct ApiDoc;

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
