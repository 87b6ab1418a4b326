//! Service-level properties that need many sends.

use std::sync::Arc;

use otpd::clock::ManualClock;
use otpd::config::Settings;
use otpd::startup::{Application, Dependencies};
use otpd::store::MemoryStore;

use crate::helpers::test_settings;

/// χ² per position over 10,000 sent codes: each digit column must look uniform.
/// With 9 degrees of freedom χ² > 40 has probability about 5e-6 for a fair
/// source, so this does not flake; a stuck, skipped or half-range digit gives a
/// χ² in the hundreds. (Modulo bias is too small to see at this sample size; the
/// unit test `every_byte_maps_to_each_digit_equally` proves its absence exactly.)
#[tokio::test]
async fn ten_thousand_sent_codes_have_uniform_digits() {
    let dir = tempfile::tempdir().unwrap();
    let settings: Settings = test_settings(dir.path());
    let deps = Dependencies {
        clock: Arc::new(ManualClock::default()),
        store: Some(Arc::new(MemoryStore::new())),
        ..Dependencies::default()
    };
    let app = Application::build_with(settings, deps).await.unwrap();
    let state = app.state().clone();
    let mut policy = state.policies.default.clone();
    // One number, ten thousand subjects: the abuse limits are not under test.
    policy.max_sends_per_number_10min = 0;
    policy.max_sends_per_number_day = 0;
    policy.guard.enabled = false;
    let to = otpd::domain::PhoneNumber::parse("+31651860670").unwrap();
    let mut counts = [[0u32; 10]; 6];
    const N: u32 = 10_000;
    for i in 0..N {
        let mut cmd = otpd::service::SendCommand::new(to.clone(), otpd::domain::Purpose::default());
        cmd.uid = Some(format!("user-{i}"));
        let out = state.service.send("acme", &policy, cmd).await.unwrap();
        let code = out.debug_code.unwrap();
        for (pos, d) in code.expose().bytes().enumerate() {
            counts[pos][(d - b'0') as usize] += 1;
        }
    }
    let expected = f64::from(N) / 10.0;
    for (pos, column) in counts.iter().enumerate() {
        let chi2: f64 = column
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 40.0,
            "position {pos}: χ² = {chi2:.1}, counts {column:?}"
        );
    }
}
