//! nftables, typed: tables, sets, chains and rules as Rust values, applied as one atomic
//! transaction per batch, encoded as netlink messages in this process (`nft_wire`; no `nft`
//! process and no libnftables cache fetch per change: a set-element or one-chain change costs
//! a fraction of a millisecond whatever the table's size). Batches are incremental — add or
//! delete set elements, replace one chain's rules — so a change never flushes a table while
//! traffic flows. The same batch also renders as nft's language, for messages and tests.
//!
//! Listing uses libnftables, loaded at run time (`libnftables.so.1`, Debian's `nftables`
//! package), so what we show is what `nft list` shows. Its context is not thread-safe and
//! talks to the kernel of the namespace it runs in, so each [`Nft`] owns a worker thread inside
//! its namespace and serves requests in order.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use ipnet::IpNet;

use crate::nft_wire::Wire;
use crate::{KernelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        })
    }
}

/// A table of ours: family and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table {
    pub family: Family,
    pub name: String,
}

impl Table {
    pub fn new(family: Family, name: &str) -> Table {
        Table { family, name: name.into() }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// What a set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SetType {
    Ipv4Addr,
    Ipv6Addr,
    Ifname,
    /// `ipv4_addr . inet_proto . inet_service` (named ports).
    Ipv4ProtoPort,
    Ipv6ProtoPort,
}

impl SetType {
    fn as_str(self) -> &'static str {
        match self {
            SetType::Ipv4Addr => "ipv4_addr",
            SetType::Ipv6Addr => "ipv6_addr",
            SetType::Ifname => "ifname",
            SetType::Ipv4ProtoPort => "ipv4_addr . inet_proto . inet_service",
            SetType::Ipv6ProtoPort => "ipv6_addr . inet_proto . inet_service",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Element {
    /// An address or prefix (interval sets).
    Net(IpNet),
    Ifname(String),
    /// Address, IP protocol, port.
    ProtoPort(IpAddr, u8, u16),
    /// A verdict-map entry: interface name → jump to chain.
    IfJump(String, String),
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Element::Net(n) => write!(f, "{}", n.trunc()),
            Element::Ifname(s) => write!(f, "\"{s}\""),
            Element::ProtoPort(a, p, n) => write!(f, "{a} . {p} . {n}"),
            Element::IfJump(i, c) => write!(f, "\"{i}\" : jump {c}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub kind: SetType,
    /// Holds prefixes (which must not overlap).
    pub interval: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

/// A base chain's attachment: type, hook, priority (nft's numbers: raw -300, srcnat 100, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub accept_by_default: bool,
}

pub const PRIORITY_RAW: i32 = -300;
pub const PRIORITY_FILTER: i32 = 0;
pub const PRIORITY_SRCNAT: i32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    Source,
    Destination,
}

/// One match of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ip saddr @set` (or `!= @set`); `v6` picks `ip6`.
    AddrInSet {
        addr: Addr,
        v6: bool,
        set: String,
        negate: bool,
    },
    /// `ip saddr 10.0.0.0/8`.
    Addr {
        addr: Addr,
        net: IpNet,
        negate: bool,
    },
    UdpDport(u16),
    TcpDport(u16),
    Iifname(String),
    Oifname(String),
    /// `iifname "cali*"`: every interface with the prefix.
    IifnamePrefix(String),
    OifnamePrefix(String),
    /// `ct state established,related`.
    CtEstablished,
    CtInvalid,
    /// `meta nfproto ipv6` (or ipv4).
    NfProto {
        v6: bool,
    },
    /// `meta l4proto 6` (or `!=`).
    L4Proto {
        proto: u8,
        negate: bool,
    },
    /// `th dport { 80, 8000-8080 }` (or sport; or `!=`).
    Ports {
        addr: Addr,
        ranges: Vec<(u16, u16)>,
        negate: bool,
    },
    /// `ip saddr { 10.0.0.0/8, 10.1.0.1 }` (or `!=`); the nets must not overlap.
    AddrIn {
        addr: Addr,
        v6: bool,
        nets: Vec<IpNet>,
        negate: bool,
    },
    /// `ip daddr . meta l4proto . th dport @set` (named ports).
    AddrProtoPortInSet {
        addr: Addr,
        v6: bool,
        set: String,
        negate: bool,
    },
    /// `icmp type 8 icmp code 0` (or icmpv6; negated: the type/code pair is not this one).
    Icmp {
        v6: bool,
        kind: u8,
        code: Option<u8>,
        negate: bool,
    },
    /// `icmpv6 type { … }`.
    Icmpv6Types(Vec<u8>),
    /// `meta mark & bits == bits` (all set) or `== 0` (none set).
    Mark {
        bits: u32,
        set: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Statement {
    Counter,
    Accept,
    Drop,
    Return,
    Jump(String),
    Notrack,
    Masquerade {
        fully_random: bool,
    },
    Goto(String),
    /// `meta mark set meta mark | bits`.
    MarkSet(u32),
    /// `meta mark set meta mark & ~bits`.
    MarkClear(u32),
    /// `log prefix "…"` (letters, digits, space, `-_:.` only).
    Log(String),
    /// `iifname vmap @map` (or oifname).
    IfnameVmap {
        input: bool,
        map: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub statements: Vec<Statement>,
}

/// One step of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the table if missing (idempotent).
    AddTable(Table),
    /// Remove the table and all it holds; absent is fine.
    DeleteTable(Table),
    /// Create the set if missing.
    AddSet(Table, Set),
    /// Empty the set.
    FlushSet(Table, String),
    AddElements(Table, String, Vec<Element>),
    DeleteElements(Table, String, Vec<Element>),
    /// Create the chain if missing (a base chain when attached).
    AddChain(Table, String, Option<BaseChain>),
    /// Remove every rule of the chain.
    FlushChain(Table, String),
    AddRule(Table, String, Rule),
    DeleteChain(Table, String),
    /// Create a verdict map keyed by interface name, if missing.
    AddIfnameVmap(Table, String),
    DeleteSet(Table, String),
}

pub(crate) fn check_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 255
        && n.as_bytes()[0].is_ascii_alphabetic()
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok { Ok(()) } else { Err(KernelError::Nft(format!("{n:?} is not a valid nftables name"))) }
}

pub(crate) fn check_ifname(n: &str) -> Result<()> {
    if n.is_empty() || n.len() > 15 || !n.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        return Err(KernelError::Nft(format!("{n:?} is not an interface name")));
    }
    Ok(())
}

impl Match {
    fn render(&self, out: &mut String) -> Result<()> {
        let fam = |v6: bool| if v6 { "ip6" } else { "ip" };
        let dir = |a: Addr| if a == Addr::Source { "saddr" } else { "daddr" };
        let not = |n: bool| if n { "!= " } else { "" };
        match self {
            Match::AddrInSet { addr, v6, set, negate } => {
                check_name(set)?;
                write!(out, "{} {} {}@{set}", fam(*v6), dir(*addr), not(*negate))
            }
            Match::Addr { addr, net, negate } => {
                write!(out, "{} {} {}{}", fam(net.addr().is_ipv6()), dir(*addr), not(*negate), Element::Net(*net))
            }
            Match::UdpDport(p) => write!(out, "udp dport {p}"),
            Match::TcpDport(p) => write!(out, "tcp dport {p}"),
            Match::Iifname(n) => {
                check_ifname(n)?;
                write!(out, "iifname \"{n}\"")
            }
            Match::Oifname(n) => {
                check_ifname(n)?;
                write!(out, "oifname \"{n}\"")
            }
            Match::IifnamePrefix(n) | Match::OifnamePrefix(n) => {
                check_ifname(n)?;
                let dir = if matches!(self, Match::IifnamePrefix(_)) { "iifname" } else { "oifname" };
                write!(out, "{dir} \"{n}*\"")
            }
            Match::CtEstablished => write!(out, "ct state established,related"),
            Match::CtInvalid => write!(out, "ct state invalid"),
            Match::NfProto { v6 } => write!(out, "meta nfproto {}", if *v6 { "ipv6" } else { "ipv4" }),
            Match::L4Proto { proto, negate } => write!(out, "meta l4proto {}{proto}", not(*negate)),
            Match::Ports { addr, ranges, negate } => {
                let list: Vec<String> = ranges
                    .iter()
                    .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
                    .collect();
                let port = if *addr == Addr::Source { "sport" } else { "dport" };
                write!(out, "th {port} {}{{ {} }}", not(*negate), list.join(", "))
            }
            Match::AddrIn { addr, v6, nets, negate } => {
                if nets.is_empty() || nets.iter().any(|n| n.addr().is_ipv6() != *v6) {
                    return Err(KernelError::Nft(format!("address list {nets:?} is empty or of the other family")));
                }
                let list: Vec<String> = nets.iter().map(|n| Element::Net(*n).to_string()).collect();
                write!(out, "{} {} {}{{ {} }}", fam(*v6), dir(*addr), not(*negate), list.join(", "))
            }
            Match::AddrProtoPortInSet { addr, v6, set, negate } => {
                check_name(set)?;
                let port = if *addr == Addr::Source { "sport" } else { "dport" };
                write!(out, "{} {} . meta l4proto . th {port} {}@{set}", fam(*v6), dir(*addr), not(*negate))
            }
            Match::Icmp { v6, kind, code, negate } => {
                let i = if *v6 { "icmpv6" } else { "icmp" };
                match (code, negate) {
                    (None, _) => write!(out, "{i} type {}{kind}", not(*negate)),
                    (Some(c), false) => write!(out, "{i} type {kind} {i} code {c}"),
                    (Some(c), true) => write!(out, "{i} type . {i} code != {{ {kind} . {c} }}"),
                }
            }
            Match::Icmpv6Types(types) => {
                let list: Vec<String> = types.iter().map(u8::to_string).collect();
                write!(out, "icmpv6 type {{ {} }}", list.join(", "))
            }
            Match::Mark { bits, set } => {
                write!(out, "meta mark & {bits:#010x} == {:#010x}", if *set { *bits } else { 0 })
            }
        }
        .map_err(|e| KernelError::Nft(e.to_string()))
    }
}

impl Statement {
    fn render(&self, out: &mut String) -> Result<()> {
        match self {
            Statement::Counter => out.push_str("counter"),
            Statement::Accept => out.push_str("accept"),
            Statement::Drop => out.push_str("drop"),
            Statement::Return => out.push_str("return"),
            Statement::Jump(c) => {
                check_name(c)?;
                out.push_str("jump ");
                out.push_str(c);
            }
            Statement::Notrack => out.push_str("notrack"),
            Statement::Masquerade { fully_random } => {
                out.push_str(if *fully_random { "masquerade fully-random" } else { "masquerade" })
            }
            Statement::Goto(c) => {
                check_name(c)?;
                out.push_str("goto ");
                out.push_str(c);
            }
            Statement::MarkSet(b) => out.push_str(&format!("meta mark set meta mark | {b:#010x}")),
            Statement::MarkClear(b) => out.push_str(&format!("meta mark set meta mark & {:#010x}", !b)),
            Statement::Log(p) => {
                if p.len() > 127 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b" -_:.".contains(&b)) {
                    return Err(KernelError::Nft(format!("{p:?} is not a log prefix")));
                }
                out.push_str(&format!("log prefix \"{p}\""));
            }
            Statement::IfnameVmap { input, map } => {
                check_name(map)?;
                out.push_str(if *input { "iifname vmap @" } else { "oifname vmap @" });
                out.push_str(map);
            }
        }
        Ok(())
    }
}

impl Rule {
    pub fn new(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
        Rule { matches, statements }
    }
    fn render(&self, out: &mut String) -> Result<()> {
        for m in &self.matches {
            m.render(out)?;
            out.push(' ');
        }
        for (i, s) in self.statements.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            s.render(out)?;
        }
        Ok(())
    }
}

