//! The speaker's I/O, as actors around the one instance that owns every FSM and the RIB:
//! a listener task, a connect task per attempt, a reader and a writer task per connection
//! and a task per running timer. They only send messages to the instance; the instance only
//! sends bytes to writers and forwarding changes to its owner. Collision detection (RFC 4271
//! §6.8) runs here, with one FSM per connection while two race.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::fsm::{self, Action, Event, Fsm, State, Timer};
use crate::packet::{Attrs, Codec, Family, Message, MpReach, MpUnreach, Nlri, Update, cease};
use crate::rib::{Changes, FibChange, NextHop, NextHopMode, OutPath, PeerChanges, PeerId, PeerInfo, Rib};

/// Sets (or clears, with None) the TCP-MD5 key for a peer on a socket before it listens or
/// connects. The agent supplies it from crates/kernel: this crate does not touch the kernel.
pub type KeySocket = Arc<dyn Fn(RawFd, IpAddr, Option<&[u8]>) -> io::Result<()> + Send + Sync>;

/// Turns on TTL security (RFC 5082) on a socket: we send with TTL 255 and take only what
/// arrives with at least the given TTL. Also from crates/kernel.
pub type TtlSocket = Arc<dyn Fn(RawFd, u8) -> io::Result<()> + Send + Sync>;

/// What the speaker asks of its sockets beyond plain TCP.
#[derive(Clone)]
pub struct SocketHooks {
    pub md5: KeySocket,
    pub ttl_security: TtlSocket,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// BIRD's protocol name as Calico renders it (`Mesh_10_0_0_2`, `Global_…`, `Node_…`).
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub fsm: fsm::Config,
    pub rr_client: bool,
    pub next_hop: NextHopMode,
    pub allow_own_as: usize,
    /// What may come in and go out (Calico's BGPFilter); a change resets the session.
    pub filters: Arc<crate::filter::Filters>,
    pub password: Option<String>,
    /// TTL security (Calico's ttlSecurity, BIRD's `ttl security on; multihop <n>`): the peer
    /// is at most this many hops away; None: off.
    pub ttl_security: Option<u8>,
    /// The address we connect from (Calico: the node's address unless `sourceAddress: None`).
    pub source: Option<IpAddr>,
    /// The next hops we give for our own routes when the session's family differs from
    /// the connection's (IPv6 routes over an IPv4 session and the reverse).
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl PeerConfig {
    /// A peer on port 179 with nothing beyond the FSM's configuration: no password, filters,
    /// TTL security or fixed source and next hops; next hops as BIRD's default.
    pub fn new(name: impl Into<String>, address: IpAddr, fsm: fsm::Config) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            address,
            port: 179,
            fsm,
            rr_client: false,
            next_hop: NextHopMode::Auto,
            allow_own_as: 0,
            filters: Arc::default(),
            password: None,
            ttl_security: None,
            source: None,
            next_hop_v4: None,
            next_hop_v6: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub cluster_id: Option<Ipv4Addr>,
    /// Where to accept connections (port 179 in production); None: only connect.
    pub listen: Option<SocketAddr>,
    /// Bytes queued for a peer that does not read them before its session is dropped
    /// (`MAX_QUEUED`).
    pub max_queued: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub address: IpAddr,
    pub state: State,
    pub since: SystemTime,
    pub last_error: Option<String>,
    pub received: usize,
    pub advertised: usize,
    pub negotiated: Option<fsm::Negotiated>,
    pub flaps: u64,
}

pub enum Command {
    /// The whole wanted set of peers: new ones start, removed ones stop, changed ones restart
    /// only if what changed matters to the session.
    SetPeers(Vec<PeerConfig>),
    Originate(IpNet, Attrs),
    Withdraw(IpNet),
    Status(oneshot::Sender<Vec<PeerStatus>>),
    /// Every route as the Loc-RIB has it, for `node status --routes`.
    Routes(oneshot::Sender<Vec<(IpNet, String, Arc<Attrs>)>>),
    /// Per peer, what it sent us and what it has from us (at most `limit` of each).
    PeerRoutes {
        limit: usize,
        reply: oneshot::Sender<Vec<PeerRoutes>>,
    },
}

/// What one peer sent us (and we kept) and what it has from us.
#[derive(Clone, Debug)]
pub struct PeerRoutes {
    pub name: String,
    pub address: IpAddr,
    /// NLRI, next hop, attributes, stale (kept through the peer's restart).
    pub received: Vec<(Nlri, NextHop, Arc<Attrs>, bool)>,
    pub advertised: Vec<(Nlri, OutPath)>,
}

pub struct Speaker {
    pub commands: mpsc::UnboundedSender<Command>,
    /// Forwarding changes for the kernel (through the agent's route manager), a batch per
    /// UPDATE or event. Bounded: while the owner does not take them, the speaker stops reading
    /// UPDATEs (TCP pushes back on the peers) but keeps its sessions alive.
    pub fib: mpsc::Receiver<Vec<FibChange>>,
    pub task: JoinHandle<()>,
    pub listening: Option<SocketAddr>,
    accept: Option<JoinHandle<()>>,
}

/// Dropping the speaker closes its listener at once; the instance says Cease to its peers
/// and stops (its command channel is closed).
impl Drop for Speaker {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

impl Speaker {
    pub async fn status(&self) -> Vec<PeerStatus> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Status(tx));
        rx.await.unwrap_or_default()
    }
}

