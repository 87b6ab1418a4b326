//! `[[routes]]` and `[routing]`: parsing, validation messages that name the
//! key, secrets from the environment, and building live routes.

use std::sync::Arc;

use figment::Figment;
use figment::providers::{Format, Toml};
use otpd::sms::config::{apply_secret_env, validate_chain, validate_routes};
use otpd::sms::{ConsoleProvider, RouteSettings, RoutingSettings, build_routes, http_client};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default)]
    routes: Vec<RouteSettings>,
    #[serde(default)]
    routing: RoutingSettings,
}

const FULL: &str = r#"
[[routes]]
id = 1
provider = "bridgexapi"
api_key = "bx-key"
provider_route_id = 3
caller_id = "BRIDGEXAPI"
countries = ["NL", "be"]
price = { NL = 0.05, "*" = 0.08 }
currency = "EUR"
templates = { nl = "Je verificatiecode is {code}." }
timeout_ms = 3000

[[routes]]
id = 2
provider = "africastalking"
username = "sandbox"
api_key = "at-key"
sender_id = "OTPD"
countries = ["UG", "KE"]

[[routes]]
id = 3
provider = "twilio"
account_sid = "AC00000000000000000000000000000001"
auth_token = "tw-token"
from = "+15005550006"

[[routes]]
id = 4
provider = "webhook"
url = "https://gateway.internal.example/sms"
secret = "a-long-webhook-signing-secret"
connect_timeout_ms = 500

[[routes]]
id = 5
provider = "console"

[routing]
failover_on_timeout = false
breaker = { failure_threshold = 2, cool_off_seconds = 60 }
countries.UG.routes = [2, 3]
"#;

fn parse(toml: &str) -> Result<Config, String> {
    Figment::from(Toml::string(toml))
        .extract::<Config>()
        .map_err(|e| e.to_string())
}

fn check(toml: &str) -> Result<(), String> {
    let config = parse(toml)?;
    validate_routes(&config.routes, &config.routing)
}

/// One BridgeXAPI route with `extra` lines appended.
fn bridgex(extra: &str) -> String {
    format!(
        "[[routes]]\nid = 1\nprovider = \"bridgexapi\"\napi_key = \"k\"\nprovider_route_id = 3\ncaller_id = \"BRIDGEXAPI\"\n{extra}"
    )
}

#[test]
fn the_documented_example_parses_validates_and_builds() {
    let config = parse(FULL).unwrap();
    validate_routes(&config.routes, &config.routing).unwrap();
    assert!(!config.routing.failover_on_timeout);
    assert_eq!(config.routing.breaker.failure_threshold, 2);
    assert_eq!(config.routing.countries["UG"].routes, vec![2, 3]);

    let client = http_client(config.routing.connect_timeout(), config.routing.timeout()).unwrap();
    let routes = build_routes(
        &config.routes,
        &config.routing,
        &client,
        Arc::new(ConsoleProvider),
    )
    .unwrap();
    let names: Vec<_> = routes.iter().map(|r| (r.id, r.provider.name())).collect();
    assert_eq!(
        names,
        vec![
            (1, "bridgexapi"),
            (2, "africastalking"),
            (3, "twilio"),
            (4, "webhook"),
            (5, "console")
        ]
    );
    let bx = &routes[0];
    assert_eq!(bx.countries, vec!["NL", "BE"]);
    assert_eq!(bx.timeout.as_millis(), 3000);
    assert_eq!(bx.price_for(Some("NL")), Some((0.05, "EUR".to_owned())));
    assert_eq!(bx.price_for(Some("BE")), Some((0.08, "EUR".to_owned())));
    assert_eq!(routes[1].timeout.as_millis(), 5000);
    assert_eq!(routes[1].price_for(Some("UG")), None);
    let code = otpd::domain::Code::parse("1234").unwrap();
    assert_eq!(bx.render(&code, Some("nl")), "Je verificatiecode is 1234.");
}

#[test]
fn defaults_apply_when_routing_is_absent() {
    let config = parse(&bridgex("")).unwrap();
    assert!(config.routing.failover_on_timeout);
    assert_eq!(config.routing.breaker.failure_threshold, 5);
    assert_eq!(config.routing.breaker.cool_off_seconds, 30);
    assert_eq!(config.routing.timeout_ms, 5000);
    assert_eq!(
        config.routes[0].template,
        "Your verification code is {code}."
    );
}

#[test]
fn unknown_and_misplaced_keys_are_rejected() {
    let err = parse(&bridgex("api_kye = \"typo\"")).unwrap_err();
    assert!(err.contains("api_kye"), "{err}");
    // `username` belongs to Africa's Talking, not BridgeXAPI.
    let err = parse(&bridgex("username = \"x\"")).unwrap_err();
    assert!(err.contains("username"), "{err}");
    let err = parse("[[routes]]\nid = 1\nprovider = \"carrier-pigeon\"").unwrap_err();
    assert!(err.contains("carrier-pigeon"), "{err}");
    let err = parse("[[routes]]\nid = 1").unwrap_err();
    assert!(err.contains("provider"), "{err}");
    let err = parse("[routing]\nfailover_on_timeut = true").unwrap_err();
    assert!(err.contains("failover_on_timeut"), "{err}");
}

