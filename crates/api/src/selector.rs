//! Calico's label-selector language: parser, evaluator, canonical printer and unique ID.
//!
//! Grammar and semantics follow Calico (reference §2): `!` binds to one primary, `&&` binds
//! tighter than `||`, whitespace is only space and tab, strings have no escapes, and a missing
//! label makes `!=` and `not in` true.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use base64::Engine as _;
use sha2::{Digest, Sha224};

/// Longest label name the parser accepts.
pub const MAX_LABEL_LEN: usize = 512;
/// Longest selector the parser accepts (policy selectors; Calico's pool selectors are capped
/// lower, at [`MAX_POOL_SELECTOR_LEN`]).
pub const MAX_SELECTOR_LEN: usize = 64 * 1024;
/// Longest IPPool nodeSelector/namespaceSelector (Calico's limit).
pub const MAX_POOL_SELECTOR_LEN: usize = 1024;
/// Deepest parenthesis nesting the parser accepts: the parser, printer and evaluator recurse
/// once per level, so this bounds their stack whatever the input.
pub const MAX_DEPTH: usize = 128;

/// A parsed selector. `And`/`Or` are n-ary (always ≥ 2 operands once parsed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    All,
    Global,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Not(Box<Selector>),
    And(Vec<Selector>),
    Or(Vec<Selector>),
}

/// A parse failure: `position` is the byte offset of the offending character.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct SelectorError {
    pub position: usize,
    pub message: String,
}

impl SelectorError {
    /// The selector with a caret under the offending position, for terminal output.
    pub fn pointer(&self, input: &str) -> String {
        format!("{input}\n{}^", " ".repeat(input[..self.position.min(input.len())].chars().count()))
    }
}

