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
    modifiers(&Security, &CommonAnswers, &EventStreams),
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
        batches::delete_batch,
        functions::create_function,
        functions::list_functions,
        functions::get_function,
        functions::delete_function,
        functions::update_function,
        invoke::logs::get_function_logs,
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
        system::list_executors,
        system::get_openapi,
        system::list_nodes,
        v1compat::submit_v1_jobs,
        v1compat::list_v1_jobs,
        v1compat::kill_v1_jobs,
        v1compat::kill_all_v1_jobs,
        v1compat::get_v1_queue_stats,
    ),
    components(schemas(
        cloudpipe_types::NodeInfo,
        cloudpipe_types::NodeList,
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
        cloudpipe_types::ExecutorStatus,
        cloudpipe_types::ExecutorList,
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

/// The answers every operation may give without its handler saying so: 401, 403 (a
/// disabled account; an operation for the admin only) and 429 (too many failed
/// authentications, quotas) on every authenticated route, from the auth middleware;
/// 400 on every operation with parameters or a body (a malformed path segment or
/// query, unknown JSON fields, an empty `?wait=`). Each with the error schema, unless
/// the handler documents the status itself.
struct CommonAnswers;

impl utoipa::Modify for CommonAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let answer = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let public = crate::auth::PUBLIC_PATHS.contains(&path.as_str());
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut op.responses.responses;
                let takes_input = op.parameters.as_ref().is_some_and(|p| !p.is_empty())
                    || op.request_body.is_some();
                if takes_input {
                    responses.entry("400".into()).or_insert_with(|| {
                        answer("Bad input: a malformed path segment, query or body (unknown JSON fields included)")
                    });
                }
                if public {
                    continue;
                }
                for (status, description) in [
                    ("401", "No API key, or one that is not valid"),
                    ("403", "The key's account is disabled, or the operation is the admin's"),
                    ("429", "Too many failed authentications from this client, or over a quota"),
                ] {
                    match responses.get_mut(status) {
                        None => {
                            responses.insert(status.into(), answer(description));
                        }
                        // The handler's own answer for this status has another shape (v1's
                        // errors): the auth middleware, which runs first, still answers
                        // with the error schema.
                        Some(RefOr::T(documented)) => also_error_body(documented),
                        Some(RefOr::Ref(_)) => {}
                    }
                }
            }
        }
    }
}

/// Server-sent events as OpenAPI 3.1 reads a `text/event-stream` schema: each event an
/// object with its `event` name and its `data`, a string holding JSON of the schema the
/// handler names (`body = JobEvent` describes what is inside `data`).
struct EventStreams;

impl utoipa::Modify for EventStreams {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
        use utoipa::openapi::{RefOr, extensions::Extensions};
        for item in openapi.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.post].into_iter().flatten();
            for response in ops.flat_map(|op| op.responses.responses.values_mut()) {
                let RefOr::T(response) = response else { continue };
                let Some(content) = response.content.get_mut("text/event-stream") else {
                    continue;
                };
                let Some(RefOr::Ref(inside)) = content.schema.take() else { continue };
                let mut json = Extensions::default();
                json.insert("contentSchema".into(), serde_json::to_value(&inside).unwrap());
                let mut data = ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("The event as JSON"))
                    .build();
                data.content_media_type = "application/json".into();
                data.extensions = Some(json);
                let event = ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some("One server-sent event"))
                    .property("event", ObjectBuilder::new().schema_type(Type::String))
                    .property("data", data)
                    .required("event")
                    .required("data")
                    .build();
                content.schema = Some(RefOr::T(Schema::Object(event)));
            }
        }
    }
}

/// Widens a documented answer's JSON schema to "that, or the error schema" unless it is
/// the error schema already.
fn also_error_body(response: &mut utoipa::openapi::Response) {
    use utoipa::openapi::schema::{AnyOfBuilder, Schema};
    use utoipa::openapi::{Ref, RefOr};
    let error_body = Ref::from_schema_name("ErrorBody");
    let Some(content) = response.content.get_mut("application/json") else { return };
    match content.schema.take() {
        Some(RefOr::Ref(r)) if r == error_body => content.schema = Some(RefOr::Ref(r)),
        Some(schema) => {
            content.schema = Some(RefOr::T(Schema::AnyOf(
                AnyOfBuilder::new().item(schema).item(error_body).build(),
            )))
        }
        None => content.schema = Some(RefOr::Ref(error_body)),
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
    fn every_authenticated_operation_documents_the_auth_answers() {
        let doc: serde_json::Value = serde_json::from_str(&super::document_json()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let public = crate::auth::PUBLIC_PATHS.contains(&path.as_str());
                for status in ["401", "403", "429"] {
                    assert_eq!(
                        responses.contains_key(status),
                        !public,
                        "{method} {path}: {status}"
                    );
                    if !public {
                        let schema = &responses[status]["content"]["application/json"]["schema"];
                        let error_body =
                            serde_json::json!({"$ref": "#/components/schemas/ErrorBody"});
                        let any_of = schema["anyOf"].as_array();
                        assert!(
                            *schema == error_body
                                || any_of.is_some_and(|s| s.contains(&error_body)),
                            "{method} {path}: {status} does not allow the error schema: {schema}"
                        );
                    }
                }
                if op.get("parameters").is_some_and(|p| p.as_array().is_some_and(|p| !p.is_empty()))
                    || op.get("requestBody").is_some()
                {
                    assert!(responses.contains_key("400"), "{method} {path}: 400");
                }
                seen += 1;
            }
        }
        assert!(seen > 30, "{seen} operations");
    }

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
