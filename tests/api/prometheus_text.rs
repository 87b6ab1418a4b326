//! A strict parser for the Prometheus text exposition format 0.0.4, as
//! Prometheus itself reads a scrape: any line it would reject fails the parse.
//!
//! Checked: metric and label name syntax, quoted and escaped label values,
//! float values (`+Inf`, `-Inf`, `NaN`), `# HELP` / `# TYPE` syntax and order,
//! one contiguous group per family, no duplicate series, no duplicate label
//! names, counters not negative, histogram buckets cumulative with a `+Inf`
//! bucket equal to `_count`.

use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub kinds: HashMap<String, Kind>,
    pub help: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the series with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `get`, but panics with the whole series list when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let same: Vec<_> = self.samples.iter().filter(|s| s.name == name).collect();
            panic!("no series {name}{labels:?}; series of that name: {same:#?}")
        })
    }

    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut out = Exposition::default();
    let mut seen_series = HashSet::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current_family: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        let family = if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start_matches(' ');
            let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            match keyword {
                "HELP" => {
                    let (name, doc) = rest.split_once(' ').unwrap_or((rest, ""));
                    check_metric_name(name).map_err(at)?;
                    check_help_escapes(doc).map_err(at)?;
                    if out.help.insert(name.to_owned(), doc.to_owned()).is_some() {
                        return Err(at("second HELP for one metric".into()));
                    }
                    name.to_owned()
                }
                "TYPE" => {
                    let (name, kind) = rest
                        .split_once(' ')
                        .ok_or_else(|| at("TYPE needs a name and a type".into()))?;
                    check_metric_name(name).map_err(at)?;
                    let kind = match kind {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        "summary" => Kind::Summary,
                        "untyped" => Kind::Untyped,
                        other => return Err(at(format!("unknown type {other:?}"))),
                    };
                    if out
                        .samples
                        .iter()
                        .any(|s| family_of(&out.kinds, &s.name) == name)
                    {
                        return Err(at("TYPE after the family's samples".into()));
                    }
                    if out.kinds.insert(name.to_owned(), kind).is_some() {
                        return Err(at("second TYPE for one metric".into()));
                    }
                    name.to_owned()
                }
                // Any other comment line is allowed and means nothing.
                _ => continue,
            }
        } else {
            let sample = parse_sample(line).map_err(at)?;
            let family = family_of(&out.kinds, &sample.name);
            let kind = out.kinds.get(&family).copied().unwrap_or(Kind::Untyped);
            check_sample_fits_kind(kind, &family, &sample).map_err(at)?;
            let key = (sample.name.clone(), sample.labels.clone());
            if !seen_series.insert(key) {
                return Err(at("duplicate series".into()));
            }
            out.samples.push(sample);
            family
        };
        if current_family.as_deref() != Some(family.as_str()) {
            if finished_families.contains(&family) {
                return Err(at(format!("family {family} is not one contiguous group")));
            }
            if let Some(previous) = current_family.replace(family) {
                finished_families.insert(previous);
            }
        }
    }
    check_histograms(&out)?;
    Ok(out)
}

fn family_of(kinds: &HashMap<String, Kind>, name: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            let kind = kinds.get(base);
            let fits = match suffix {
                "_bucket" => kind == Some(&Kind::Histogram),
                _ => matches!(kind, Some(Kind::Histogram | Kind::Summary)),
            };
            if fits {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

fn check_sample_fits_kind(kind: Kind, family: &str, s: &Sample) -> Result<(), String> {
    let bucket = s.name == format!("{family}_bucket");
    match kind {
        // NaN is not a valid count either, hence not `< 0.0`.
        Kind::Counter if s.value.is_nan() || s.value < 0.0 => {
            return Err(format!("counter {} is {}", s.name, s.value));
        }
        Kind::Histogram if bucket && !s.labels.contains_key("le") => {
            return Err("histogram bucket without le".into());
        }
        Kind::Summary if s.name == family && !s.labels.contains_key("quantile") => {
            return Err("summary sample without quantile".into());
        }
        _ => {}
    }
    if kind != Kind::Histogram && s.labels.contains_key("le") {
        return Err("le label outside a histogram".into());
    }
    Ok(())
}

fn check_histograms(out: &Exposition) -> Result<(), String> {
    for (family, kind) in &out.kinds {
        if *kind != Kind::Histogram {
            continue;
        }
        let bucket_name = format!("{family}_bucket");
        // Labels without `le` → (le, cumulative count) of each bucket.
        type Buckets = Vec<(f64, f64)>;
        let mut by_series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
        for s in out.series(&bucket_name) {
            let mut rest = s.labels.clone();
            let le = rest.remove("le").unwrap_or_default();
            let le = parse_float(&le).map_err(|e| format!("{bucket_name}: le {e}"))?;
            by_series
                .entry(rest.into_iter().collect())
                .or_default()
                .push((le, s.value));
        }
        for (labels, mut buckets) in by_series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
            let Some(&(le, inf_count)) = buckets.last() else {
                continue;
            };
            if le != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let label_refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = out.get(&format!("{family}_count"), &label_refs);
            if count != Some(inf_count) {
                return Err(format!(
                    "{family}{labels:?}: +Inf bucket {inf_count} but _count {count:?}"
                ));
            }
            if out.get(&format!("{family}_sum"), &label_refs).is_none() {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok && !name.starts_with("__") {
        Ok(())
    } else {
        Err(format!("bad label name {name:?}"))
    }
}

fn check_help_escapes(doc: &str) -> Result<(), String> {
    let mut chars = doc.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return Err("bad escape in HELP".into());
        }
    }
    Ok(())
}

fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
            s.parse().map_err(|_| format!("bad number {s:?}"))
        }
        _ => Err(format!("bad number {s:?}")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            // Label name up to '=', or the closing brace.
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                rest = &after[start + 1..];
                break;
            }
            let mut end = start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    end = i;
                    break;
                }
            }
            let key = &after[start..end];
            check_label_name(key)?;
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some((_, '\n')) => return Err("raw newline in label value".into()),
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} given twice"));
            }
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err("expected ',' or '}' after a label".into()),
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let mut parts = rest.split(' ');
    let value = parse_float(parts.next().unwrap_or_default())?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[test]
fn the_parser_accepts_the_format_and_rejects_what_prometheus_would() {
    let good = "# HELP a_total Things, with a \\\\ and a \\n.\n# TYPE a_total counter\n\
                a_total{x=\"1\",y=\"q\\\"uote\"} 3\na_total 1 1700000000000\n\
                # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_sum 0.75\nh_count 2\n";
    let e = parse(good).unwrap();
    assert_eq!(e.value("a_total", &[("x", "1"), ("y", "q\"uote")]), 3.0);
    assert_eq!(e.value("h_count", &[]), 2.0);
    for bad in [
        "a 1",                                                            // no final newline
        "a{x=1} 1\n",                                                     // unquoted value
        "a{x=\"1\" 1\n",                                                  // unterminated labels
        "a{x=\"1\",x=\"2\"} 1\n",                                         // duplicate label
        "a one\n",                                                        // not a number
        "1a 1\n",                                                         // bad name
        "a 1\na 2\n",                                                     // duplicate series
        "# TYPE a counter\na -1\n",                                       // negative counter
        "# TYPE a wibble\n",                                              // unknown type
        "a 1\nb 1\na{x=\"y\"} 1\n",                                       // family split in two
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n", // no +Inf
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "a{x=\"\\q\"} 1\n", // bad escape
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