/// Bind the listener (if any) now, so errors are the caller's; then run.
pub async fn start(config: SpeakerConfig, keys: Option<SocketHooks>) -> io::Result<Speaker> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (fib_tx, fib_rx) = mpsc::channel(FIB_QUEUE);
    let (int_tx, int_rx) = mpsc::unbounded_channel();
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let mut listening = None;
    let bind = |addr: SocketAddr| -> io::Result<TcpListener> {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(128)
    };
    let listener = match config.listen {
        Some(addr) => {
            let l = match bind(addr) {
                // `[::]` where the kernel has no IPv6: IPv4 alone.
                Err(_) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
                    bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))?
                }
                r => r?,
            };
            listening = Some(l.local_addr()?);
            Some(Arc::new(l))
        }
        None => None,
    };
    let mut inst = Instance {
        rib: Rib::new(config.asn, config.router_id, config.cluster_id),
        config,
        peers: BTreeMap::new(),
        by_addr: HashMap::new(),
        next_id: 1,
        next_slot: 1,
        internal: int_tx.clone(),
        frames: frames_tx,
        fib: fib_tx,
        backlog: VecDeque::new(),
        backlog_changes: 0,
        sent: Arc::default(),
        sent_at_yield: 0,
        keys,
        listener: listener.clone(),
    };
    let accept = listener.map(|l| {
        let tx = int_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The instance is gone: stop listening (the port is free again).
                    _ = tx.closed() => return,
                    r = l.accept() => match r {
                        Ok((s, from)) => {
                            let _ = tx.send(Internal::Accepted(s, from));
                        }
                        // Out of descriptors and the like: wait rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                }
            }
        })
    });
    drop(int_tx);
    let task = tokio::spawn(async move { inst.run(cmd_rx, int_rx, frames_rx).await });
    Ok(Speaker { commands: cmd_tx, fib: fib_rx, task, listening, accept })
}

/// How much a connection reads at once (four maximum-size messages). Only while it reads:
/// an idle connection holds no buffer (a reflector has hundreds).
const READ_CHUNK: usize = 16 * 1024;

/// Messages read and not yet handled, from all connections together. A bounded queue is
/// fair between the readers waiting on it, so a peer flooding UPDATEs gets its turn like
/// every other and then waits, with TCP pushing back on it.
const FRAME_QUEUE: usize = 64;

/// Forwarding batches the owner has not taken; with more than `FIB_BACKLOG` changes kept
/// here besides (about 5 MB), the instance stops reading UPDATEs until the owner catches up.
const FIB_QUEUE: usize = 16;
const FIB_BACKLOG: usize = 100_000;

/// Bytes queued for a peer that does not read them: beyond this the session is dropped
/// (a full table of 100,000 routes is about 2 MB).
pub const MAX_QUEUED: usize = 64 << 20;

/// Bytes the instance queues for its writers before it lets them run.
const YIELD_AFTER_BYTES: usize = 64 * 1024;

/// A write that makes no progress for this long ends the connection (a peer holding it
/// half-open), so a writer never outlives its session for long.
const WRITE_STALL: Duration = Duration::from_secs(120);

/// What a connection's reader passes on, in the order it read it.
struct Frame {
    peer: PeerId,
    slot: u64,
    what: FromConn,
}

enum FromConn {
    Message(Vec<u8>),
    Closed(String),
}

enum Internal {
    Accepted(TcpStream, SocketAddr),
    Connected { peer: PeerId, slot: u64, stream: io::Result<TcpStream> },
    Closed { peer: PeerId, slot: u64, why: String },
    Timer { peer: PeerId, slot: u64, timer: Timer, generation: u64 },
    StaleExpired { peer: PeerId, generation: u64 },
}

struct Conn {
    write: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued for the writer and not yet written.
    queued: Arc<AtomicUsize>,
    /// Bytes queued by every connection of the instance, ever.
    sent: Arc<AtomicUsize>,
    max_queued: usize,
    local: SocketAddr,
    reader: JoinHandle<()>,
    /// Not stopped with the connection (it finishes what is queued, within `WRITE_STALL`);
    /// stopped when the peer does not read.
    writer: JoinHandle<()>,
    /// To report the connection closed when the peer stops reading.
    internal: mpsc::UnboundedSender<Internal>,
    peer: PeerId,
    slot: u64,
}