fn elements(out: &mut String, elems: &[Element]) -> Result<()> {
    out.push_str("{ ");
    for (i, e) in elems.iter().enumerate() {
        match e {
            Element::Ifname(n) => check_ifname(n)?,
            Element::IfJump(n, c) => {
                check_ifname(n)?;
                check_name(c)?;
            }
            _ => {}
        }
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{e}");
    }
    out.push_str(" }");
    Ok(())
}

impl Op {
    fn render(&self, out: &mut String) -> Result<()> {
        let table = |t: &Table| check_name(&t.name).map(|()| t.to_string());
        match self {
            Op::AddTable(t) => {
                let _ = writeln!(out, "add table {}", table(t)?);
            }
            // Create-then-delete: deleting an absent table is then not an error.
            Op::DeleteTable(t) => {
                let t = table(t)?;
                let _ = writeln!(out, "add table {t}\ndelete table {t}");
            }
            Op::AddSet(t, s) => {
                check_name(&s.name)?;
                let flags = if s.interval { " flags interval;" } else { "" };
                let _ = writeln!(out, "add set {} {} {{ type {};{flags} }}", table(t)?, s.name, s.kind.as_str());
            }
            Op::FlushSet(t, s) => {
                check_name(s)?;
                let _ = writeln!(out, "flush set {} {s}", table(t)?);
            }
            Op::AddElements(t, s, e) | Op::DeleteElements(t, s, e) => {
                if e.is_empty() {
                    return Ok(());
                }
                check_name(s)?;
                let verb = if matches!(self, Op::AddElements(..)) { "add" } else { "delete" };
                let _ = write!(out, "{verb} element {} {s} ", table(t)?);
                elements(out, e)?;
                out.push('\n');
            }
            Op::AddChain(t, c, base) => {
                check_name(c)?;
                let _ = write!(out, "add chain {} {c}", table(t)?);
                if let Some(b) = base {
                    let kind = if b.kind == ChainType::Nat { "nat" } else { "filter" };
                    let hook = match b.hook {
                        Hook::Prerouting => "prerouting",
                        Hook::Input => "input",
                        Hook::Forward => "forward",
                        Hook::Output => "output",
                        Hook::Postrouting => "postrouting",
                    };
                    let policy = if b.accept_by_default { "accept" } else { "drop" };
                    let _ = write!(out, " {{ type {kind} hook {hook} priority {}; policy {policy}; }}", b.priority);
                }
                out.push('\n');
            }
            Op::FlushChain(t, c) => {
                check_name(c)?;
                let _ = writeln!(out, "flush chain {} {c}", table(t)?);
            }
            Op::AddRule(t, c, r) => {
                check_name(c)?;
                let _ = write!(out, "add rule {} {c} ", table(t)?);
                r.render(out)?;
                out.push('\n');
            }
            Op::DeleteChain(t, c) => {
                check_name(c)?;
                let _ = writeln!(out, "delete chain {} {c}", table(t)?);
            }
            Op::AddIfnameVmap(t, m) => {
                check_name(m)?;
                let _ = writeln!(out, "add map {} {m} {{ type ifname : verdict; }}", table(t)?);
            }
            Op::DeleteSet(t, s) => {
                check_name(s)?;
                let _ = writeln!(out, "delete set {} {s}", table(t)?);
            }
        }
        Ok(())
    }
}

