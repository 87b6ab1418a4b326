//! The OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`, vendored).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{bridgex, dlr, guard, openlyne, ops, v1};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "otpd",
        description = "Self-hosted one-time-password service: send a code to a phone, check what the user typed."
    ),
    paths(
        v1::send_verification,
        v1::check_verification,
        v1::get_verification,
        v1::cancel_verification,
        v1::get_message,
        v1::get_usage,
        dlr::delivery_report,
        v1::list_sandbox_messages,
        guard::get_guard,
        guard::lift_quarantine,
        ops::health,
        ops::live,
        ops::ready,
        ops::metrics,
        bridgex::send_otp,
        bridgex::verify_otp,
        bridgex::config,
        openlyne::send_otp,
        openlyne::verify_otp,
    ),
    modifiers(&Security),
    tags(
        (name = "verifications", description = "Native API: the OTP lifecycle"),
        (name = "messages", description = "Native API: delivery attempts"),
        (name = "usage", description = "Native API: usage and cost per tenant"),
        (name = "delivery reports", description = "Callbacks providers post delivery reports to (no API key: a secret in the path)"),
        (name = "sandbox", description = "Native API: the sandbox inbox"),
        (name = "guard", description = "Native API: the SMS-pumping guard's quarantines"),
        (name = "operations", description = "Health and metrics"),
        (name = "bridgex", description = "Seed-compatible: the BridgeXAPI FastAPI OTP server's API (errors as FastAPI `{\"detail\": ...}`; `GET /health` is shared)"),
        (name = "openlyne", description = "Seed-compatible: Openlyne's OTP webhooks (every answer in the `{success, data, message, error}` envelope)"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
