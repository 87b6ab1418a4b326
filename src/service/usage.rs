//! Usage accounting: what each event adds to the daily aggregates, and how a
//! range of them adds up to the `/v1/usage` report.
//!
//! Every number counts on the day its message (or, for verifications, the first
//! message that reached a provider) was created, so a range's report describes
//! what was sent in it, including outcomes that arrived later. Only delivered
//! messages carry cost.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{DeliveryStatus, MessageRecord};
use crate::store::{UsageRow, cost_micros};

fn count_delivery(row: &mut UsageRow, m: &MessageRecord) {
    match m.status {
        DeliveryStatus::Delivered => {
            row.delivered += 1;
            if m.currency.is_some() {
                row.cost_micros += m.cost.map_or(0, cost_micros);
            }
        }
        DeliveryStatus::Failed | DeliveryStatus::Undelivered => row.failed += 1,
        DeliveryStatus::Queued | DeliveryStatus::Sent | DeliveryStatus::Unknown => {}
    }
}

/// What a newly recorded attempt adds: a message a provider took counts as sent
/// (and as delivered, with its cost, when the provider says so at once).
pub(crate) fn for_new_message(m: &MessageRecord) -> Option<UsageRow> {
    if !m.was_accepted() {
        return None;
    }
    let mut row = UsageRow::of_message(m, m.status == DeliveryStatus::Delivered);
    row.sent = 1;
    count_delivery(&mut row, m);
    Some(row)
}

/// What a delivery report that moved `m` to its status adds; `None` for steps
/// that change no count (queued → sent).
pub(crate) fn for_transition(m: &MessageRecord) -> Option<UsageRow> {
    let mut row = UsageRow::of_message(m, m.status == DeliveryStatus::Delivered);
    count_delivery(&mut row, m);
    (!row.is_zero()).then_some(row)
}

/// Counters over a set of usage rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct UsageCounts {
    /// Messages a provider accepted.
    pub sent: u64,
    /// Messages reported delivered to the handset (the billable ones).
    pub delivered: u64,
    /// Accepted messages later reported failed or undelivered.
    pub failed: u64,
    /// Accepted messages with no final report yet.
    pub pending_delivery: u64,
    /// Verifications whose first code reached a provider (re-sends not counted).
    pub verifications_started: u64,
    pub verifications_approved: u64,
    /// `verifications_approved / verifications_started`; null when none started.
    pub conversion_rate: Option<f64>,
    /// Cost of delivered messages by currency (ISO 4217 code → amount).
    #[schema(value_type = Object, example = json!({"EUR": 0.1}))]
    pub cost: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RouteUsage {
    pub route_id: u32,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CountryUsage {
    /// ISO 3166-1 alpha-2; null when the number's country is unknown.
    pub country: Option<String>,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

/// A tenant's usage over a range of days.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UsageReport {
    /// First day (UTC), inclusive.
    #[schema(value_type = String, format = Date)]
    pub from: NaiveDate,
    /// Last day (UTC), inclusive.
    #[schema(value_type = String, format = Date)]
    pub to: NaiveDate,
    pub totals: UsageCounts,
    /// By route id, ascending.
    pub by_route: Vec<RouteUsage>,
    /// By country, ascending (unknown last).
    pub by_country: Vec<CountryUsage>,
}

#[derive(Default)]
struct Sums {
    sent: u64,
    delivered: u64,
    failed: u64,
    started: u64,
    approved: u64,
    cost_micros: BTreeMap<String, i64>,
}

impl Sums {
    fn add(&mut self, row: &UsageRow) {
        self.sent += row.sent;
        self.delivered += row.delivered;
        self.failed += row.failed;
        self.started += row.verifications_started;
        self.approved += row.verifications_approved;
        if let Some(currency) = &row.currency
            && row.cost_micros != 0
        {
            *self.cost_micros.entry(currency.clone()).or_default() += row.cost_micros;
        }
    }

    fn counts(&self) -> UsageCounts {
        UsageCounts {
            sent: self.sent,
            delivered: self.delivered,
            failed: self.failed,
            pending_delivery: self.sent.saturating_sub(self.delivered + self.failed),
            verifications_started: self.started,
            verifications_approved: self.approved,
            conversion_rate: (self.started > 0).then(|| self.approved as f64 / self.started as f64),
            cost: self
                .cost_micros
                .iter()
                .map(|(currency, micros)| (currency.clone(), *micros as f64 / 1_000_000.0))
                .collect(),
        }
    }
}

/// Adds up rows into totals and per-route and per-country breakdowns.
pub fn report(from: NaiveDate, to: NaiveDate, rows: &[UsageRow]) -> UsageReport {
    let mut totals = Sums::default();
    let mut by_route: BTreeMap<u32, Sums> = BTreeMap::new();
    // `None` sorts first in a BTreeMap; unknown countries are listed last.
    let mut by_country: BTreeMap<(bool, String), Sums> = BTreeMap::new();
    for row in rows {
        totals.add(row);
        by_route.entry(row.route_id).or_default().add(row);
        let country = (
            row.country.is_none(),
            row.country.clone().unwrap_or_default(),
        );
        by_country.entry(country).or_default().add(row);
    }
    UsageReport {
        from,
        to,
        totals: totals.counts(),
        by_route: by_route
            .iter()
            .map(|(route_id, sums)| RouteUsage {
                route_id: *route_id,
                counts: sums.counts(),
            })
            .collect(),
        by_country: by_country
            .iter()
            .map(|((unknown, country), sums)| CountryUsage {
                country: (!unknown).then(|| country.clone()),
                counts: sums.counts(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(route_id: u32, country: Option<&str>, currency: Option<&str>) -> UsageRow {
        UsageRow::new(
            "acme",
            NaiveDate::from_ymd_opt(2030, 1, 2).unwrap(),
            route_id,
            country,
            currency,
        )
    }

    #[test]
    fn reports_add_rows_and_keep_currencies_apart() {
        let day = NaiveDate::from_ymd_opt(2030, 1, 2).unwrap();
        let mut a = row(1, Some("NL"), None);
        a.sent = 3;
        a.failed = 1;
        a.verifications_started = 2;
        let mut b = row(1, Some("NL"), Some("EUR"));
        b.delivered = 1;
        b.cost_micros = 50_000;
        let mut c = row(2, None, Some("KES"));
        c.sent = 1;
        c.delivered = 1;
        c.cost_micros = 800_000;
        c.verifications_started = 1;
        c.verifications_approved = 1;
        let r = report(day, day, &[a, b, c]);
        assert_eq!(r.totals.sent, 4);
        assert_eq!(r.totals.delivered, 2);
        assert_eq!(r.totals.failed, 1);
        assert_eq!(r.totals.pending_delivery, 1);
        assert_eq!(r.totals.conversion_rate, Some(1.0 / 3.0));
        assert_eq!(
            r.totals.cost,
            BTreeMap::from([("EUR".to_owned(), 0.05), ("KES".to_owned(), 0.8)])
        );
        assert_eq!(r.by_route.len(), 2);
        assert_eq!(r.by_route[0].route_id, 1);
        assert_eq!(r.by_route[0].counts.conversion_rate, Some(0.0));
        assert_eq!(r.by_country[0].country.as_deref(), Some("NL"));
        assert_eq!(r.by_country[1].country, None, "unknown countries last");
        assert_eq!(report(day, day, &[]).totals.conversion_rate, None);
    }
}
