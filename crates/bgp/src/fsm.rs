//! The neighbour state machine of RFC 4271 §8, sans-I/O: the session's task feeds it events
//! (a message read, a timer fired, the TCP connection made or lost) and carries out the
//! actions it returns (connect, send, start a timer, hand an UPDATE to the RIB). One match
//! per state; the RFC's event numbers are in the comments.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::packet::{
    AddPathMode, Capability, Codec, DecodeError, Family, GracefulRestart, Message, Notification, Open, RouteRefresh,
    Update, cease, open_error,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    /// BIRD's spelling, which `node status` shows.
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
    /// Wait before starting again after an error (BIRD's "error wait time").
    IdleHold,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Event 1 (ManualStart), or Event 5 (ManualStart_with_PassiveTcpEstablishment) when the
    /// configuration is passive.
    Start,
    /// Event 2 (ManualStop), with the Cease subcode to send.
    Stop(u8),
    /// Events 9, 10, 11 and the idle-hold timer (automatic restart, Event 3).
    TimerExpired(Timer),
    /// Event 16 (Tcp_CR_Acked, our connect) or 17 (TcpConnectionConfirmed, theirs).
    TcpConnected,
    /// Event 18.
    TcpFails,
    /// Events 19 (BGPOpen), 25 (NotifMsg), 26 (KeepAliveMsg), 27 (UpdateMsg), and route refresh.
    Received(Message),
    /// Events 21, 22, 28 (BGPHeaderErr, BGPOpenMsgErr, UpdateMsgErr).
    Malformed(DecodeError),
    /// Event 23 (OpenCollisionDump): this connection lost collision detection.
    CollisionDump,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer.
    Connect,
    /// Close the TCP connection (after sending what was queued).
    Disconnect,
    Send(Message),
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// The session is up: the RIB sends this peer its routes.
    Established(Box<Negotiated>),
    Update(Update),
    /// The peer asks for our routes of a family again.
    Refresh(Family),
    /// The session is down. `keep_stale`: the peer does graceful restart and the loss was not
    /// its decision, so its routes stay (marked stale) for `restart_time`.
    Down {
        reason: String,
        keep_stale: Option<Duration>,
    },
}

/// A session's configuration as the FSM needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub local_as: u32,
    pub remote_as: u32,
    pub router_id: Ipv4Addr,
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// Only accept connections; never connect (Calico's `passive on`).
    pub passive: bool,
    pub families: Vec<Family>,
    pub add_path: AddPathMode,
    /// Our graceful-restart time in seconds; None: not offered.
    pub graceful_restart: Option<u16>,
    /// We have restarted and kept our forwarding state (the R and F bits in our OPEN).
    pub restarting: bool,
}

impl Config {
    pub fn new(local_as: u32, remote_as: u32, router_id: Ipv4Addr) -> Config {
        Config {
            local_as,
            remote_as,
            router_id,
            // BIRD's defaults, which Calico keeps.
            hold_time: 240,
            connect_retry: Duration::from_secs(5),
            passive: false,
            families: Family::ALL.to_vec(),
            add_path: AddPathMode::Both,
            graceful_restart: Some(120),
            restarting: false,
        }
    }

    pub fn ibgp(&self) -> bool {
        self.local_as == self.remote_as
    }

    pub fn open(&self) -> Open {
        let mut caps: Vec<Capability> = self.families.iter().map(|f| Capability::Multiprotocol(*f)).collect();
        caps.push(Capability::RouteRefresh);
        if let Some(time) = self.graceful_restart {
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restarting: self.restarting,
                time,
                families: self.families.iter().map(|f| (*f, self.restarting)).collect(),
            }));
        }
        caps.push(Capability::AddPath(self.families.iter().map(|f| (*f, self.add_path)).collect()));
        Open::new(self.local_as, self.hold_time, self.router_id, caps)
    }
}

/// What both OPENs agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub remote_id: Ipv4Addr,
    pub remote_as: u32,
    /// Zero: no keepalives and no hold timer.
    pub hold_time: u16,
    pub keepalive: u16,
    pub families: BTreeSet<Family>,
    pub codec: Codec,
    pub route_refresh: bool,
    pub peer_graceful_restart: Option<GracefulRestart>,
    pub open: Open,
}

