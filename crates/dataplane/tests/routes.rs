//! The route manager against the real kernel, in a namespace the test creates and removes.

use std::net::IpAddr;

use gingham_dataplane::routes::{BGP_PROTO, CALC_PROTO, Dev, RouteManager, Source, Target};
use gingham_kernel::Netlink;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = gingham_kernel::netns::delete(&self.0);
    }
}

/// BGP's equal-cost next hops become one multipath route; a resync finds it right whatever
/// order the kernel reports the hops in; the higher-priority source wins a destination and the
/// other takes over when it lets go.
#[tokio::test]
async fn ecmp_and_source_priority() {
    let a = Ns(format!("gdr-{}", std::process::id()));
    let b = Ns(format!("gdr-{}-far", std::process::id()));
    let path = gingham_kernel::netns::add(&a.0).unwrap();
    let far = gingham_kernel::netns::add(&b.0).unwrap();
    let nl = Netlink::in_namespace(&path).unwrap();
    nl.add_veth("r0", "r1", &gingham_kernel::open_netns(&far).unwrap(), 1500, None).await.unwrap();
    let i = nl.link("r0").await.unwrap().unwrap().index;
    nl.add_address(i, "10.1.0.1/24".parse().unwrap()).await.unwrap();
    nl.set_up(i).await.unwrap();
    let mut m = RouteManager::new(
        nl.clone(),
        &[Source { protocol: BGP_PROTO, priority: 5 }, Source { protocol: CALC_PROTO, priority: 10 }],
    );
    m.set_device(Dev::Underlay, Some(i));
    let g = |s: &str| s.parse::<IpAddr>().unwrap();
    let dst = "10.9.0.0/26".parse().unwrap();
    let via = |gw: &str, also: &[&str]| Target::Via {
        gateway: g(gw),
        also: also.iter().map(|a| g(a)).collect(),
        dev: Dev::Underlay,
        onlink: false,
    };
    m.set(CALC_PROTO, dst, Some(via("10.1.0.9", &[])));
    m.set(BGP_PROTO, dst, Some(via("10.1.0.3", &["10.1.0.2"])));
    m.apply().await.unwrap();
    let r = nl.routes(true).await.unwrap().into_iter().find(|r| r.dst == dst).unwrap();
    let mut hops: Vec<IpAddr> = r.gateway.iter().chain(r.also_via.iter()).copied().collect();
    hops.sort();
    assert_eq!((hops, r.protocol), (vec![g("10.1.0.2"), g("10.1.0.3")], BGP_PROTO));
    assert_eq!(m.len(), 1, "one destination programmed");
    m.mark_synced(BGP_PROTO);
    m.mark_synced(CALC_PROTO);
    let again = m.resync().await.unwrap();
    assert_eq!((again.added, again.removed), (0, 0), "the multipath route is recognised as right");
    // BGP lets go: the calculated route takes the destination.
    m.set(BGP_PROTO, dst, None);
    m.apply().await.unwrap();
    let r = nl.routes(true).await.unwrap().into_iter().find(|r| r.dst == dst).unwrap();
    assert_eq!((r.gateway, r.also_via.len(), r.protocol), (Some(g("10.1.0.9")), 0, CALC_PROTO));
    assert_eq!(m.len(), 1, "still one destination, now the calculated route");
}