/// The batch as nft's language (what is applied, for messages and tests).
pub fn render(ops: &[Op]) -> Result<String> {
    let mut out = String::new();
    for op in ops {
        op.render(&mut out)?;
    }
    Ok(out)
}

// --- libnftables, loaded at run time -----------------------------------------------------------

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Lib {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
    run: RunCmd,
}

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: dlopen/dlsym with NUL-terminated constant names; each symbol is cast to the
        // signature libnftables documents (nftables/libnftables.h), which has been stable since
        // 0.9. The library is never unloaded.
        unsafe {
            let handle = nix::libc::dlopen(c"libnftables.so.1".as_ptr(), nix::libc::RTLD_NOW);
            if handle.is_null() {
                let why = nix::libc::dlerror();
                let why =
                    if why.is_null() { String::new() } else { CStr::from_ptr(why).to_string_lossy().into_owned() };
                return Err(format!("cannot load libnftables.so.1 (install the nftables package): {why}"));
            }
            let sym = |name: &CStr| -> std::result::Result<*mut c_void, String> {
                let p = nix::libc::dlsym(handle, name.as_ptr());
                if p.is_null() { Err(format!("libnftables has no {}", name.to_string_lossy())) } else { Ok(p) }
            };
            Ok(Lib {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym(c"nft_ctx_free")?),
                buffer_output: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(c"nft_ctx_buffer_output")?),
                buffer_error: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(c"nft_ctx_buffer_error")?),
                get_output: std::mem::transmute::<*mut c_void, CtxGetBuffer>(sym(c"nft_ctx_get_output_buffer")?),
                get_error: std::mem::transmute::<*mut c_void, CtxGetBuffer>(sym(c"nft_ctx_get_error_buffer")?),
                run: std::mem::transmute::<*mut c_void, RunCmd>(sym(c"nft_run_cmd_from_buffer")?),
            })
        }
    })
    .as_ref()
    .map_err(|e| KernelError::Nft(e.clone()))
}