/// Before an OPEN arrives the hold timer is "large" (RFC 4271 §8.2.2 suggests 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);
const IDLE_HOLD_FIRST: Duration = Duration::from_secs(5);
const IDLE_HOLD_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Fsm {
    pub config: Config,
    state: State,
    negotiated: Option<Negotiated>,
    idle_hold: Duration,
    /// Why the session last went down, for `node status` (BIRD's INFO column).
    pub last_error: Option<String>,
    /// Start again after errors (cleared by Stop).
    running: bool,
}

impl Fsm {
    pub fn new(config: Config) -> Fsm {
        Fsm {
            config,
            state: State::Idle,
            negotiated: None,
            idle_hold: IDLE_HOLD_FIRST,
            last_error: None,
            running: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if let Event::Stop(subcode) = event {
            self.running = false;
            if matches!(self.state, State::OpenSent | State::OpenConfirm | State::Established) {
                out.push(Action::Send(Message::Notification(cease(subcode))));
            }
            self.to_idle(&mut out, cease(subcode).to_string(), false);
            out.push(Action::StopTimer(Timer::IdleHold));
            return out;
        }
        match self.state {
            State::Idle => match event {
                Event::Start | Event::TimerExpired(Timer::IdleHold) => {
                    self.running = true;
                    out.push(Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry));
                    if self.config.passive {
                        self.state = State::Active;
                    } else {
                        out.push(Action::Connect);
                        self.state = State::Connect;
                    }
                }
                // A connection while we are idle (between retries) is refused.
                Event::TcpConnected => out.push(Action::Disconnect),
                _ => {}
            },
            State::Connect | State::Active => match event {
                // Event 9: try again (a passive session just keeps listening).
                Event::TimerExpired(Timer::ConnectRetry) => {
                    out.push(Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry));
                    if !self.config.passive {
                        out.push(Action::Disconnect);
                        out.push(Action::Connect);
                        self.state = State::Connect;
                    }
                }
                // Events 16/17: send our OPEN.
                Event::TcpConnected => {
                    out.push(Action::StopTimer(Timer::ConnectRetry));
                    out.push(Action::Send(Message::Open(self.config.open())));
                    out.push(Action::StartTimer(Timer::Hold, OPEN_HOLD));
                    self.state = State::OpenSent;
                }
                // Event 18: wait for the retry timer.
                Event::TcpFails => self.state = State::Active,
                Event::Start | Event::TimerExpired(_) => {}
                other => self.fsm_error(&mut out, &other),
            },
            State::OpenSent => match event {
                Event::Received(Message::Open(open)) => match self.accept_open(open) {
                    Ok(n) => {
                        out.push(Action::Send(Message::Keepalive));
                        self.arm_timers(&mut out, &n);
                        self.negotiated = Some(n);
                        self.state = State::OpenConfirm;
                    }
                    Err(notification) => {
                        let why = notification.to_string();
                        out.push(Action::Send(Message::Notification(notification)));
                        self.to_idle(&mut out, why, true);
                    }
                },
                Event::TcpFails => {
                    out.push(Action::StartTimer(Timer::ConnectRetry, self.config.connect_retry));
                    out.push(Action::StopTimer(Timer::Hold));
                    out.push(Action::Disconnect);
                    self.state = State::Active;
                }
                other => self.common(&mut out, other),
            },
            State::OpenConfirm => match event {
                // Event 26: the session is up.
                Event::Received(Message::Keepalive) => {
                    let n = self.negotiated.clone().expect("negotiated in OpenSent");
                    self.restart_hold(&mut out);
                    self.idle_hold = IDLE_HOLD_FIRST;
                    self.last_error = None;
                    out.push(Action::Established(Box::new(n)));
                    self.state = State::Established;
                }
                Event::TimerExpired(Timer::Keepalive) => self.keepalive(&mut out),
                other => self.common(&mut out, other),
            },
            State::Established => match event {
                Event::Received(Message::Update(mut u)) => {
                    self.restart_hold(&mut out);
                    // RFC 7606 §7.5: LOCAL_PREF from an external peer is ignored.
                    if !self.config.ibgp() {
                        if let Some(a) = u.attrs.as_mut() {
                            a.local_pref = None;
                        }
                    }
                    out.push(Action::Update(u));
                }
                Event::Received(Message::Keepalive) => self.restart_hold(&mut out),
                Event::Received(Message::RouteRefresh(RouteRefresh { afi, safi })) => {
                    if let Some(f) = Family::from_afi_safi(afi, safi).filter(|f| self.negotiated_family(*f)) {
                        out.push(Action::Refresh(f));
                    }
                }
                Event::TimerExpired(Timer::Keepalive) => self.keepalive(&mut out),
                other => self.common(&mut out, other),
            },
        }
        out
    }

    fn negotiated_family(&self, f: Family) -> bool {
        self.negotiated.as_ref().is_some_and(|n| n.families.contains(&f))
    }

    /// What every state from OpenSent on does with the remaining events.
    fn common(&mut self, out: &mut Vec<Action>, event: Event) {
        match event {
            Event::TimerExpired(Timer::Hold) => {
                out.push(Action::Send(Message::Notification(Notification::hold_timer_expired())));
                self.to_idle(out, "Hold timer expired".into(), true);
            }
            Event::TimerExpired(_) | Event::Start => {}
            // The I/O side may have said why (the peer stopped reading, a socket error).
            Event::TcpFails => {
                let why = self.last_error.take().map_or("Connection lost".into(), |w| format!("Connection lost: {w}"));
                self.to_idle(out, why, true)
            }
            Event::Received(Message::Notification(n)) => self.to_idle(out, format!("Received: {n}"), false),
            Event::Malformed(e) => {
                out.push(Action::Send(Message::Notification(e.notification.clone())));
                self.to_idle(out, format!("Error: {e}"), false);
            }
            Event::CollisionDump => {
                out.push(Action::Send(Message::Notification(cease(7))));
                self.to_idle(out, cease(7).to_string(), false);
            }
            // A second connection reaching us now is not this one's business; refuse it.
            Event::TcpConnected => {}
            other => self.fsm_error(out, &other),
        }
    }

    fn fsm_error(&mut self, out: &mut Vec<Action>, event: &Event) {
        let what = match event {
            Event::Received(m) => m.name().to_string(),
            e => format!("{e:?}"),
        };
        if matches!(self.state, State::OpenSent | State::OpenConfirm | State::Established) {
            out.push(Action::Send(Message::Notification(Notification::fsm_error())));
        }
        self.to_idle(out, format!("FSM error: {what} in {}", self.state.name()), false);
    }

    /// Close the connection and wait before starting again (if still wanted).
    fn to_idle(&mut self, out: &mut Vec<Action>, reason: String, graceful: bool) {
        for t in [Timer::ConnectRetry, Timer::Hold, Timer::Keepalive] {
            out.push(Action::StopTimer(t));
        }
        out.push(Action::Disconnect);
        if self.state == State::Established {
            // RFC 4724 §4.2: keep the peer's routes when the session failed under it.
            let keep_stale = self
                .negotiated
                .as_ref()
                .and_then(|n| n.peer_graceful_restart.as_ref())
                .filter(|_| graceful && self.config.graceful_restart.is_some())
                .map(|g| Duration::from_secs(g.time as u64));
            out.push(Action::Down { reason: reason.clone(), keep_stale });
        }
        self.negotiated = None;
        self.last_error = Some(reason);
        self.state = State::Idle;
        if self.running {
            out.push(Action::StartTimer(Timer::IdleHold, self.idle_hold));
            self.idle_hold = (self.idle_hold * 2).min(IDLE_HOLD_MAX);
        }
    }

    fn keepalive(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Send(Message::Keepalive));
        if let Some(n) = &self.negotiated {
            out.push(Action::StartTimer(Timer::Keepalive, Duration::from_secs(n.keepalive as u64)));
        }
    }

    fn restart_hold(&mut self, out: &mut Vec<Action>) {
        if let Some(n) = self.negotiated.as_ref().filter(|n| n.hold_time > 0) {
            out.push(Action::StartTimer(Timer::Hold, Duration::from_secs(n.hold_time as u64)));
        }
    }

    fn arm_timers(&self, out: &mut Vec<Action>, n: &Negotiated) {
        if n.hold_time == 0 {
            out.push(Action::StopTimer(Timer::Hold));
        } else {
            out.push(Action::StartTimer(Timer::Hold, Duration::from_secs(n.hold_time as u64)));
            out.push(Action::StartTimer(Timer::Keepalive, Duration::from_secs(n.keepalive as u64)));
        }
    }

    /// Check the peer's OPEN against our configuration and agree on what to speak.
    fn accept_open(&self, open: Open) -> Result<Negotiated, Notification> {
        let c = &self.config;
        let remote_as = open.asn();
        if remote_as != c.remote_as {
            let data = open.my_as.to_be_bytes().to_vec();
            return Err(open_error(2, data));
        }
        // RFC 6286: within an AS the identifiers must differ.
        if c.ibgp() && open.bgp_id == c.router_id {
            return Err(open_error(3, open.bgp_id.octets().to_vec()));
        }
        let theirs: BTreeSet<Family> = open.families().into_iter().collect();
        let families: BTreeSet<Family> = c.families.iter().copied().filter(|f| theirs.contains(f)).collect();
        if families.is_empty() {
            return Err(open_error(7, vec![]));
        }
        let hold_time = c.hold_time.min(open.hold_time);
        let mut codec = Codec { four_octet_as: open.four_octet_as(), ..Default::default() };
        for f in &families {
            if let Some(m) = open.add_path(*f) {
                if c.add_path.receives() && m.sends() {
                    codec.add_path_rx.insert(*f);
                }
                if c.add_path.sends() && m.receives() {
                    codec.add_path_tx.insert(*f);
                }
            }
        }
        Ok(Negotiated {
            remote_id: open.bgp_id,
            remote_as,
            hold_time,
            keepalive: hold_time / 3,
            families,
            codec,
            route_refresh: open.route_refresh(),
            peer_graceful_restart: open.graceful_restart().cloned(),
            open,
        })
    }
}

