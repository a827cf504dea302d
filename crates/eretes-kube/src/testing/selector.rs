//! Label and field selectors, parsed and matched as the API server does for
//! `labelSelector` and `fieldSelector` on lists and watches.

use std::collections::BTreeMap;

use super::store::{Kind, Obj};
use super::validation::{label_key_errors, label_value_errors};

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
    /// `key=value`, `key==value`, or `key in (a,b)`.
    In(String, Vec<String>),
    /// `key!=value` or `key notin (a,b)`; also matches objects without `key`.
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`: every requirement must hold (comma = AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

/// Splits on commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn check_key(key: &str) -> Result<(), String> {
    match label_key_errors(key).first() {
        None => Ok(()),
        Some(e) => Err(format!(
            "unable to parse requirement: key: Invalid value: {key:?}: {e}"
        )),
    }
}

fn check_value(value: &str) -> Result<(), String> {
    match label_value_errors(value).first() {
        None => Ok(()),
        Some(e) => Err(format!(
            "unable to parse requirement: values[0][{value}]: Invalid value: {value:?}: {e}"
        )),
    }
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("found '{rest}', expected: '(' ... ')'"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    for v in &values {
        check_value(v)?;
    }
    Ok(values)
}

fn parse_term(term: &str) -> Result<LabelReq, String> {
    let term = term.trim();
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(LabelReq::NotExists(key.to_string()));
    }
    let key_end = term
        .find(|c: char| c.is_whitespace() || matches!(c, '=' | '!' | '(' | ')'))
        .unwrap_or(term.len());
    let (key, rest) = term.split_at(key_end);
    check_key(key)?;
    let rest = rest.trim_start();
    let key = key.to_string();
    if rest.is_empty() {
        return Ok(LabelReq::Exists(key));
    }
    let single = |v: &str| -> Result<Vec<String>, String> {
        let v = v.trim();
        check_value(v)?;
        Ok(vec![v.to_string()])
    };
    if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        return Ok(LabelReq::In(key, single(v)?));
    }
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(LabelReq::NotIn(key, single(v)?));
    }
    if let Some(v) = rest.strip_prefix("notin") {
        return Ok(LabelReq::NotIn(key, parse_set(v)?));
    }
    if let Some(v) = rest.strip_prefix("in") {
        return Ok(LabelReq::In(key, parse_set(v)?));
    }
    Err(format!(
        "unable to parse requirement: found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
    ))
}

impl LabelSelector {
    /// Parses a `labelSelector`; the error is the 400's message.
    pub(crate) fn parse(s: &str) -> Result<LabelSelector, String> {
        if s.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        split_terms(s)
            .into_iter()
            .map(parse_term)
            .collect::<Result<_, _>>()
            .map(LabelSelector)
    }

    /// Whether an object with these labels is selected.
    pub(crate) fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        self.0.iter().all(|req| match req {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// A parsed `fieldSelector`: `(field, value, equal)` terms, all of which hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

/// The fields a kind can be selected on, as the real server registers them.
fn supported_fields(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Job => &["metadata.name", "metadata.namespace", "status.successful"],
        Kind::Pod => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
        ],
        Kind::ConfigMap => &["metadata.name", "metadata.namespace"],
    }
}

/// The value of a selectable field of an object.
fn field_value(obj: &Obj, field: &str) -> String {
    let s = |v: Option<&String>| v.cloned().unwrap_or_default();
    match (obj, field) {
        (_, "metadata.name") => obj.name().to_string(),
        (_, "metadata.namespace") => obj.namespace().to_string(),
        (Obj::Job(j), "status.successful") => j
            .status
            .as_ref()
            .and_then(|st| st.succeeded)
            .unwrap_or(0)
            .to_string(),
        (Obj::Pod(p), _) => {
            let spec = p.spec.as_ref();
            match field {
                "spec.nodeName" => s(spec.and_then(|sp| sp.node_name.as_ref())),
                "spec.restartPolicy" => s(spec.and_then(|sp| sp.restart_policy.as_ref())),
                "spec.schedulerName" => s(spec.and_then(|sp| sp.scheduler_name.as_ref())),
                "spec.serviceAccountName" => {
                    s(spec.and_then(|sp| sp.service_account_name.as_ref()))
                }
                "status.phase" => s(p.status.as_ref().and_then(|st| st.phase.as_ref())),
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

impl FieldSelector {
    /// Parses a `fieldSelector` for `kind`; unknown fields are refused as
    /// the real server refuses them (`field label not supported`).
    pub(crate) fn parse(kind: Kind, s: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if !supported_fields(kind).contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), value.trim().to_string(), equal));
        }
        Ok(FieldSelector(terms))
    }

    /// Whether the object is selected.
    pub(crate) fn matches(&self, obj: &Obj) -> bool {
        self.0
            .iter()
            .all(|(f, v, equal)| (field_value(obj, f) == *v) == *equal)
    }
}

/// What a list or watch selects: a kind, optionally one namespace, and the
/// selectors.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether `obj` is selected.
    pub(crate) fn matches(&self, obj: &Obj) -> bool {
        obj.kind() == self.kind
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == obj.namespace())
            && self.labels.matches(obj.meta().labels.as_ref())
            && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("app", "x"), ("tier", "web")]);
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m("app=x"));
        assert!(m("app==x,tier"));
        assert!(!m("app!=x"));
        assert!(m("other!=x"));
        assert!(m("app in (y, x),!other"));
        assert!(!m("tier notin (web)"));
        assert!(m(""));
        assert!(LabelSelector::parse("app=-bad").is_err());
        assert!(LabelSelector::parse("app in x").is_err());
        assert!(LabelSelector::parse("app ~ x").is_err());
    }
}