/// One libnftables context, used only on the worker thread that created it.
struct Ctx {
    lib: &'static Lib,
    ctx: *mut c_void,
}

impl Ctx {
    fn new() -> Result<Ctx> {
        let lib = lib()?;
        // SAFETY: nft_ctx_new(0) returns a fresh context or NULL; the buffer calls take it.
        unsafe {
            let ctx = (lib.ctx_new)(0);
            if ctx.is_null() {
                return Err(KernelError::Nft("nft_ctx_new failed".into()));
            }
            (lib.buffer_output)(ctx);
            (lib.buffer_error)(ctx);
            Ok(Ctx { lib, ctx })
        }
    }

    /// Run commands as one transaction; the output on success, the error text otherwise.
    fn run(&mut self, cmds: &str) -> std::result::Result<String, String> {
        let c = CString::new(cmds).map_err(|_| "a NUL byte in nftables commands".to_string())?;
        // SAFETY: ctx is ours and only used on this thread; the buffers libnftables returns stay
        // valid until the next command on the context, and are copied at once.
        unsafe {
            let rc = (self.lib.run)(self.ctx, c.as_ptr());
            let text = |p: *const c_char| {
                if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().trim().to_string() }
            };
            if rc == 0 { Ok(text((self.lib.get_output)(self.ctx))) } else { Err(text((self.lib.get_error)(self.ctx))) }
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context was created by nft_ctx_new and is freed once.
        unsafe { (self.lib.ctx_free)(self.ctx) }
    }
}

