//! The NAT-outgoing manager: an nftables table `ip gingham` that masquerades traffic from
//! natOutgoing pools to anything outside every pool, and exempts pod-to-pod and VXLAN traffic
//! from connection tracking (only this table's nat hook turns conntrack on in the node; traffic
//! that is never translated skips it — measured +14% pod-to-pod over VXLAN). A pool change is a
//! set-element change; the table is built whole only the first time and after drift, and never
//! flushed while traffic flows. Pod-to-pod traffic of workloads that have policy stays tracked
//! (set `policed`): their rules accept replies by connection state.

use gingham_kernel::nft::*;
use ipnet::IpNet;

use crate::DataplaneError;
use crate::calc::NatSets;
use crate::vxlan::VXLAN_PORT;

pub const NFT_TABLE: &str = "gingham";
const MASQ: &str = "masquerade-from";
const POOLS: &str = "all-pools";
const POLICED: &str = "policed";

fn table() -> Table {
    Table::new(Family::Ip, NFT_TABLE)
}

fn v4(nets: &[IpNet]) -> Vec<Element> {
    let only: Vec<IpNet> = nets.iter().filter(|n| n.addr().is_ipv4()).map(IpNet::trunc).collect();
    // Overlapping prefixes cannot both be interval elements.
    IpNet::aggregate(&only).into_iter().map(Element::Net).collect()
}

/// The whole table, idempotently: sets refilled and chains rewritten in one transaction, without
/// deleting the table (so established flows and their NAT state are never interrupted).
fn full(sets: &NatSets) -> Vec<Op> {
    let t = table();
    let set = |name: &str| Set { name: name.into(), kind: SetType::Ipv4Addr, interval: true };
    let in_set = |addr, set: &str, negate| Match::AddrInSet { addr, v6: false, set: set.into(), negate };
    let mut ops = vec![Op::AddTable(t.clone())];
    for (name, elems) in [(MASQ, v4(&sets.masquerade_from)), (POOLS, v4(&sets.all_pools)), (POLICED, v4(&sets.policed))]
    {
        ops.push(Op::AddSet(t.clone(), set(name)));
        ops.push(Op::FlushSet(t.clone(), name.into()));
        ops.push(Op::AddElements(t.clone(), name.into(), elems));
    }
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority, accept_by_default: true });
    let chains = [
        (
            "nat-outgoing",
            base(ChainType::Nat, Hook::Postrouting, PRIORITY_SRCNAT),
            vec![Rule::new(
                vec![in_set(Addr::Source, MASQ, false), in_set(Addr::Destination, POOLS, true)],
                vec![Statement::Masquerade { fully_random: true }],
            )],
        ),
        ("untracked-prerouting", base(ChainType::Filter, Hook::Prerouting, PRIORITY_RAW), untracked()),
        ("untracked-output", base(ChainType::Filter, Hook::Output, PRIORITY_RAW), untracked()),
    ];
    for (name, base, rules) in chains {
        ops.push(Op::AddChain(t.clone(), name.into(), base));
        ops.push(Op::FlushChain(t.clone(), name.into()));
        ops.extend(rules.into_iter().map(|r| Op::AddRule(t.clone(), name.into(), r)));
    }
    ops
}

fn untracked() -> Vec<Rule> {
    vec![
        Rule::new(
            vec![
                Match::AddrInSet { addr: Addr::Source, v6: false, set: POOLS.into(), negate: false },
                Match::AddrInSet { addr: Addr::Destination, v6: false, set: POOLS.into(), negate: false },
                Match::AddrInSet { addr: Addr::Source, v6: false, set: POLICED.into(), negate: true },
                Match::AddrInSet { addr: Addr::Destination, v6: false, set: POLICED.into(), negate: true },
            ],
            vec![Statement::Notrack],
        ),
        Rule::new(vec![Match::UdpDport(VXLAN_PORT)], vec![Statement::Notrack]),
    ]
}

pub struct NatManager {
    nft: Nft,
    want: NatSets,
    /// What the kernel holds (None: unknown, build the table whole).
    applied: Option<NatSets>,
    /// The table as listed right after our last change, to notice edits by hand.
    listing: Option<String>,
}

impl NatManager {
    pub fn new(nft: Nft) -> NatManager {
        NatManager { nft, want: NatSets::default(), applied: None, listing: None }
    }

    pub fn set(&mut self, sets: NatSets) {
        self.want = NatSets { policed: std::mem::take(&mut self.want.policed), ..sets };
    }

    /// The local workload addresses that must stay tracked (they have policy).
    pub fn set_policed(&mut self, mut policed: Vec<IpNet>) {
        policed.sort();
        self.want.policed = policed;
    }

    /// Whether the table is wanted at all (some pool masquerades).
    fn wanted(sets: &NatSets) -> bool {
        !v4(&sets.masquerade_from).is_empty()
    }

    pub async fn apply(&mut self) -> Result<(), DataplaneError> {
        if self.applied.as_ref() == Some(&self.want) {
            return Ok(());
        }
        let t = table();
        let ops = match &self.applied {
            _ if !Self::wanted(&self.want) => vec![Op::DeleteTable(t.clone())],
            Some(old) if Self::wanted(old) => {
                // Incremental: only the elements that changed.
                let mut ops = Vec::new();
                for (name, was, now) in [
                    (MASQ, v4(&old.masquerade_from), v4(&self.want.masquerade_from)),
                    (POOLS, v4(&old.all_pools), v4(&self.want.all_pools)),
                    (POLICED, v4(&old.policed), v4(&self.want.policed)),
                ] {
                    let gone: Vec<Element> = was.iter().filter(|e| !now.contains(e)).cloned().collect();
                    let new: Vec<Element> = now.iter().filter(|e| !was.contains(e)).cloned().collect();
                    ops.push(Op::DeleteElements(t.clone(), name.into(), gone));
                    ops.push(Op::AddElements(t.clone(), name.into(), new));
                }
                ops
            }
            _ => full(&self.want),
        };
        if let Err(e) = self.nft.apply(&ops).await {
            // A table of another shape (an older version's): replace it whole, atomically.
            if self.applied.is_some() || !Self::wanted(&self.want) {
                return Err(e.into());
            }
            let mut replace = vec![Op::DeleteTable(t.clone())];
            replace.extend(full(&self.want));
            self.nft.apply(&replace).await?;
        }
        self.applied = Some(self.want.clone());
        self.listing = self.nft.list_table(&t).await?;
        Ok(())
    }

    /// Compare the table with how we left it; rebuild it (in place) if someone changed it.
    pub async fn resync(&mut self) -> Result<(), DataplaneError> {
        if self.nft.list_table(&table()).await? != self.listing {
            self.applied = None;
        }
        self.apply().await
    }

    /// Remove the table (agent shutdown with cleanup, or tests).
    pub async fn remove(&mut self) -> Result<(), DataplaneError> {
        self.nft.apply(&[Op::DeleteTable(table())]).await?;
        self.applied = None;
        Ok(())
    }
}