impl Conn {
    /// Queue bytes for the peer. A peer that lets `MAX_QUEUED` bytes pile up loses its
    /// connection (reported to the instance as closed).
    fn send(&self, b: Vec<u8>) {
        let n = b.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > self.max_queued {
            self.reader.abort();
            self.writer.abort();
            let why = format!("Peer does not read: over {} KiB queued", self.max_queued >> 10);
            let _ = self.internal.send(Internal::Closed { peer: self.peer, slot: self.slot, why });
            return;
        }
        self.sent.fetch_add(n, Ordering::Relaxed);
        let _ = self.write.send(b);
    }

    /// Close after what is queued.
    fn close(&self) {
        let _ = self.write.send(Vec::new());
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One FSM and its connection; two while a collision is being resolved.
struct Slot {
    id: u64,
    fsm: Fsm,
    conn: Option<Conn>,
    connecting: Option<JoinHandle<()>>,
    /// Whether we initiated this connection.
    outgoing: bool,
    timers: HashMap<Timer, (u64, JoinHandle<()>)>,
    generation: u64,
    codec: Codec,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(c) = self.connecting.take() {
            c.abort();
        }
        for (_, (_, t)) in self.timers.drain() {
            t.abort();
        }
    }
}

struct Peer {
    config: PeerConfig,
    main: Slot,
    pending: Option<Slot>,
    since: SystemTime,
    flaps: u64,
    stale: Option<(u64, JoinHandle<()>)>,
    /// Families whose End-of-RIB we still await after a graceful restart.
    awaiting_eor: BTreeSet<Family>,
}

struct Instance {
    config: SpeakerConfig,
    rib: Rib,
    peers: BTreeMap<PeerId, Peer>,
    by_addr: HashMap<IpAddr, PeerId>,
    next_id: PeerId,
    next_slot: u64,
    internal: mpsc::UnboundedSender<Internal>,
    frames: mpsc::Sender<Frame>,
    fib: mpsc::Sender<Vec<FibChange>>,
    /// Forwarding batches waiting for room in `fib`.
    backlog: VecDeque<Vec<FibChange>>,
    backlog_changes: usize,
    sent: Arc<AtomicUsize>,
    sent_at_yield: usize,
    keys: Option<SocketHooks>,
    listener: Option<Arc<TcpListener>>,
}

/// Whether a configuration change needs the session to start again.
fn resets(a: &PeerConfig, b: &PeerConfig) -> bool {
    a.address != b.address
        || a.port != b.port
        || a.fsm != b.fsm
        || a.password != b.password
        || a.source != b.source
        || a.rr_client != b.rr_client
        || a.ttl_security != b.ttl_security
        || a.filters != b.filters
        // What the RIB applies to the session's routes.
        || a.next_hop != b.next_hop
        || a.allow_own_as != b.allow_own_as
}

/// The least TTL a packet from a peer `hops` away arrives with when sent with 255.
fn min_ttl(hops: u8) -> u8 {
    (256 - u16::from(hops.max(1))) as u8
}

impl Instance {
    async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut frames: mpsc::Receiver<Frame>,
    ) {
        loop {
            let reading = self.backlog_changes < FIB_BACKLOG;
            let owed = !self.backlog.is_empty();
            let fib = self.fib.clone();
            tokio::select! {
                permit = fib.reserve(), if owed => match permit {
                    Ok(p) => {
                        let batch = self.backlog.pop_front().unwrap_or_default();
                        self.backlog_changes -= batch.len();
                        p.send(batch);
                    }
                    // The owner is gone and wants nothing more.
                    Err(_) => {
                        self.backlog.clear();
                        self.backlog_changes = 0;
                    }
                },
                Some(f) = frames.recv(), if reading => self.frame(f),
                c = commands.recv() => match c {
                    Some(c) => self.command(c),
                    None => {
                        // The owner is gone: tell every peer, then stop.
                        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
                        for id in ids {
                            self.stop_peer(id, 2);
                        }
                        return;
                    }
                },
                Some(m) = internal.recv() => self.internal(m),
            }
            // Much queued for the writers: let them send it before making more (a reflector
            // turns one UPDATE into one per client; unchecked, the queues hold a burst's all).
            let sent = self.sent.load(Ordering::Relaxed);
            if sent.wrapping_sub(self.sent_at_yield) > YIELD_AFTER_BYTES {
                self.sent_at_yield = sent;
                tokio::task::yield_now().await;
            }
        }
    }

