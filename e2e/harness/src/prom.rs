//! Scraping a `/metrics` endpoint and parsing the Prometheus text format (0.0.4) strictly:
//! anything `promtool check metrics` or Prometheus itself would refuse is an error here, and
//! so are a few things they only warn about (a family without HELP or TYPE, a counter not
//! named `_total`, a histogram whose buckets do not add up).
//!
//! Rules enforced: metric and label names are valid; label values use only the `\\`, `\"`
//! and `\n` escapes; values are floats (`NaN`, `+Inf`, `-Inf` included) with an optional
//! integer timestamp; every family has one HELP and one TYPE line before its samples, and its
//! samples are contiguous; no series appears twice; counters are named `*_total` and never
//! negative; each histogram series has increasing `le` buckets ending in `+Inf`, cumulative
//! counts, a `_sum`, and a `_count` equal to its `+Inf` bucket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its TYPE, HELP and samples in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Every sample named `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The sum of the matching samples' values (0 when none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }

    /// The one matching sample's value; panics (a test helper) when there is not exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.samples(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: expected one sample, found {found:?}"
        );
        found[0].value
    }

    /// The type of a family, by family name.
    pub fn kind(&self, family: &str) -> Option<&str> {
        self.families.get(family).map(|f| f.kind.as_str())
    }

    /// Every sample name this exposition can produce (families' sample names).
    pub fn sample_names(&self) -> HashSet<String> {
        self.families
            .values()
            .flat_map(|f| f.samples.iter().map(|s| s.name.clone()))
            .chain(self.families.keys().cloned())
            .collect()
    }
}

/// Why an exposition was refused: the 1-based line and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub why: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

