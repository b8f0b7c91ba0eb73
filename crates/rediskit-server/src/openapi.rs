//! The OpenAPI 3 document of the service, generated from the handlers' annotations.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(title = "rediskit", description = "Sessions, cache and rate limiting over Redis (HTTP_API.md v1)."),
    paths(
        api::register, api::login, api::refresh, api::logout, api::logout_all, api::sessions,
        api::delete_session, api::me, api::business_metrics,
        crate::health_doc, crate::redis_health_doc, crate::metrics_doc,
    ),
    components(schemas(
        api::RegisterBody, api::LoginBody, api::RefreshBody, api::UserIdBody, api::TokenPair,
        api::MeBody, api::SessionView, api::SessionsBody, api::RevokedBody, api::ProblemDoc,
        api::BusinessMetrics,
    )),
    modifiers(&BearerAuth),
)]
/// The document's definition; `ApiDoc::openapi()` builds it.
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The document as JSON.
pub async fn document() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