type Reply<T> = tokio::sync::oneshot::Sender<std::result::Result<T, String>>;

enum Request {
    /// Commands, whether they change the ruleset (a transaction) or only read it.
    Run(String, bool, Reply<String>),
    /// A transaction, over netlink directly.
    Apply(Vec<Op>, Reply<()>),
    /// Whether anyone else committed a transaction here since the last ask.
    ChangedByOthers(Reply<bool>),
}

/// What the worker knows of the generation: the one our last transaction left, and whether
/// someone else's commit was seen in between.
#[derive(Default)]
struct Ownership {
    wire: Option<Wire>,
    ours: Option<u32>,
    others: bool,
}

impl Ownership {
    fn wire(&mut self) -> std::result::Result<&mut Wire, String> {
        if self.wire.is_none() {
            self.wire = Some(Wire::open()?);
        }
        self.wire.as_mut().ok_or_else(|| "no nftables netlink socket".to_string())
    }

    fn current(&mut self) -> std::result::Result<u32, String> {
        let r = self.wire()?.generation();
        if r.is_err() {
            self.wire = None;
        }
        r
    }

    /// Commit one transaction, noting commits by others since our last one (one generation
    /// read, after it: our commit adds one, none when it changed nothing; more is others').
    fn transaction<T>(
        &mut self,
        commit: impl FnOnce(&mut Ownership) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        let r = commit(self);
        match (self.ours, self.current().ok()) {
            (Some(o), Some(a)) => {
                self.others |= a.wrapping_sub(o) > u32::from(r.is_ok());
                self.ours = Some(a);
            }
            (None, Some(a)) => self.ours = Some(a),
            (_, None) => self.others = true,
        }
        r
    }