    /// A slot for a connection we make (`outgoing`) or one the peer made (its FSM then
    /// never connects: it exists for that connection only).
    fn new_slot(&mut self, config: &PeerConfig, outgoing: bool) -> Slot {
        let id = self.next_slot;
        self.next_slot += 1;
        let mut fsm_config = config.fsm.clone();
        fsm_config.passive |= !outgoing;
        Slot {
            id,
            fsm: Fsm::new(fsm_config),
            conn: None,
            connecting: None,
            outgoing,
            timers: HashMap::new(),
            generation: 0,
            codec: Codec::default(),
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::SetPeers(list) => self.set_peers(list),
            Command::Originate(net, attrs) => {
                let ch = self.rib.originate(net, attrs);
                self.apply(ch);
            }
            Command::Withdraw(net) => {
                let ch = self.rib.withdraw_local(net);
                self.apply(ch);
            }
            Command::Status(reply) => {
                let s = self
                    .peers
                    .iter()
                    .map(|(id, p)| {
                        let (received, advertised) = self.rib.counts(*id);
                        PeerStatus {
                            name: p.config.name.clone(),
                            address: p.config.address,
                            state: p.main.fsm.state(),
                            since: p.since,
                            last_error: p.main.fsm.last_error.clone(),
                            received,
                            advertised,
                            negotiated: p.main.fsm.negotiated().cloned(),
                            flaps: p.flaps,
                        }
                    })
                    .collect();
                let _ = reply.send(s);
            }
            Command::Routes(reply) => {
                let _ = reply.send(self.rib.routes());
            }
            Command::PeerRoutes { limit, reply } => {
                let all = self
                    .peers
                    .iter()
                    .map(|(id, p)| {
                        let mut received = self.rib.received(*id);
                        let mut advertised = self.rib.advertised(*id);
                        received.truncate(limit);
                        advertised.truncate(limit);
                        PeerRoutes { name: p.config.name.clone(), address: p.config.address, received, advertised }
                    })
                    .collect();
                let _ = reply.send(all);
            }
        }
    }

    fn set_peers(&mut self, list: Vec<PeerConfig>) {
        let wanted: HashMap<IpAddr, PeerConfig> = list.into_iter().map(|p| (p.address, p)).collect();
        let gone: Vec<PeerId> =
            self.peers.iter().filter(|(_, p)| !wanted.contains_key(&p.config.address)).map(|(id, _)| *id).collect();
        for id in gone {
            self.stop_peer(id, 3);
            self.remove_peer(id);
        }
        for (addr, config) in wanted {
            match self.by_addr.get(&addr).copied() {
                Some(id) if !resets(&self.peers[&id].config, &config) => {
                    // Names and next hops change without touching the session.
                    self.peers.get_mut(&id).expect("indexed").config = config;
                }
                Some(id) => {
                    self.stop_peer(id, 6);
                    self.remove_peer(id);
                    self.add_peer(config);
                }
                None => self.add_peer(config),
            }
        }
    }

    fn add_peer(&mut self, config: PeerConfig) {
        let id = self.next_id;
        self.next_id += 1;
        self.rib.set_peer(
            id,
            PeerInfo {
                address: config.address,
                remote_as: config.fsm.remote_as,
                local_as: config.fsm.local_as,
                rr_client: config.rr_client,
                next_hop: config.next_hop,
                allow_own_as: config.allow_own_as,
                filters: config.filters.clone(),
            },
        );
        if let (Some(keys), Some(l)) = (&self.keys, &self.listener) {
            // The listener must know the key before the peer's SYN arrives.
            let _ = (keys.md5)(l.as_raw_fd(), config.address, config.password.as_deref().map(str::as_bytes));
        }
        let main = self.new_slot(&config, true);
        self.by_addr.insert(config.address, id);
        self.peers.insert(
            id,
            Peer {
                config,
                main,
                pending: None,
                since: SystemTime::now(),
                flaps: 0,
                stale: None,
                awaiting_eor: BTreeSet::new(),
            },
        );
        self.event(id, None, Event::Start);
    }

    fn remove_peer(&mut self, id: PeerId) {
        if let Some(p) = self.peers.remove(&id) {
            self.by_addr.remove(&p.config.address);
            if let (Some(keys), Some(l)) = (&self.keys, &self.listener) {
                let _ = (keys.md5)(l.as_raw_fd(), p.config.address, None);
            }
        }
        let ch = self.rib.peer_down(id, false);
        self.rib.remove_peer(id);
        self.apply(ch);
    }

    fn stop_peer(&mut self, id: PeerId, subcode: u8) {
        if self.peers.get(&id).is_some_and(|p| p.pending.is_some()) {
            let slot = self.peers[&id].pending.as_ref().map(|s| s.id);
            self.event(id, slot, Event::Stop(subcode));
        }
        self.event(id, None, Event::Stop(subcode));
    }