/// Where a label lookup comes from: a plain map, or layered sources (endpoint over profile).
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for HashMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Selector {
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        Selector::parse_bounded(input, MAX_SELECTOR_LEN)
    }

    /// Parse a selector of at most `max_len` bytes.
    pub fn parse_bounded(input: &str, max_len: usize) -> Result<Selector, SelectorError> {
        if input.len() > max_len {
            return Err(SelectorError {
                position: max_len,
                message: format!("selector is longer than {max_len} characters ({} given)", input.len()),
            });
        }
        let mut p = Parser { s: input.as_bytes(), pos: 0, depth: 0 };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected characters after the selector"));
        }
        Ok(sel)
    }

    pub fn matches(&self, labels: &impl Labels) -> bool {
        match self {
            Selector::All | Selector::Global => true,
            Selector::Has(k) => labels.label(k).is_some(),
            Selector::Eq(k, v) => labels.label(k) == Some(v.as_str()),
            Selector::Ne(k, v) => labels.label(k) != Some(v.as_str()),
            Selector::Contains(k, v) => labels.label(k).is_some_and(|l| l.contains(v.as_str())),
            Selector::StartsWith(k, v) => labels.label(k).is_some_and(|l| l.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => labels.label(k).is_some_and(|l| l.ends_with(v.as_str())),
            Selector::In(k, set) => labels.label(k).is_some_and(|l| set.contains(l)),
            Selector::NotIn(k, set) => !labels.label(k).is_some_and(|l| set.contains(l)),
            Selector::Not(inner) => !inner.matches(labels),
            Selector::And(ops) => ops.iter().all(|s| s.matches(labels)),
            Selector::Or(ops) => ops.iter().any(|s| s.matches(labels)),
        }
    }

    /// True if `global()` appears anywhere (forbidden in IPPool selectors).
    pub fn uses_global(&self) -> bool {
        match self {
            Selector::Global => true,
            Selector::Not(inner) => inner.uses_global(),
            Selector::And(ops) | Selector::Or(ops) => ops.iter().any(Selector::uses_global),
            _ => false,
        }
    }

    /// Calico's unique ID: `s:` + base64url(SHA-224(`s:` + canonical form)), used for set names.
    pub fn unique_id(&self) -> String {
        let digest = Sha224::digest(format!("s:{self}").as_bytes());
        format!("s:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest))
    }
}

fn quote(v: &str) -> String {
    if v.contains('"') { format!("'{v}'") } else { format!("\"{v}\"") }
}

/// Canonical form (reference §2.4): parsing it gives back an equal selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &BTreeSet<String>| s.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ");
        let join = |f: &mut fmt::Formatter<'_>, ops: &[Selector], sep: &str| {
            if ops.len() == 1 {
                return write!(f, "{}", ops[0]);
            }
            let parts: Vec<String> = ops.iter().map(ToString::to_string).collect();
            write!(f, "({})", parts.join(sep))
        };
        match self {
            Selector::All => f.write_str("all()"),
            Selector::Global => f.write_str("global()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", quote(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", quote(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", quote(v)),
            Selector::In(k, s) => write!(f, "{k} in {{{}}}", set(s)),
            Selector::NotIn(k, s) => write!(f, "{k} not in {{{}}}", set(s)),
            Selector::Not(inner) => write!(f, "!{inner}"),
            Selector::And(ops) => join(f, ops, " && "),
            Selector::Or(ops) => join(f, ops, " || "),
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

enum Op {
    Eq,
    Ne,
    Contains,
    StartsWith,
    EndsWith,
    In,
    NotIn,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    /// Parentheses open at `pos`.
    depth: usize,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn rest(&self) -> &[u8] {
        &self.s[self.pos.min(self.s.len())..]
    }

    fn error(&self, message: &str) -> SelectorError {
        let found = match self.peek() {
            None => "end of input".to_string(),
            Some(b'\n') => "newline".to_string(),
            Some(_) => {
                let text = String::from_utf8_lossy(self.rest());
                format!("{:?}", text.chars().take(10).collect::<String>())
            }
        };
        SelectorError { position: self.pos, message: format!("{message} (found {found})") }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token.as_bytes()) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// Matches a word operator ending at a word boundary; multi-word ones allow any spacing.
    fn eat_word_op(&mut self, words: &[&str]) -> bool {
        let start = self.pos;
        for (i, w) in words.iter().enumerate() {
            if i > 0 {
                self.skip_ws();
            }
            if !self.eat(w) {
                self.pos = start;
                return false;
            }
        }
        if self.peek().is_some_and(is_label_byte) {
            self.pos = start;
            return false;
        }
        true
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut ops = vec![self.and()?];
        loop {
            self.skip_ws();
            if self.eat("||") {
                ops.push(self.and()?);
            } else if self.peek() == Some(b'|') {
                return Err(self.error("expected \"||\""));
            } else {
                break;
            }
        }
        Ok(if ops.len() == 1 { ops.remove(0) } else { Selector::Or(ops) })
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut ops = vec![self.unary()?];
        loop {
            self.skip_ws();
            if self.eat("&&") {
                ops.push(self.unary()?);
            } else if self.peek() == Some(b'&') {
                return Err(self.error("expected \"&&\""));
            } else {
                break;
            }
        }
        Ok(if ops.len() == 1 { ops.remove(0) } else { Selector::And(ops) })
    }

    /// `!` binds to one primary; each `!` toggles (`!!x` is `x`), as in Calico.
    fn unary(&mut self) -> Result<Selector, SelectorError> {
        let mut negate = false;
        loop {
            self.skip_ws();
            if self.peek() == Some(b'!') {
                self.pos += 1;
                negate = !negate;
            } else {
                break;
            }
        }
        let primary = self.primary()?;
        Ok(if negate { Selector::Not(Box::new(primary)) } else { primary })
    }

    fn primary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.eat("has(") {
            self.skip_ws();
            let label = self.label()?;
            self.skip_ws();
            if !self.eat(")") {
                return Err(self.error("expected \")\" to close has("));
            }
            return Ok(Selector::Has(label));
        }
        for (name, sel) in [("all(", Selector::All), ("global(", Selector::Global)] {
            if self.eat(name) {
                self.skip_ws();
                if !self.eat(")") {
                    return Err(self.error(&format!("expected \")\" after {name}")));
                }
                return Ok(sel);
            }
        }
        match self.peek() {
            Some(b'(') => {
                if self.depth >= MAX_DEPTH {
                    return Err(self.error(&format!("parentheses nested deeper than {MAX_DEPTH} levels")));
                }
                self.pos += 1;
                self.depth += 1;
                let inner = self.or()?;
                self.depth -= 1;
                self.skip_ws();
                if !self.eat(")") {
                    return Err(self.error("expected \")\""));
                }
                Ok(inner)
            }
            Some(b'"' | b'\'') => Err(self.error("a string literal cannot start an expression; expected a label")),
            Some(b) if is_label_byte(b) => self.comparison(),
            _ => Err(self.error("expected a label, has(), all(), global(), \"!\" or \"(\"")),
        }
    }

    fn label(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        while self.peek().is_some_and(is_label_byte) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a label"));
        }
        if self.pos - start > MAX_LABEL_LEN {
            return Err(SelectorError {
                position: start,
                message: format!("label too long (over {MAX_LABEL_LEN} characters)"),
            });
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn comparison(&mut self) -> Result<Selector, SelectorError> {
        let label = self.label()?;
        self.skip_ws();
        let op = if self.eat("==") {
            Op::Eq
        } else if self.eat("!=") {
            Op::Ne
        } else if self.eat_word_op(&["contains"]) {
            Op::Contains
        } else if self.eat_word_op(&["starts", "with"]) {
            Op::StartsWith
        } else if self.eat_word_op(&["ends", "with"]) {
            Op::EndsWith
        } else if self.eat_word_op(&["not", "in"]) {
            Op::NotIn
        } else if self.eat_word_op(&["in"]) {
            Op::In
        } else {
            return Err(
                self.error("expected operator after label (==, !=, in, not in, contains, starts with, ends with)")
            );
        };
        self.skip_ws();
        Ok(match op {
            Op::In | Op::NotIn => {
                let set = self.string_set()?;
                if matches!(op, Op::In) { Selector::In(label, set) } else { Selector::NotIn(label, set) }
            }
            Op::Eq => Selector::Eq(label, self.string()?),
            Op::Ne => Selector::Ne(label, self.string()?),
            Op::Contains => Selector::Contains(label, self.string()?),
            Op::StartsWith => Selector::StartsWith(label, self.string()?),
            Op::EndsWith => Selector::EndsWith(label, self.string()?),
        })
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let start = self.pos;
        self.pos += 1;
        let Some(len) = self.rest().iter().position(|&b| b == quote) else {
            return Err(SelectorError { position: start, message: "unterminated string".into() });
        };
        let value = String::from_utf8_lossy(&self.s[self.pos..self.pos + len]).into_owned();
        self.pos += len + 1;
        Ok(value)
    }

    fn string_set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        if !self.eat("{") {
            return Err(self.error("expected \"{\" to start a set of strings"));
        }
        let mut set = BTreeSet::new();
        loop {
            self.skip_ws();
            if self.eat("}") {
                return Ok(set);
            }
            set.insert(self.string()?);
            self.skip_ws();
            if self.eat(",") {
                continue;
            }
            if self.eat("}") {
                return Ok(set);
            }
            return Err(self.error("expected \",\" or \"}\" in set"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn canon(s: &str) -> String {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}")).to_string()
    }

    #[test]
    fn canonical_vectors() {
        let cases = [
            ("", "all()"),
            ("  \t ", "all()"),
            (" (all() )", "all()"),
            ("! (has( b)||! has(a ))", "!(has(b) || !has(a))"),
            ("! (a == \"b\"&&! c != \"d\")", "!(a == \"b\" && !c != \"d\")"),
            ("a == '\"'", "a == '\"'"),
            ("a startswith '\"'", "a starts with '\"'"),
            ("a endswith \"'\"", "a ends with \"'\""),
            ("a!='\"'", "a != '\"'"),
            ("a in {\"z\", \"z\", \"x\", \"y\", \"x\", \"a\"}", "a in {\"a\", \"x\", \"y\", \"z\"}"),
            ("!(k == 'v')", "!k == \"v\""),
            ("k == 'v' && x == 'y'", "(k == \"v\" && x == \"y\")"),
            ("a notin {}", "a not in {}"),
            ("a in {'x',}", "a in {\"x\"}"),
            ("!!has(a)", "has(a)"),
            ("a == 'x' || b == 'y' && c == 'z'", "(a == \"x\" || (b == \"y\" && c == \"z\"))"),
            ("contains contains \"contains\"", "contains contains \"contains\""),
            ("global()", "global()"),
            ("a   starts   with 'p'", "a starts with \"p\""),
        ];
        for (input, want) in cases {
            assert_eq!(canon(input), want, "input {input:?}");
        }
    }

    #[test]
    fn unique_ids() {
        assert_eq!(Selector::parse("all()").unwrap().unique_id(), "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug");
        assert_eq!(
            Selector::parse("!(has(b) || !has(a))").unwrap().unique_id(),
            "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q"
        );
        assert_eq!(
            Selector::parse("!(a == \"b\" && !c != \"d\")").unwrap().unique_id(),
            "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w"
        );
    }

    #[test]
    fn evaluation_table() {
        let l = labels(&[("a", "b"), ("empty", ""), ("app", "web-frontend")]);
        let cases = [
            ("a == 'b'", true),
            ("a == 'c'", false),
            ("missing == 'b'", false),
            ("a != 'b'", false),
            ("a != 'c'", true),
            ("missing != 'x'", true),
            ("a in {'b', 'c'}", true),
            ("a in {'c'}", false),
            ("missing in {'b'}", false),
            ("a not in {'b'}", false),
            ("a not in {'c'}", true),
            ("missing not in {'b'}", true),
            ("app contains 'front'", true),
            ("app contains 'back'", false),
            ("missing contains ''", false),
            ("app starts with 'web'", true),
            ("app starts with 'front'", false),
            ("app ends with 'end'", true),
            ("app ends with 'web'", false),
            ("has(empty)", true),
            ("empty == ''", true),
            ("has(missing)", false),
            ("all()", true),
            ("global()", true),
            ("!has(a)", false),
            ("!a == 'x' && a == 'b'", true),
            ("has(missing) || a == 'b'", true),
            ("has(missing) && a == 'b'", false),
            ("!(has(missing) || a == 'c')", true),
            ("App == 'web-frontend'", false),
        ];
        for (sel, want) in cases {
            assert_eq!(Selector::parse(sel).unwrap().matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn rejects_with_positions() {
        let cases: [(&str, usize); 14] = [
            ("a = 'b'", 2),
            ("a == b", 5),
            ("a == 'b' & c == 'd'", 9),
            ("a == 'b' | c == 'd'", 9),
            ("'b' == a", 0),
            ("a == 'b' garbage", 9),
            ("a == 'unterminated", 5),
            ("a inf {'x'}", 2),
            ("has (a)", 4),
            ("a == 'b'\n&& c == 'd'", 8),
            ("(a == 'b'", 9),
            ("a in {'x' 'y'}", 10),
            ("", usize::MAX),
            ("a ==", 4),
        ];
        for (input, pos) in cases {
            if pos == usize::MAX {
                continue;
            }
            let err = Selector::parse(input).expect_err(input);
            assert_eq!(err.position, pos, "{input:?}: {err}");
        }
        let long = "a".repeat(513);
        assert!(Selector::parse(&format!("has({long})")).unwrap_err().message.contains("too long"));
        assert!(Selector::parse(&format!("has({})", "a".repeat(512))).is_ok());
    }

    /// A stored pool selector 3,000 parentheses deep once overflowed the agent's stack on every
    /// ADD; nesting and length are bounded in the parser now.
    #[test]
    fn nesting_and_length_are_bounded() {
        let nested = |n: usize| format!("{}a == 'b'{}", "(".repeat(n), ")".repeat(n));
        assert!(Selector::parse(&nested(MAX_DEPTH)).is_ok());
        for n in [MAX_DEPTH + 1, 3_000, 8_000, 30_000] {
            let err = Selector::parse(&nested(n)).unwrap_err();
            assert!(err.message.contains("nested deeper than 128"), "{n}: {err}");
            assert_eq!(err.position, MAX_DEPTH);
        }
        // Negations toggle and long flat chains do not recurse: they parse up to the length bound.
        assert!(Selector::parse(&format!("{}has(a)", "!".repeat(10_000))).is_ok());
        let flat = vec!["a == 'b'"; 5_000].join(" && ");
        assert!(flat.len() < MAX_SELECTOR_LEN && Selector::parse(&flat).is_ok());
        let long = vec!["a == 'b'"; 10_000].join(" || ");
        assert!(Selector::parse(&long).unwrap_err().message.contains("longer than 65536"));
        let pool = "a == 'b' && ".repeat(100) + "all()";
        assert!(
            Selector::parse_bounded(&pool, MAX_POOL_SELECTOR_LEN).unwrap_err().message.contains("longer than 1024")
        );
        // A parsed selector at the depth bound prints and evaluates without trouble.
        let deep = Selector::parse(&nested(MAX_DEPTH)).unwrap();
        assert!(deep.matches(&labels(&[("a", "b")])) && !deep.unique_id().is_empty());
    }

    #[test]
    fn pointer_marks_the_position() {
        let err = Selector::parse("a = 'b'").unwrap_err();
        assert_eq!(err.pointer("a = 'b'"), "a = 'b'\n  ^");
    }

    fn label_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("app.kubernetes.io/name".to_string()),
            "[a-z][a-z0-9_./-]{0,8}"
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), Just("x".to_string()), "[a-z \"]{0,4}", "[a-z ']{0,4}"]
    }

    fn selector_strategy() -> impl Strategy<Value = Selector> {
        let leaf = prop_oneof![
            Just(Selector::All),
            Just(Selector::Global),
            label_strategy().prop_map(Selector::Has),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Selector::Eq(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Selector::Ne(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Selector::Contains(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Selector::StartsWith(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Selector::EndsWith(k, v)),
            (label_strategy(), prop::collection::btree_set(value_strategy(), 0..4))
                .prop_map(|(k, s)| Selector::In(k, s)),
            (label_strategy(), prop::collection::btree_set(value_strategy(), 0..4))
                .prop_map(|(k, s)| Selector::NotIn(k, s)),
        ];
        // A value holding both quote kinds cannot be written without escapes: keep them out.
        let leaf = leaf.prop_filter("unprintable value", printable);
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                inner
                    .clone()
                    .prop_filter("no double negation", |s| !matches!(s, Selector::Not(_)))
                    .prop_map(|s| Selector::Not(Box::new(s))),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Selector::And),
                prop::collection::vec(inner, 2..4).prop_map(Selector::Or),
            ]
        })
    }

    fn printable(s: &Selector) -> bool {
        let ok = |v: &String| !(v.contains('"') && v.contains('\''));
        match s {
            Selector::Eq(_, v)
            | Selector::Ne(_, v)
            | Selector::Contains(_, v)
            | Selector::StartsWith(_, v)
            | Selector::EndsWith(_, v) => ok(v),
            Selector::In(_, set) | Selector::NotIn(_, set) => set.iter().all(ok),
            _ => true,
        }
    }

    proptest! {
        #[test]
        fn print_parse_round_trip(sel in selector_strategy()) {
            let printed = sel.to_string();
            let reparsed = Selector::parse(&printed).map_err(|e| TestCaseError::fail(format!("{printed:?}: {e}")))?;
            prop_assert_eq!(&reparsed, &sel);
            prop_assert_eq!(reparsed.to_string(), printed);
        }

        #[test]
        fn printing_keeps_meaning(sel in selector_strategy(), keys in prop::collection::btree_map(label_strategy(), value_strategy(), 0..4)) {
            let reparsed = Selector::parse(&sel.to_string()).unwrap();
            prop_assert_eq!(reparsed.matches(&keys), sel.matches(&keys));
        }

        #[test]
        fn parser_never_panics(input in "[a-z!&|=(){}'\" ,\t]{0,40}") {
            let _ = Selector::parse(&input);
        }
    }
}