impl std::error::Error for ParseError {}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) && !s.is_empty() => {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Splits `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut pos = 0;
        loop {
            let tail = &r[pos..];
            if let Some(after) = tail.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = tail.find('=').ok_or("unterminated label set")?;
            let lname = &tail[..eq];
            if !valid_label_name(lname) {
                return Err(format!("invalid label name {lname:?}"));
            }
            let v = tail[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("label {lname} value is not quoted"))?;
            let mut value = String::new();
            let mut close = None;
            let mut it = v.char_indices();
            while let Some((i, c)) = it.next() {
                match c {
                    '\\' => match it.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => {
                            return Err(format!("invalid escape {other:?} in label {lname}"));
                        }
                    },
                    '"' => {
                        close = Some(i);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let close = close.ok_or_else(|| format!("unterminated value of label {lname}"))?;
            if labels.insert(lname.to_owned(), value).is_some() {
                return Err(format!("label {lname} given twice"));
            }
            // name, '=', '"', the value, '"'
            pos += eq + 2 + close + 1;
            let tail = &r[pos..];
            if tail.starts_with(',') {
                pos += 1;
            } else if !tail.starts_with('}') {
                return Err(format!("expected ',' or '}}' after label {lname}"));
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let mut parts = rest.split(' ');
    let v = parts.next().unwrap_or_default();
    let value = parse_value(v).ok_or_else(|| format!("invalid value {v:?}"))?;
    if let Some(ts) = parts.next()
        && (ts.is_empty() || ts.parse::<i64>().is_err())
    {
        return Err(format!("invalid timestamp {ts:?}"));
    }
    if parts.next().is_some() {
        return Err("trailing fields after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Which family a sample name belongs to, given the families declared so far.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families.get(base).is_some_and(|f| f.kind == "histogram")
        {
            return Some(base);
        }
    }
    None
}

/// Parses an exposition strictly (see the module doc).
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut seen: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(ParseError {
            line: text.lines().count(),
            why: "the last line does not end with a newline".into(),
        });
    }
    for (i, line) in text.split_terminator('\n').enumerate() {
        let err = |why: String| ParseError { line: i + 1, why };
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let c = c.strip_prefix(' ').unwrap_or(c);
            let mut words = c.splitn(3, ' ');
            let (kw, name, rest) = (words.next(), words.next(), words.next());
            match kw {
                Some("HELP") | Some("TYPE") => {
                    let name = name.ok_or_else(|| err("HELP/TYPE without a name".into()))?;
                    if !valid_metric_name(name) {
                        return Err(err(format!("invalid metric name {name:?}")));
                    }
                    if closed.contains(name) {
                        return Err(err(format!("{name}: family declared again after others")));
                    }
                    if current.as_deref() != Some(name) {
                        if let Some(prev) = current.take() {
                            closed.insert(prev);
                        }
                        current = Some(name.to_owned());
                    }
                    if kw == Some("HELP") {
                        if !helps.insert(name.to_owned()) {
                            return Err(err(format!("{name}: second HELP")));
                        }
                        let help = rest.unwrap_or_default();
                        let mut it = help.chars();
                        while let Some(ch) = it.next() {
                            if ch == '\\' && !matches!(it.next(), Some('\\') | Some('n')) {
                                return Err(err(format!("{name}: invalid escape in HELP")));
                            }
                        }
                        if let Some(f) = fams.get_mut(name) {
                            f.help = help.to_owned();
                        } else {
                            fams.insert(
                                name.to_owned(),
                                Family {
                                    kind: String::new(),
                                    help: help.to_owned(),
                                    samples: vec![],
                                },
                            );
                        }
                    } else {
                        let kind = rest.ok_or_else(|| err(format!("{name}: TYPE without type")))?;
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                        {
                            return Err(err(format!("{name}: unknown type {kind:?}")));
                        }
                        let f = fams.entry(name.to_owned()).or_insert(Family {
                            kind: String::new(),
                            help: String::new(),
                            samples: vec![],
                        });
                        if !f.kind.is_empty() {
                            return Err(err(format!("{name}: second TYPE")));
                        }
                        if !f.samples.is_empty() {
                            return Err(err(format!("{name}: TYPE after samples")));
                        }
                        if kind == "counter" && !name.ends_with("_total") {
                            return Err(err(format!(
                                "{name}: a counter's name must end in _total"
                            )));
                        }
                        f.kind = kind.to_owned();
                    }
                }
                // Other comments are allowed by the format.
                _ => {}
            }
            continue;
        }
        let s = parse_sample(line).map_err(err)?;
        let fam = family_of(&s.name, &fams)
            .ok_or_else(|| err(format!("{}: sample without a TYPE line", s.name)))?
            .to_owned();
        if current.as_deref() != Some(fam.as_str()) {
            return Err(err(format!("{fam}: samples are not contiguous")));
        }
        if !seen.insert((s.name.clone(), s.labels.clone())) {
            return Err(err(format!("{}{:?}: series given twice", s.name, s.labels)));
        }
        let f = fams
            .get_mut(&fam)
            .ok_or_else(|| err("internal: family vanished".into()))?;
        if f.kind.is_empty() {
            return Err(err(format!("{fam}: sample before TYPE")));
        }
        if f.kind == "counter" && (s.value.is_nan() || s.value < 0.0) {
            return Err(err(format!("{fam}: negative or NaN counter")));
        }
        if f.kind == "histogram" && s.name.ends_with("_bucket") && !s.labels.contains_key("le") {
            return Err(err(format!("{fam}: bucket without le")));
        }
        f.samples.push(s);
    }
    for (name, f) in &fams {
        let line = 0;
        if f.kind.is_empty() {
            return Err(ParseError {
                line,
                why: format!("{name}: no TYPE line"),
            });
        }
        if !helps.contains(name) {
            return Err(ParseError {
                line,
                why: format!("{name}: no HELP line"),
            });
        }
        if f.kind == "histogram" {
            check_histogram(name, f).map_err(|why| ParseError { line, why })?;
        }
    }
    Ok(Exposition { families: fams })
}

fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    type Key = BTreeMap<String, String>;
    let mut buckets: HashMap<Key, Vec<(f64, f64)>> = HashMap::new();
    let mut sums: HashMap<Key, f64> = HashMap::new();
    let mut counts: HashMap<Key, f64> = HashMap::new();
    for s in &f.samples {
        let mut key = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = key.remove("le").unwrap_or_default();
            let le = parse_value(&le).ok_or_else(|| format!("{name}: invalid le {le:?}"))?;
            buckets.entry(key).or_default().push((le, s.value));
        } else if s.name.ends_with("_sum") {
            sums.insert(key, s.value);
        } else if s.name.ends_with("_count") {
            counts.insert(key, s.value);
        } else {
            return Err(format!(
                "{name}: histogram sample {} is not a bucket, sum or count",
                s.name
            ));
        }
    }
    for (key, bs) in &buckets {
        let mut prev = (f64::NEG_INFINITY, 0.0);
        for &(le, v) in bs {
            if le <= prev.0 {
                return Err(format!("{name}{key:?}: le not increasing"));
            }
            if v < prev.1 {
                return Err(format!("{name}{key:?}: buckets not cumulative"));
            }
            prev = (le, v);
        }
        if prev.0 != f64::INFINITY {
            return Err(format!("{name}{key:?}: no +Inf bucket"));
        }
        if counts.get(key) != Some(&prev.1) {
            return Err(format!(
                "{name}{key:?}: _count differs from the +Inf bucket"
            ));
        }
        if !sums.contains_key(key) {
            return Err(format!("{name}{key:?}: no _sum"));
        }
    }
    if counts.len() != buckets.len() || sums.len() != buckets.len() {
        return Err(format!("{name}: _sum/_count without buckets"));
    }
    Ok(())
}

/// `GET /metrics` over plain HTTP/1.1 (blocking); returns the content type and the body.
/// Panics (a test helper) unless the answer is `200 OK`.
pub fn scrape(addr: SocketAddr) -> (String, String) {
    let mut t = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connecting to the metrics port {addr}: {e}"));
    let _ = t.set_read_timeout(Some(Duration::from_secs(30)));
    t.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap_or_else(|e| panic!("sending to {addr}: {e}"));
    let mut raw = String::new();
    t.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header from {addr}: {raw:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (ctype, body.to_owned())
}

/// Scrapes and parses; panics with the parser's reason and the body if it is malformed.
pub fn scrape_parsed(addr: SocketAddr) -> Exposition {
    let (ctype, body) = scrape(addr);
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "content type {ctype:?}"
    );
    parse(&body).unwrap_or_else(|e| panic!("malformed exposition from {addr}: {e}\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\na_total{x=\"2\"} 4 1700000000\n\
# HELP g a gauge\n# TYPE g gauge\ng NaN\ng{k=\"v\"} -1.5e3\n\
# HELP h_seconds lat\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\nh_seconds_sum 0.3\nh_seconds_count 2\n";

    #[test]
    fn accepts_a_well_formed_exposition() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.value("a_total", &[("x", "1")]), 3.0);
        assert_eq!(
            e.samples("a_total", &[("x", "1")]).next().unwrap().labels["y"],
            "q\"\\\n"
        );
        assert_eq!(e.value("g", &[("k", "v")]), -1500.0);
        assert_eq!(e.kind("h_seconds"), Some("histogram"));
        assert_eq!(e.value("h_seconds_count", &[]), 2.0);
    }

    #[test]
    fn rejects_malformed_samples_and_families() {
        let bad = [
            ("a_total{x=\"1\" 3\n", "unterminated label set"),
            ("a_total{x=1} 3\n", "unquoted"),
            ("a_total{x=\"\\t\"} 3\n", "bad escape"),
            ("a_total{x=\"1\",x=\"2\"} 3\n", "duplicate label"),
            ("a_total 3 4 5\n", "trailing field"),
            ("a_total three\n", "bad value"),
            ("a_total  3\n", "two spaces"),
            ("1a_total 3\n", "bad name"),
            ("a_total{1x=\"1\"} 3\n", "bad label name"),
            ("a_total 3\na_total 3\n", "duplicate series"),
            ("a_total -1\n", "negative counter"),
        ];
        for (sample, what) in bad {
            let text = format!("# HELP a_total t\n# TYPE a_total counter\n{sample}");
            assert!(parse(&text).is_err(), "{what} accepted: {text:?}");
        }
        for (text, what) in [
            ("x 1\n", "no TYPE"),
            ("# TYPE x gauge\nx 1\n", "no HELP"),
            ("# HELP x h\n# TYPE x gauge\nx 1", "no final newline"),
            (
                "# HELP x h\n# TYPE x counter\nx 1\n",
                "counter without _total",
            ),
            (
                "# HELP x h\n# TYPE x gauge\n# TYPE x gauge\nx 1\n",
                "two TYPEs",
            ),
            (
                "# HELP x h\n# TYPE x gauge\nx 1\n# HELP y h\n# TYPE y gauge\ny 1\nx{a=\"b\"} 1\n",
                "not contiguous",
            ),
            ("# HELP x h\n# TYPE x wobbly\nx 1\n", "unknown type"),
            (
                "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "not cumulative",
            ),
            (
                "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
                "no +Inf",
            ),
            (
                "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
                "count differs",
            ),
        ] {
            assert!(parse(text).is_err(), "{what} accepted: {text:?}");
        }
    }
}