    fn changed_by_others(&mut self) -> std::result::Result<bool, String> {
        let now = self.current()?;
        let changed = std::mem::take(&mut self.others) || self.ours.is_some_and(|o| o != now);
        self.ours = Some(now);
        Ok(changed)
    }
}

/// nftables in one network namespace. Cheap to clone; requests run in order.
#[derive(Clone)]
pub struct Nft {
    tx: std::sync::mpsc::Sender<Request>,
}

impl Nft {
    /// nftables in this process's namespace.
    pub fn current() -> Result<Nft> {
        Self::start(None)
    }

    /// nftables in the namespace `ns` (an open namespace file).
    pub fn in_namespace_file(ns: &File) -> Result<Nft> {
        Self::start(Some(ns.try_clone().map_err(|e| KernelError::Nft(e.to_string()))?))
    }

    fn start(ns: Option<File>) -> Result<Nft> {
        lib()?;
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        std::thread::Builder::new()
            .name("nftables".into())
            .spawn(move || {
                if let Some(ns) = ns {
                    if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
                        let _ = ready_tx.send(Err(KernelError::Netns { path: "fd".into(), message: e.to_string() }));
                        return;
                    }
                }
                let mut ctx = match Ctx::new() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut ownership = Ownership::default();
                // Ends when every handle is gone.
                while let Ok(request) = rx.recv() {
                    match request {
                        Request::Run(cmds, false, reply) => drop(reply.send(ctx.run(&cmds))),
                        Request::Run(cmds, true, reply) => drop(reply.send(ownership.transaction(|_| ctx.run(&cmds)))),
                        Request::Apply(ops, reply) => {
                            drop(reply.send(ownership.transaction(|o| o.wire()?.transaction(&ops))))
                        }
                        Request::ChangedByOthers(reply) => drop(reply.send(ownership.changed_by_others())),
                    }
                }
            })
            .map_err(|e| KernelError::Nft(e.to_string()))?;
        ready_rx.recv().map_err(|_| KernelError::Nft("the nftables worker did not start".into()))??;
        Ok(Nft { tx })
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> std::result::Result<T, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx.send(request(reply)).map_err(|_| "the nftables worker has stopped".to_string())?;
        answer.await.map_err(|_| "the nftables worker has stopped".to_string())?
    }

    async fn run(&self, cmds: String) -> std::result::Result<String, String> {
        self.ask(|r| Request::Run(cmds, false, r)).await
    }

    /// Whether a transaction not made through this handle (or its clones) was committed in
    /// this namespace since the last ask — by anyone, to any table. One netlink round trip.
    pub async fn changed_by_others(&self) -> Result<bool> {
        self.ask(Request::ChangedByOthers).await.map_err(KernelError::Nft)
    }

    /// Apply `ops` as one atomic transaction: all of them or none. An error names the
    /// operation the kernel refused, in nft's language.
    pub async fn apply(&self, ops: &[Op]) -> Result<()> {
        self.apply_owned(ops.to_vec()).await
    }

    /// [`Nft::apply`] for a batch the caller is done with: a full sync's tens of thousands of
    /// rules go to the worker without a copy.
    pub async fn apply_owned(&self, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.ask(|r| Request::Apply(ops, r)).await.map_err(KernelError::Nft)
    }

    /// The same transaction through libnftables, from its text: the reference the netlink
    /// encoding is compared with (tests, benchmarks).
    pub async fn apply_with_libnftables(&self, ops: &[Op]) -> Result<()> {
        let text = render(ops)?;
        if text.is_empty() {
            return Ok(());
        }
        self.ask(|r| Request::Run(text.clone(), true, r))
            .await
            .map(|_| ())
            .map_err(|e| KernelError::Nft(format!("{e}\nin:\n{text}")))
    }

    /// The table as nft lists it, or None if it does not exist.
    pub async fn list_table(&self, t: &Table) -> Result<Option<String>> {
        check_name(&t.name)?;
        match self.run(format!("list table {t}")).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.contains("No such file or directory") => Ok(None),
            Err(e) => Err(KernelError::Nft(e)),
        }
    }

    /// One chain as nft lists it (with counters), or None if it does not exist.
    pub async fn list_chain(&self, t: &Table, chain: &str) -> Result<Option<String>> {
        check_name(&t.name)?;
        check_name(chain)?;
        match self.run(format!("list chain {t} {chain}")).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.contains("No such file or directory") => Ok(None),
            Err(e) => Err(KernelError::Nft(e)),
        }
    }

    /// Whether the table exists.
    pub async fn has_table(&self, t: &Table) -> Result<bool> {
        Ok(self.list_table(t).await?.is_some())
    }
}