/// RFC 4271 §6.8: of two connections to one peer, the one started by the speaker with the
/// higher BGP identifier stays. True: keep the connection we initiated.
pub fn keep_ours(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn peer_open(asn: u32, bgp_id: Ipv4Addr, hold: u16) -> Open {
        let mut c = Config::new(asn, 0, bgp_id);
        c.hold_time = hold;
        c.open()
    }

    fn up(fsm: &mut Fsm) -> Vec<Action> {
        fsm.handle(Event::Start);
        fsm.handle(Event::TcpConnected);
        fsm.handle(Event::Received(Message::Open(peer_open(64512, id(2), 90))));
        fsm.handle(Event::Received(Message::Keepalive))
    }

    #[test]
    fn a_session_comes_up_and_negotiates() {
        let mut fsm = Fsm::new(Config::new(64512, 64512, id(1)));
        let a = fsm.handle(Event::Start);
        assert!(a.contains(&Action::Connect));
        assert_eq!(fsm.state(), State::Connect);
        let a = fsm.handle(Event::TcpConnected);
        assert!(
            matches!(a.iter().find(|a| matches!(a, Action::Send(_))), Some(Action::Send(Message::Open(o))) if o.asn() == 64512)
        );
        assert_eq!(fsm.state(), State::OpenSent);
        let a = fsm.handle(Event::Received(Message::Open(peer_open(64512, id(2), 90))));
        assert!(a.contains(&Action::Send(Message::Keepalive)));
        assert!(a.contains(&Action::StartTimer(Timer::Hold, Duration::from_secs(90))));
        assert!(a.contains(&Action::StartTimer(Timer::Keepalive, Duration::from_secs(30))));
        assert_eq!(fsm.state(), State::OpenConfirm);
        let a = fsm.handle(Event::Received(Message::Keepalive));
        let Some(Action::Established(n)) = a.iter().find(|a| matches!(a, Action::Established(_))) else {
            panic!("{a:?}")
        };
        assert_eq!(n.hold_time, 90);
        assert_eq!(n.families, Family::ALL.into_iter().collect());
        assert_eq!(n.codec.add_path_rx, Family::ALL.into_iter().collect());
        assert!(n.codec.four_octet_as && n.route_refresh);
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn a_wrong_peer_as_or_our_own_identifier_is_refused() {
        let mut fsm = Fsm::new(Config::new(64512, 64512, id(1)));
        fsm.handle(Event::Start);
        fsm.handle(Event::TcpConnected);
        let a = fsm.handle(Event::Received(Message::Open(peer_open(64513, id(2), 90))));
        assert!(a.iter().any(|a| matches!(a, Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (2, 2))));
        assert!(a.contains(&Action::Disconnect));
        assert!(a.contains(&Action::StartTimer(Timer::IdleHold, IDLE_HOLD_FIRST)));
        assert_eq!(fsm.state(), State::Idle);
        // It starts again by itself; the next error waits longer.
        fsm.handle(Event::TimerExpired(Timer::IdleHold));
        fsm.handle(Event::TcpConnected);
        let a = fsm.handle(Event::Received(Message::Open(peer_open(64512, id(1), 90))));
        assert!(a.iter().any(|a| matches!(a, Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (2, 3))));
        assert!(a.contains(&Action::StartTimer(Timer::IdleHold, IDLE_HOLD_FIRST * 2)));
    }

    #[test]
    fn hold_timer_expiry_and_graceful_restart() {
        let mut fsm = Fsm::new(Config::new(64512, 64512, id(1)));
        up(&mut fsm);
        let a = fsm.handle(Event::TimerExpired(Timer::Hold));
        assert!(a.contains(&Action::Send(Message::Notification(Notification::hold_timer_expired()))));
        // The peer offered graceful restart (120 s): its routes stay, stale.
        assert!(a.contains(&Action::Down {
            reason: "Hold timer expired".into(),
            keep_stale: Some(Duration::from_secs(120))
        }));
        assert_eq!(fsm.state(), State::Idle);
        // A NOTIFICATION from the peer is its decision: nothing is kept.
        up(&mut fsm);
        let a = fsm.handle(Event::Received(Message::Notification(cease(2))));
        assert!(a.iter().any(|a| matches!(a, Action::Down { keep_stale: None, .. })));
    }

    #[test]
    fn updates_flow_only_when_established() {
        let mut fsm = Fsm::new(Config::new(64512, 64513, id(1)));
        fsm.handle(Event::Start);
        fsm.handle(Event::TcpConnected);
        // An UPDATE before the OPEN: FSM error.
        let a = fsm.handle(Event::Received(Message::Update(Update::default())));
        assert!(a.contains(&Action::Send(Message::Notification(Notification::fsm_error()))));
        fsm.handle(Event::TimerExpired(Timer::IdleHold));
        fsm.handle(Event::TcpConnected);
        fsm.handle(Event::Received(Message::Open(peer_open(64513, id(2), 0))));
        let a = fsm.handle(Event::Received(Message::Keepalive));
        let Some(Action::Established(n)) = a.iter().find(|a| matches!(a, Action::Established(_))) else { panic!() };
        assert_eq!(n.hold_time, 0);
        // eBGP: LOCAL_PREF is dropped on the way in.
        let u = Update {
            attrs: Some(crate::packet::Attrs { local_pref: Some(500), ..Default::default() }),
            ..Default::default()
        };
        let a = fsm.handle(Event::Received(Message::Update(u)));
        assert!(matches!(&a[..], [Action::Update(u)] if u.attrs.as_ref().unwrap().local_pref.is_none()), "{a:?}");
    }

    #[test]
    fn stop_sends_cease_and_stays_down() {
        let mut fsm = Fsm::new(Config::new(64512, 64512, id(1)));
        up(&mut fsm);
        let a = fsm.handle(Event::Stop(2));
        assert!(a.contains(&Action::Send(Message::Notification(cease(2)))));
        assert!(!a.iter().any(|a| matches!(a, Action::StartTimer(Timer::IdleHold, _))));
        assert_eq!(fsm.state(), State::Idle);
        assert!(fsm.handle(Event::TimerExpired(Timer::ConnectRetry)).is_empty());
    }

    #[test]
    fn passive_sessions_never_connect() {
        let mut c = Config::new(64512, 64512, id(1));
        c.passive = true;
        let mut fsm = Fsm::new(c);
        assert!(!fsm.handle(Event::Start).contains(&Action::Connect));
        assert_eq!(fsm.state(), State::Active);
        assert!(!fsm.handle(Event::TimerExpired(Timer::ConnectRetry)).contains(&Action::Connect));
        fsm.handle(Event::TcpConnected);
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn collision_keeps_the_higher_identifier() {
        assert!(keep_ours(id(2), id(1)));
        assert!(!keep_ours(id(1), id(2)));
    }
}