    fn internal(&mut self, m: Internal) {
        match m {
            Internal::Accepted(stream, from) => self.accepted(stream, from),
            Internal::Connected { peer, slot, stream } => {
                let Some(s) = self.slot_mut(peer, slot) else { return };
                s.connecting = None;
                match stream {
                    Ok(stream) => {
                        self.attach(peer, slot, stream);
                        self.event(peer, Some(slot), Event::TcpConnected);
                    }
                    Err(_) => self.event(peer, Some(slot), Event::TcpFails),
                }
            }
            Internal::Closed { peer, slot, why } => {
                if let Some(s) = self.slot_mut(peer, slot) {
                    if s.conn.is_some() {
                        s.conn = None;
                        s.fsm.last_error = Some(why);
                        self.event(peer, Some(slot), Event::TcpFails);
                    }
                }
            }
            Internal::Timer { peer, slot, timer, generation } => {
                let Some(s) = self.slot_mut(peer, slot) else { return };
                if s.timers.get(&timer).is_some_and(|(g, _)| *g == generation) {
                    s.timers.remove(&timer);
                    self.event(peer, Some(slot), Event::TimerExpired(timer));
                }
            }
            Internal::StaleExpired { peer, generation } => {
                let Some(p) = self.peers.get_mut(&peer) else { return };
                if p.stale.as_ref().is_some_and(|(g, _)| *g == generation) {
                    p.stale = None;
                    p.awaiting_eor.clear();
                    let ch = self.rib.sweep_stale(peer, None);
                    self.apply(ch);
                }
            }
        }
    }

    fn frame(&mut self, f: Frame) {
        let Frame { peer, slot, what } = f;
        match what {
            FromConn::Message(bytes) => {
                let Some(s) = self.slot_mut(peer, slot) else { return };
                let ev = match Message::decode(&bytes, &s.codec) {
                    Ok(m) => Event::Received(m),
                    Err(e) => Event::Malformed(e),
                };
                self.event(peer, Some(slot), ev);
            }
            FromConn::Closed(why) => self.internal(Internal::Closed { peer, slot, why }),
        }
    }

    fn slot_mut(&mut self, peer: PeerId, slot: u64) -> Option<&mut Slot> {
        let p = self.peers.get_mut(&peer)?;
        if p.main.id == slot {
            return Some(&mut p.main);
        }
        p.pending.as_mut().filter(|s| s.id == slot)
    }