#[test]
fn validation_errors_name_the_key() {
    let long = format!("template = \"{} {{code}}\"", "x".repeat(150));
    let cases = [
        (
            format!("{}\n{}", bridgex(""), bridgex(&long).replace("id = 1", "id = 2")),
            "routes[1].template: renders to 161 characters; BridgeXAPI allows 158",
        ),
        (
            bridgex("").replace("\"BRIDGEXAPI\"", "\"BX\""),
            "routes[0].caller_id: must be 3 to 11 ASCII characters",
        ),
        (
            bridgex("template = \"Votre code : {code} — merci\""),
            "routes[0].template: BridgeXAPI accepts ASCII characters only",
        ),
        (
            bridgex("templates = { fr = \"Votre code est {code} é\" }"),
            "routes[0].templates.fr: BridgeXAPI accepts ASCII characters only",
        ),
        (
            bridgex("template = \"no placeholder\""),
            "routes[0].template: must contain {code}",
        ),
        (
            format!("{}\n{}", bridgex(""), bridgex("")),
            "routes[1].id: 1 is already used by routes[0]",
        ),
        (
            bridgex("").replace("id = 1", "id = 0"),
            "routes[0].id: 0 is reserved",
        ),
        (
            bridgex("").replace("provider_route_id = 3", "provider_route_id = 6"),
            "routes[0].provider_route_id",
        ),
        (
            bridgex("").replace("api_key = \"k\"\n", ""),
            "routes[0].api_key: required (or set OTPD_ROUTE_1_API_KEY)",
        ),
        (
            bridgex("price = { NL = 0.05 }"),
            "routes[0].currency: required when price is set",
        ),
        (
            bridgex("countries = [\"Netherlands\"]"),
            "routes[0].countries",
        ),
        (
            bridgex("timeout_ms = 1000\nconnect_timeout_ms = 2000"),
            "routes[0].connect_timeout_ms",
        ),
        (
            format!("{}\n[routing.countries.UG]\nroutes = [1, 7]", bridgex("")),
            "routing.countries.UG.routes: route 7 is not configured",
        ),
        (
            format!(
                "{}\n[routing.countries.UG]\nroutes = [1]",
                bridgex("countries = [\"NL\"]")
            ),
            "routing.countries.UG.routes: route 1 does not serve UG",
        ),
        (
            "[[routes]]\nid = 3\nprovider = \"twilio\"\naccount_sid = \"AC00000000000000000000000000000001\"\nauth_token = \"t\"".to_owned(),
            "routes[0].from: set exactly one of `from` and `messaging_service_sid`",
        ),
        (
            "[[routes]]\nid = 4\nprovider = \"webhook\"\nurl = \"ftp://x\"\nsecret = \"a-long-webhook-signing-secret\"".to_owned(),
            "routes[0].url: must be an http or https URL",
        ),
        (
            "[routing.breaker]\nfailure_threshold = 0".to_owned(),
            "routing.breaker.failure_threshold",
        ),
    ];
    for (toml, expected) in cases {
        let err = check(&toml).unwrap_err();
        assert!(
            err.starts_with(expected),
            "expected {expected:?}, got {err:?}"
        );
    }
}

#[test]
fn failover_chains_must_name_configured_routes_once() {
    let config = parse(FULL).unwrap();
    validate_chain("policy.routes", &[1, 3], &config.routes).unwrap();
    assert_eq!(
        validate_chain("policy.routes", &[1, 9], &config.routes),
        Err("policy.routes: route 9 is not configured in [[routes]]".to_owned())
    );
    assert_eq!(
        validate_chain("tenants.acme.policy.routes", &[3, 3], &config.routes),
        Err("tenants.acme.policy.routes: route 3 is listed twice".to_owned())
    );
}

#[test]
fn secrets_can_come_from_the_environment() {
    let toml = bridgex("").replace("api_key = \"k\"\n", "");
    let mut config = parse(&toml).unwrap();
    apply_secret_env(&mut config.routes, |name| {
        (name == "OTPD_ROUTE_1_API_KEY").then(|| "from-env".to_owned())
    });
    validate_routes(&config.routes, &config.routing).unwrap();
    // Debug output never shows a secret.
    let debug = format!("{:?}", config.routes);
    assert!(!debug.contains("from-env"), "{debug}");
}

#[test]
fn the_example_config_file_loads_and_its_commented_routes_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("otpd.example.toml");
    let settings = otpd::config::Settings::load(Some(&example), &Default::default()).unwrap();
    assert!(settings.routes.is_empty());
    assert_eq!(settings.routing, RoutingSettings::default());

    // The commented [[routes]] examples, uncommented, form a valid config.
    let text = std::fs::read_to_string(&example).unwrap();
    let start = text.find("# [[routes]]").unwrap();
    let routes: String = text[start..]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    // The SID placeholder is the only thing to fill in.
    let routes = routes.replace("\"AC...\"", "\"AC00000000000000000000000000000001\"");
    let config = parse(&routes).unwrap();
    assert_eq!(config.routes.len(), 5);
    validate_routes(&config.routes, &config.routing).unwrap();
}

#[test]
fn the_readme_routing_example_is_a_valid_configuration() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## SMS routing").unwrap()..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("otpd.toml");
    std::fs::write(&path, block).unwrap();
    let settings = otpd::config::Settings::load(Some(&path), &otpd::config::Overrides::default())
        .unwrap_or_else(|e| panic!("README routing example: {e}"));
    assert_eq!(settings.routes.len(), 3);
}
