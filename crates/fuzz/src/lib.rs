//! Fuzzing on stable Rust, without cargo-fuzz: each target is a function from bytes to a check
//! that must never panic (and whose invariants must hold); inputs come from grammar-aware
//! generators (random bytes rarely pass a parser's first token) and from mutating a corpus of
//! valid inputs. `gingham-fuzz TARGET --iterations N` drives one target; inputs that panic are
//! saved and become files under `regressions/`, replayed by `cargo test -p gingham-fuzz`.

use std::panic::{AssertUnwindSafe, catch_unwind};

pub mod bgp;
pub mod generate;
pub mod targets;

/// splitmix64: small, fast, reproducible from a seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Change `input` a few times: flip, insert, delete, duplicate or splice bytes, or insert a
/// token of the target's language.
pub fn mutate(rng: &mut Rng, input: &[u8], tokens: &[&str]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = out.len();
        let at = rng.below(len + 1);
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.insert(at, rng.next() as u8),
            2 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                out.drain(at.min(len)..end);
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk: Vec<u8> = out[start..end].to_vec();
                let reps = 1 + rng.below(8);
                for _ in 0..reps {
                    out.splice(at..at, chunk.iter().copied());
                }
            }
            4 if len > 0 => {
                let i = rng.below(len);
                out[i] = *rng.pick(b"{}[]()\"':,-!&|= \n\t\\#*?@%0");
            }
            _ => {
                let t = rng.pick(tokens).as_bytes();
                out.splice(at..at, t.iter().copied());
            }
        }
    }
    out
}

/// Run one input through `target`; the panic message if it panicked.
pub fn try_one(target: fn(&[u8]), input: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| target(input))).err().map(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// A named target: its check, its generator and its mutation vocabulary.
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]),
    pub generate: fn(&mut Rng) -> Vec<u8>,
    pub corpus: fn() -> Vec<Vec<u8>>,
    pub tokens: &'static [&'static str],
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "selector",
            check: targets::selector,
            generate: generate::selector,
            corpus: generate::selector_corpus,
            tokens: generate::SELECTOR_TOKENS,
        },
        Target {
            name: "cni",
            check: targets::cni,
            generate: generate::cni_config,
            corpus: generate::cni_corpus,
            tokens: generate::JSON_TOKENS,
        },
        Target { name: "bgp", check: bgp::check, generate: bgp::generate, corpus: bgp::corpus, tokens: bgp::TOKENS },
        Target {
            name: "documents",
            check: targets::documents,
            generate: generate::document,
            corpus: generate::document_corpus,
            tokens: generate::YAML_TOKENS,
        },
    ]
}

/// Longest input tried.
pub const MAX_INPUT: usize = 64 * 1024;

/// What a run found.
#[derive(Default, Debug)]
pub struct Outcome {
    pub inputs: u64,
    pub accepted: u64,
    pub panics: Vec<(Vec<u8>, String)>,
    /// The slowest input and how long it took.
    pub slowest: (std::time::Duration, Vec<u8>),
}

/// `iterations` inputs for `t`: half generated, half mutated from the corpus or from earlier
/// inputs. Stops collecting after 20 distinct panics.
pub fn run(t: &Target, seed: u64, iterations: u64, accepted: fn(&Target, &[u8]) -> bool) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut pool = (t.corpus)();
    let mut out = Outcome::default();
    for _ in 0..iterations {
        let input = if pool.is_empty() || rng.chance(50) {
            (t.generate)(&mut rng)
        } else {
            let base = pool[rng.below(pool.len())].clone();
            let mut m = mutate(&mut rng, &base, t.tokens);
            m.truncate(MAX_INPUT);
            m
        };
        out.inputs += 1;
        let started = std::time::Instant::now();
        let result = try_one(t.check, &input);
        let took = started.elapsed();
        if took > out.slowest.0 {
            out.slowest = (took, input.clone());
        }
        match result {
            Some(msg) => {
                if out.panics.len() < 20 && !out.panics.iter().any(|(_, m)| *m == msg) {
                    out.panics.push((input, msg));
                }
            }
            None => {
                // Valid inputs are the best seeds for further mutation (small ones: mutation
                // grows inputs, and big ones only make every later run slower).
                if input.len() <= MAX_INPUT / 4 && accepted(t, &input) {
                    out.accepted += 1;
                    if pool.len() < 4096 {
                        pool.push(input);
                    } else {
                        let i = rng.below(pool.len());
                        pool[i] = input;
                    }
                }
            }
        }
    }
    out
}

/// Whether the target's parser accepted the input (the share of valid inputs shows the
/// generators reach past the first token).
pub fn accepted(t: &Target, input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    match t.name {
        "selector" => gingham_api::Selector::parse(&text).is_ok(),
        "cni" => gingham_cni::spec::NetConf::parse(input).is_ok(),
        "documents" => gingham_api::parse_documents_in("fuzz.yaml", &text, None).is_ok(),
        "bgp" => input.split_first().is_some_and(|(_, m)| {
            m.len() >= 19 && {
                let mut m = m.to_vec();
                m[..16].fill(0xff);
                let len = m.len().min(u16::MAX as usize) as u16;
                m[16..18].copy_from_slice(&len.to_be_bytes());
                gingham_bgp::packet::Message::decode(&m, &gingham_bgp::packet::Codec::default()).is_ok()
            }
        }),
        _ => false,
    }
}