/// An address as a one-address element.
pub fn host(ip: IpAddr) -> Element {
    Element::Net(IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nft_syntax_and_refuses_injection() {
        let t = Table::new(Family::Ip, "gingham");
        let ops = vec![
            Op::AddTable(t.clone()),
            Op::AddSet(t.clone(), Set { name: "pools".into(), kind: SetType::Ipv4Addr, interval: true }),
            Op::FlushSet(t.clone(), "pools".into()),
            Op::AddElements(
                t.clone(),
                "pools".into(),
                vec![Element::Net("10.0.0.0/16".parse().unwrap()), host("10.1.0.1".parse().unwrap())],
            ),
            Op::AddChain(
                t.clone(),
                "nat".into(),
                Some(BaseChain {
                    kind: ChainType::Nat,
                    hook: Hook::Postrouting,
                    priority: PRIORITY_SRCNAT,
                    accept_by_default: true,
                }),
            ),
            Op::FlushChain(t.clone(), "nat".into()),
            Op::AddRule(
                t.clone(),
                "nat".into(),
                Rule::new(
                    vec![
                        Match::AddrInSet { addr: Addr::Source, v6: false, set: "pools".into(), negate: false },
                        Match::AddrInSet { addr: Addr::Destination, v6: false, set: "pools".into(), negate: true },
                    ],
                    vec![Statement::Masquerade { fully_random: true }],
                ),
            ),
        ];
        assert_eq!(
            render(&ops).unwrap(),
            "add table ip gingham\n\
             add set ip gingham pools { type ipv4_addr; flags interval; }\n\
             flush set ip gingham pools\n\
             add element ip gingham pools { 10.0.0.0/16, 10.1.0.1 }\n\
             add chain ip gingham nat { type nat hook postrouting priority 100; policy accept; }\n\
             flush chain ip gingham nat\n\
             add rule ip gingham nat ip saddr @pools ip daddr != @pools masquerade fully-random\n"
        );
        for bad in ["x; flush ruleset", "a b", "", "9x"] {
            assert!(render(&[Op::FlushChain(t.clone(), bad.into())]).is_err(), "{bad:?}");
        }
        assert!(render(&[Op::AddElements(t, "s".into(), vec![Element::Ifname("a\"; flush".into())])]).is_err());
    }
}
