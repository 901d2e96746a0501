//! Field-level validation helpers. Every error carries the field's path below the document root.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::object::{IntOrString, Kind};
use crate::selector::Selector;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.ingress[0].destination.ports[1]`; empty for the document as a whole.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

pub type Errors = Vec<FieldError>;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain as Kubernetes (and Calico) check it: dot-separated parts of lower-case
/// alphanumerics and '-' that start and end alphanumeric; only the whole name is capped, at 253
/// characters (a WorkloadEndpoint name carries a 64-hex container ID in one part).
pub fn is_dns_subdomain(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(part_ok)
}

pub fn check_name(kind: Kind, name: &str, errors: &mut Errors) {
    let path = "metadata.name";
    if name.is_empty() {
        errors.push(FieldError::new(path, "a name is required"));
    } else if kind == Kind::Namespace && !is_dns_label(name) {
        errors.push(FieldError::new(
            path,
            format!("{name:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)"),
        ));
    } else if !is_dns_subdomain(name) {
        errors.push(FieldError::new(
            path,
            format!("{name:?} is not a valid name (lower-case letters, digits, '-' and '.', at most 253 characters)"),
        ));
    } else if kind.is_singleton() && name != "default" {
        errors
            .push(FieldError::new(path, format!("{kind} is a singleton: its name must be \"default\", not {name:?}")));
    }
}

pub fn check_namespace(ns: &str, errors: &mut Errors) {
    if !is_dns_label(ns) {
        errors.push(FieldError::new("metadata.namespace", format!("{ns:?} is not a valid namespace name")));
    }
}

/// Kubernetes label key: optional DNS-subdomain prefix + '/' + name of ≤ 63 chars.
pub fn check_label_key(key: &str, path: &str, errors: &mut Errors) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !name_ok || prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        errors.push(FieldError::new(path, format!("{key:?} is not a valid label key")));
    }
}

/// Kubernetes label value: empty, or ≤ 63 alphanumerics, '-', '_', '.' starting and ending alphanumeric.
pub fn check_label_value(value: &str, path: &str, errors: &mut Errors) {
    let b = value.as_bytes();
    let ok = value.is_empty()
        || (b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric());
    if !ok {
        errors.push(FieldError::new(
            path,
            format!("{value:?} is not a valid label value (at most 63 letters, digits, '-', '_', '.')"),
        ));
    }
}

pub fn check_selector(sel: &str, path: &str, errors: &mut Errors) -> Option<Selector> {
    match Selector::parse(sel) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(FieldError::new(path, format!("invalid selector {sel:?}: {e}")));
            None
        }
    }
}

pub fn check_cidr(cidr: &str, path: &str, errors: &mut Errors) -> Option<IpNet> {
    match parse_cidr(cidr) {
        Ok(n) => Some(n),
        Err(m) => {
            errors.push(FieldError::new(path, m));
            None
        }
    }
}

/// A CIDR, or a bare address taken as /32 or /128 (as Calico accepts in `nets`).
pub fn parse_cidr(cidr: &str) -> Result<IpNet, String> {
    if let Ok(n) = cidr.parse::<IpNet>() {
        return Ok(n);
    }
    cidr.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("{cidr:?} is not a valid CIDR"))
}

pub fn check_ip(ip: &str, path: &str, errors: &mut Errors) -> Option<IpAddr> {
    match ip.parse::<IpAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(FieldError::new(path, format!("{ip:?} is not a valid IP address")));
            None
        }
    }
}

/// One of a fixed set of values (Calico's enums are case-sensitive).
pub fn check_enum(value: &str, allowed: &[&str], path: &str, errors: &mut Errors) {
    if !allowed.contains(&value) {
        errors.push(FieldError::new(path, format!("{value:?} is not one of {}", allowed.join(", "))));
    }
}

/// AS number: 0..=4294967295, written as a number, a numeric string, or asdot "a.b".
pub fn parse_asn(v: &IntOrString) -> Result<u32, String> {
    let bad = || format!("{v} is not a valid AS number (0-4294967295 or asdot a.b)");
    match v {
        IntOrString::Int(i) => u32::try_from(*i).map_err(|_| bad()),
        IntOrString::Str(s) => match s.split_once('.') {
            Some((hi, lo)) => {
                let (hi, lo): (u16, u16) = (hi.parse().map_err(|_| bad())?, lo.parse().map_err(|_| bad())?);
                Ok((u32::from(hi) << 16) | u32::from(lo))
            }
            None => s.parse().map_err(|_| bad()),
        },
    }
}

pub fn check_asn(v: &IntOrString, path: &str, errors: &mut Errors) {
    if let Err(m) = parse_asn(v) {
        errors.push(FieldError::new(path, m));
    }
}

/// Go-style duration such as `120s`, `1m30s`, `500ms`.
pub fn check_duration(v: &str, path: &str, errors: &mut Errors) {
    let mut rest = v;
    let mut ok = !rest.is_empty();
    while ok && !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let unit_end = rest[digits..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| digits + i);
        ok = digits > 0 && matches!(&rest[digits..unit_end], "ns" | "us" | "µs" | "ms" | "s" | "m" | "h");
        rest = &rest[unit_end..];
    }
    if !ok && v != "0" {
        errors.push(FieldError::new(path, format!("{v:?} is not a duration (e.g. 90s, 1m30s, 500ms)")));
    }
}

/// A Go-style duration (`15m`, `1m30s`, `500ms`, `0`) as a Duration.
pub fn parse_duration(v: &str) -> Option<std::time::Duration> {
    if v == "0" {
        return Some(std::time::Duration::ZERO);
    }
    let mut rest = v;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let unit_end = rest[digits..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| digits + i);
        let n: f64 = rest[..digits].parse().ok()?;
        let scale = match &rest[digits..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

pub fn check_port_number(p: i64, path: &str, errors: &mut Errors) {
    if !(1..=65535).contains(&p) {
        errors.push(FieldError::new(path, format!("port {p} is outside 1..65535")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_keys() {
        assert!(is_dns_subdomain("192.168.10.11"));
        assert!(is_dns_subdomain("default-ipv4-ippool"));
        assert!(!is_dns_subdomain("Bad_Name"));
        assert!(!is_dns_subdomain("-x"));
        let mut e = vec![];
        check_label_key("projectcalico.org/namespace", "p", &mut e);
        check_label_key("calico-rr", "p", &mut e);
        assert!(e.is_empty());
        check_label_key("bad key", "p", &mut e);
        check_label_key("-x", "p", &mut e);
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn asn_forms() {
        assert_eq!(parse_asn(&IntOrString::Int(64512)), Ok(64512));
        assert_eq!(parse_asn(&IntOrString::Str("1.10".into())), Ok(65546));
        assert!(parse_asn(&IntOrString::Int(-1)).is_err());
        assert!(parse_asn(&IntOrString::Int(4294967296)).is_err());
        assert!(parse_asn(&IntOrString::Str("x".into())).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("15m"), Some(std::time::Duration::from_secs(900)));
        assert_eq!(parse_duration("1m30s"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(std::time::Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Some(std::time::Duration::ZERO));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn durations() {
        let mut e = vec![];
        for ok in ["120s", "1m30s", "500ms", "1h", "0"] {
            check_duration(ok, "d", &mut e);
        }
        assert!(e.is_empty(), "{e:?}");
        for bad in ["", "10", "s", "10x"] {
            check_duration(bad, "d", &mut e);
        }
        assert_eq!(e.len(), 4);
    }
}
