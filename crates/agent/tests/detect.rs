//! Node address autodetection against the real kernel, in a namespace the test creates.

use std::process::Command;

use gingham_agent::detect::{Autodetect, detect_address};
use gingham_kernel::Netlink;

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
}

#[tokio::test]
async fn first_found_interface_regex_and_given() {
    let ns = Ns(format!("gd-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // docker0-like and cali-like interfaces come first and must be skipped by first-found.
    ip(&["-n", &ns.0, "link", "add", "docker0", "type", "bridge"]);
    ip(&["-n", &ns.0, "addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    ip(&["-n", &ns.0, "link", "add", "cali1234", "type", "veth", "peer", "name", "ens3"]);
    ip(&["-n", &ns.0, "addr", "add", "10.0.5.7/24", "dev", "ens3"]);
    ip(&["-n", &ns.0, "link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt1"]);
    ip(&["-n", &ns.0, "addr", "add", "192.0.2.9/26", "dev", "mgmt0"]);
    let nl = Netlink::in_namespace(std::path::Path::new(&format!("/var/run/netns/{}", ns.0))).unwrap();
    let (iface, addr) = detect_address(&nl, &Autodetect::FirstFound).await.unwrap();
    assert_eq!((iface.as_str(), addr.to_string().as_str()), ("ens3", "10.0.5.7/24"));
    let (iface, addr) = detect_address(&nl, &Autodetect::Interface("mgmt[0-9]+".into())).await.unwrap();
    assert_eq!((iface.as_str(), addr.to_string().as_str()), ("mgmt0", "192.0.2.9/26"));
    assert!(detect_address(&nl, &Autodetect::Interface("mgmt".into())).await.is_err(), "the regex matches whole names");
    assert!(
        detect_address(&nl, &Autodetect::Interface("(".into()))
            .await
            .unwrap_err()
            .contains("not a valid regular expression")
    );
    let (iface, _) = detect_address(&nl, &Autodetect::Given("192.0.2.9/26".parse().unwrap())).await.unwrap();
    assert_eq!(iface, "mgmt0");
    assert!(
        detect_address(&nl, &Autodetect::Given("203.0.113.1/24".parse().unwrap()))
            .await
            .unwrap_err()
            .contains("no interface has the address")
    );
}