    fn accepted(&mut self, stream: TcpStream, from: SocketAddr) {
        // IPv4 peers reach a dual-stack listener as mapped addresses.
        let addr = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let Some(id) = self.by_addr.get(&addr).copied() else { return };
        // TTL security from here on (what a far sender says next is dropped by the kernel).
        if let (Some(keys), Some(hops)) = (&self.keys, self.peers[&id].config.ttl_security) {
            if (keys.ttl_security)(stream.as_raw_fd(), min_ttl(hops)).is_err() {
                return;
            }
        }
        let state = self.peers[&id].main.fsm.state();
        match state {
            State::Idle | State::Connect | State::Active => {
                // Take their connection instead of ours (still being made, or waiting).
                let config = self.peers[&id].config.clone();
                let slot = self.new_slot(&config, false);
                let sid = slot.id;
                let p = self.peers.get_mut(&id).expect("indexed");
                p.main = slot;
                self.attach(id, sid, stream);
                self.event(id, Some(sid), Event::Start);
                self.event(id, Some(sid), Event::TcpConnected);
            }
            State::OpenSent | State::OpenConfirm if self.peers[&id].pending.is_none() => {
                let config = self.peers[&id].config.clone();
                let slot = self.new_slot(&config, false);
                let sid = slot.id;
                self.peers.get_mut(&id).expect("indexed").pending = Some(slot);
                self.attach(id, sid, stream);
                self.event(id, Some(sid), Event::Start);
                self.event(id, Some(sid), Event::TcpConnected);
            }
            // Established (or a collision already under way): the new connection loses.
            _ => {
                tokio::spawn(async move {
                    let mut s = stream;
                    if let Ok(b) = Message::Notification(cease(7)).encode(&Codec::default()) {
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.write_all(&b)).await;
                    }
                });
            }
        }
    }

    /// Start the reader and writer for a connection.
    fn attach(&mut self, peer: PeerId, slot: u64, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (rd, mut wr) = stream.into_split();
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        let frames = self.frames.clone();
        let reader = tokio::spawn(async move {
            let closed = |why: String| Frame { peer, slot, what: FromConn::Closed(why) };
            let mut buf: Vec<u8> = Vec::new();
            loop {
                // Wait with no buffer; take one only to read what has arrived.
                if let Err(e) = rd.readable().await {
                    let _ = frames.send(closed(format!("Socket: {e}"))).await;
                    return;
                }
                buf.reserve(READ_CHUNK);
                match rd.try_read_buf(&mut buf) {
                    Ok(0) => {
                        let _ = frames.send(closed("Connection closed".into())).await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness was stale: wait again, without the buffer if it holds nothing.
                        if buf.is_empty() {
                            buf = Vec::new();
                        }
                        continue;
                    }
                    Err(e) => {
                        let _ = frames.send(closed(format!("Socket: {e}"))).await;
                        return;
                    }
                }
                let mut at = 0;
                loop {
                    match Message::frame_len(&buf[at..]) {
                        Ok(Some(n)) => {
                            let what = FromConn::Message(buf[at..at + n].to_vec());
                            at += n;
                            if frames.send(Frame { peer, slot, what }).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            // Let the instance decode the bad header and answer it.
                            let what = FromConn::Message(buf[at..].to_vec());
                            let _ = frames.send(Frame { peer, slot, what }).await;
                            return;
                        }
                    }
                }
                buf.drain(..at);
                if buf.is_empty() {
                    buf = Vec::new();
                }
            }
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let left = queued.clone();
        let internal = self.internal.clone();
        let writer = tokio::spawn(async move {
            while let Some(b) = wrx.recv().await {
                if b.is_empty() {
                    break; // an empty frame: close after what was queued
                }
                let n = b.len();
                let why = match tokio::time::timeout(WRITE_STALL, wr.write_all(&b)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("Socket: {e}")),
                    Err(_) => Some(format!("Peer took nothing for {} s", WRITE_STALL.as_secs())),
                };
                if let Some(why) = why {
                    let _ = internal.send(Internal::Closed { peer, slot, why });
                    return;
                }
                left.fetch_sub(n, Ordering::Relaxed);
            }
            let _ = tokio::time::timeout(WRITE_STALL, wr.shutdown()).await;
        });
        let conn = Conn {
            write: wtx,
            queued,
            sent: self.sent.clone(),
            max_queued: self.config.max_queued,
            local,
            reader,
            writer,
            internal: self.internal.clone(),
            peer,
            slot,
        };
        if let Some(s) = self.slot_mut(peer, slot) {
            s.conn = Some(conn);
        }
    }

    /// Feed one FSM an event and carry out what it says.
    fn event(&mut self, peer: PeerId, slot: Option<u64>, ev: Event) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let sid = slot.unwrap_or(p.main.id);
        let Some(s) = (if p.main.id == sid { Some(&mut p.main) } else { p.pending.as_mut().filter(|s| s.id == sid) })
        else {
            return;
        };
        let before = s.fsm.state();
        let trace = std::env::var_os("GINGHAM_BGP_TRACE")
            .is_some()
            .then(|| format!("{ev:?}").chars().take(120).collect::<String>());
        let actions = s.fsm.handle(ev);
        if let Some(ev) = trace {
            eprintln!("bgp {} slot {sid}: {before:?} --{ev}--> {:?}", p.config.name, s.fsm.state());
        }
        for a in actions {
            self.action(peer, sid, a);
        }
        self.resolve_collision(peer);
        self.reopen_if_accepted(peer);
    }

    fn action(&mut self, peer: PeerId, sid: u64, a: Action) {
        match a {
            Action::Connect => self.connect(peer, sid),
            Action::Disconnect => {
                if let Some(s) = self.slot_mut(peer, sid) {
                    if let Some(c) = s.connecting.take() {
                        c.abort();
                    }
                    if let Some(c) = s.conn.take() {
                        c.close();
                    }
                }
                // A losing collision connection goes away entirely.
                if let Some(p) = self.peers.get_mut(&peer) {
                    if p.pending.as_ref().is_some_and(|s| s.id == sid) {
                        p.pending = None;
                    }
                }
            }
            Action::Send(m) => {
                if let Some(s) = self.slot_mut(peer, sid) {
                    if let (Some(c), Ok(b)) = (&s.conn, m.encode(&s.codec)) {
                        c.send(b);
                    }
                }
            }
            Action::StartTimer(t, d) => {
                let tx = self.internal.clone();
                if let Some(s) = self.slot_mut(peer, sid) {
                    s.generation += 1;
                    let generation = s.generation;
                    let h = tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(Internal::Timer { peer, slot: sid, timer: t, generation });
                    });
                    if let Some((_, old)) = s.timers.insert(t, (generation, h)) {
                        old.abort();
                    }
                }
            }
            Action::StopTimer(t) => {
                if let Some(s) = self.slot_mut(peer, sid) {
                    if let Some((_, h)) = s.timers.remove(&t) {
                        h.abort();
                    }
                }
            }
            Action::Established(n) => {
                // The collision is over: the established connection is the session.
                let p = self.peers.get_mut(&peer).expect("event checked");
                if p.pending.as_ref().is_some_and(|s| s.id == sid) {
                    let pending = p.pending.take().expect("checked");
                    p.main = pending;
                }
                p.main.codec = n.codec.clone();
                p.since = SystemTime::now();
                let families = n.families.clone();
                // After a graceful restart, wait for End-of-RIB of each family the peer kept.
                let kept: BTreeSet<Family> = n
                    .peer_graceful_restart
                    .as_ref()
                    .map(|g| g.families.iter().filter(|(_, f)| *f).map(|(f, _)| *f).collect())
                    .unwrap_or_default();
                if p.stale.is_some() {
                    p.awaiting_eor = kept.intersection(&families).copied().collect();
                }
                let sweep: Vec<Family> =
                    Family::ALL.into_iter().filter(|f| p.stale.is_some() && !p.awaiting_eor.contains(f)).collect();
                if p.awaiting_eor.is_empty() {
                    if let Some((_, h)) = p.stale.take() {
                        h.abort();
                    }
                }
                let mut ch = Changes::default();
                for f in sweep {
                    merge(&mut ch, self.rib.sweep_stale(peer, Some(f)));
                }
                merge(&mut ch, self.rib.peer_up(peer, families.clone(), n.codec.add_path_tx.clone()));
                self.apply(ch);
                for f in families {
                    self.send_update(peer, Update::end_of_rib(f));
                }
            }
            Action::Update(u) => {
                if let Some(f) = u.is_end_of_rib() {
                    let p = self.peers.get_mut(&peer).expect("event checked");
                    if p.awaiting_eor.remove(&f) {
                        if p.awaiting_eor.is_empty() {
                            if let Some((_, h)) = p.stale.take() {
                                h.abort();
                            }
                        }
                        let ch = self.rib.sweep_stale(peer, Some(f));
                        self.apply(ch);
                    }
                    return;
                }
                let rid = self.peers[&peer].main.fsm.negotiated().map(|n| n.remote_id).unwrap_or(Ipv4Addr::UNSPECIFIED);
                let ch = self.rib.update(peer, rid, &u);
                self.apply(ch);
            }
            Action::Refresh(f) => {
                let ch = self.rib.refresh(peer, f);
                self.apply(ch);
            }
            Action::Down { keep_stale, .. } => {
                let p = self.peers.get_mut(&peer).expect("event checked");
                p.flaps += 1;
                p.since = SystemTime::now();
                if let Some(d) = keep_stale {
                    let generation = p.stale.as_ref().map_or(1, |(g, _)| g + 1);
                    let tx = self.internal.clone();
                    let h = tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(Internal::StaleExpired { peer, generation });
                    });
                    if let Some((_, old)) = p.stale.replace((generation, h)) {
                        old.abort();
                    }
                }
                let ch = self.rib.peer_down(peer, keep_stale.is_some());
                self.apply(ch);
            }
        }
    }

    /// RFC 4271 §6.8, once either connection has the peer's OPEN: the connection opened by
    /// the speaker with the higher BGP identifier stays; the other is told so and dropped.
    fn resolve_collision(&mut self, peer: PeerId) {
        let router_id = self.config.router_id;
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(pending) = &p.pending else { return };
        let ready = |s: &Slot| matches!(s.fsm.state(), State::OpenConfirm | State::Established);
        if !(ready(pending) || ready(&p.main)) {
            return;
        }
        let Some(remote) = pending.fsm.negotiated().or(p.main.fsm.negotiated()).map(|n| n.remote_id) else { return };
        let ours_stays = fsm::keep_ours(router_id, remote);
        let main_loses = p.main.outgoing != ours_stays;
        let loser = if main_loses {
            let pending = p.pending.take().expect("checked");
            std::mem::replace(&mut p.main, pending)
        } else {
            p.pending.take().expect("checked")
        };
        if let Some(c) = &loser.conn {
            if let Ok(b) = Message::Notification(cease(7)).encode(&loser.codec) {
                c.send(b);
            }
            c.close();
        }
    }

    /// A session on a connection the peer opened has failed: we go back to connecting
    /// ourselves (unless configured passive), after the FSM's wait.
    fn reopen_if_accepted(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get(&peer) else { return };
        let m = &p.main;
        if m.outgoing
            || p.config.fsm.passive
            || m.fsm.state() != State::Idle
            || !m.timers.contains_key(&Timer::IdleHold)
        {
            return;
        }
        let config = p.config.clone();
        let slot = self.new_slot(&config, true);
        let sid = slot.id;
        self.peers.get_mut(&peer).expect("present").main = slot;
        self.action(peer, sid, Action::StartTimer(Timer::IdleHold, Duration::from_secs(5)));
    }

    fn connect(&mut self, peer: PeerId, sid: u64) {
        let Some(p) = self.peers.get(&peer) else { return };
        let target = SocketAddr::new(p.config.address, p.config.port);
        let source = p.config.source;
        let password = p.config.password.clone();
        let ttl = p.config.ttl_security;
        let keys = self.keys.clone();
        let tx = self.internal.clone();
        let h = tokio::spawn(async move {
            let stream = async {
                let sock = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                if let Some(src) = source {
                    sock.bind(SocketAddr::new(src, 0))?;
                }
                if let (Some(keys), Some(pw)) = (&keys, password) {
                    (keys.md5)(sock.as_raw_fd(), target.ip(), Some(pw.as_bytes()))?;
                }
                if let (Some(keys), Some(hops)) = (&keys, ttl) {
                    (keys.ttl_security)(sock.as_raw_fd(), min_ttl(hops))?;
                }
                tokio::time::timeout(Duration::from_secs(5), sock.connect(target))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
            }
            .await;
            let _ = tx.send(Internal::Connected { peer, slot: sid, stream });
        });
        if let Some(s) = self.slot_mut(peer, sid) {
            if let Some(old) = s.connecting.replace(h) {
                old.abort();
            }
        }
    }

    fn apply(&mut self, ch: Changes) {
        if !ch.fib.is_empty() {
            if self.backlog.is_empty() {
                if let Err(mpsc::error::TrySendError::Full(batch)) = self.fib.try_send(ch.fib) {
                    self.backlog_changes += batch.len();
                    self.backlog.push_back(batch);
                }
            } else {
                self.backlog_changes += ch.fib.len();
                self.backlog.push_back(ch.fib);
            }
        }
        for (peer, changes) in ch.peers {
            self.send_changes(peer, changes);
        }
    }

    fn send_update(&mut self, peer: PeerId, u: Update) {
        let Some(p) = self.peers.get(&peer) else { return };
        if p.main.fsm.state() != State::Established {
            return;
        }
        if let (Some(c), Ok(b)) = (&p.main.conn, Message::Update(u).encode(&p.main.codec)) {
            c.send(b);
        }
    }

    /// Pack a peer's changes into as few UPDATEs as fit: withdrawals first, then
    /// announcements grouped by identical attributes and next hop.
    fn send_changes(&mut self, peer: PeerId, ch: PeerChanges) {
        let Some(p) = self.peers.get(&peer) else { return };
        let Some(conn) = &p.main.conn else { return };
        let codec = p.main.codec.clone();
        let local = conn.local.ip();
        let (nh4, nh6) = (
            p.config.next_hop_v4.or(match local {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(a) => a.to_ipv4_mapped(),
            }),
            p.config.next_hop_v6.or(match local {
                IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => Some(a),
                _ => None,
            }),
        );
        let mut out: Vec<Update> = Vec::new();
        for family in Family::ALL {
            let add_path = codec.add_path_tx.contains(&family);
            let w: Vec<Nlri> = ch.withdraw.iter().filter(|n| Family::of(&n.prefix) == family).copied().collect();
            for chunk in pack(&w, Update::room(None, family, &codec), add_path) {
                out.push(match family {
                    Family::Ipv4Unicast => Update { withdrawn: chunk, ..Default::default() },
                    f => Update { mp_unreach: Some(MpUnreach { family: f, withdrawn: chunk }), ..Default::default() },
                });
            }
            let mut groups: HashMap<&OutPath, Vec<Nlri>> = HashMap::new();
            for (n, path) in ch.announce.iter().filter(|(n, _)| Family::of(&n.prefix) == family) {
                groups.entry(path).or_default().push(*n);
            }
            for (path, nlri) in groups {
                let next_hop: Option<IpAddr> = match (path.next_hop, family) {
                    (NextHop::Address(a), _) => Some(a),
                    (NextHop::Local, Family::Ipv4Unicast) => nh4.map(IpAddr::V4),
                    (NextHop::Local, Family::Ipv6Unicast) => nh6.map(IpAddr::V6),
                };
                let Some(next_hop) = next_hop else { continue };
                let mut attrs = (*path.attrs).clone();
                match (family, next_hop) {
                    (Family::Ipv4Unicast, IpAddr::V4(a)) => attrs.next_hop = Some(a),
                    (Family::Ipv6Unicast, _) => attrs.next_hop = None,
                    _ => continue,
                }
                let room = Update::room(Some(&attrs), family, &codec);
                for chunk in pack(&nlri, room, add_path) {
                    out.push(match family {
                        Family::Ipv4Unicast => Update { attrs: Some(attrs.clone()), nlri: chunk, ..Default::default() },
                        f => Update {
                            attrs: Some(attrs.clone()),
                            mp_reach: Some(MpReach { family: f, next_hop, link_local: None, nlri: chunk }),
                            ..Default::default()
                        },
                    });
                }
            }
        }
        for u in out {
            if let Ok(b) = Message::Update(u).encode(&codec) {
                conn.send(b);
            }
        }
    }
}

fn merge(into: &mut Changes, from: Changes) {
    into.fib.extend(from.fib);
    for (peer, c) in from.peers {
        let e = into.peers.entry(peer).or_default();
        e.announce.extend(c.announce);
        e.withdraw.extend(c.withdraw);
    }
}

/// Split NLRI into runs that fit `room` bytes.
fn pack(nlri: &[Nlri], room: usize, add_path: bool) -> Vec<Vec<Nlri>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for n in nlri {
        let len = Update::nlri_len(n, add_path);
        if used + len > room && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(*n);
        used += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
