//! The OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail, FieldProblem};
use crate::routes::{admin, ops, sandboxes};

/// The API description served at `{API_BASE_PATH}/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Sandbox Broker API", description = "Hands pre-created CSP sandbox accounts to lab students; event-sourced on DynamoDB."),
    paths(
        sandboxes::allocate_sandbox, sandboxes::get_sandbox, sandboxes::mark_for_deletion,
        admin::list_sandboxes, admin::get_stats, admin::get_history, admin::retry_deletion,
        admin::run_sync, admin::run_cleanup, admin::run_auto_expire, admin::run_delete_stale,
        admin::bulk_delete,
        ops::service_root, ops::healthz, ops::readyz, ops::metrics,
    ),
    components(schemas(ErrorBody, ErrorDetail, FieldProblem,
        sandboxes::AllocateResponse, sandboxes::SandboxResponse, sandboxes::MarkResponse,
        admin::AdminSandbox, admin::ListResponse, admin::StatsResponse, admin::HistoryResponse)),
    modifiers(&BearerAuth),
    tags(
        (name = "Sandboxes", description = "Track scripts (track token)"),
        (name = "Admin", description = "Operators (admin token)"),
        (name = "Observability", description = "Probes and metrics (no auth)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
