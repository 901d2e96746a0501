//! The CNI plugin itself: `gingham` run by a container runtime with CNI_COMMAND set, or
//! `gingham-ipam` as another plugin's IPAM. Short and synchronous: parse, one round trip to the
//! node agent, print the result (or the spec's error JSON) and exit. It lives here, with the
//! protocol, so a small binary (`gingham-cni`) can carry it without the rest of gingham.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use crate::proto::{Attachment, DEFAULT_SOCKET, Endpoint, Request, call, exchange};
use crate::spec::{CniError, CniResult, Invocation, NetConf, SUPPORTED_VERSIONS, code};

/// How long the agent may take; runtimes time a plugin out at a few minutes (kubelet: 4 min, after
/// which it retries), so an answer within a minute is in time.
const AGENT_TIMEOUT: Duration = Duration::from_secs(55);

fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parse(v) >= parse(min)
}

/// Run one CNI command; returns what to print on stdout. Everything the request carries is read
/// and checked before the agent is asked to do anything, so bad input never leaves work behind.
fn run(
    ipam_mode: bool,
    stdin: &[u8],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Value>, (CniError, String)> {
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string();
    let inv = Invocation::from_env(&env).map_err(|e| (e, latest.clone()))?;
    if inv.command == "VERSION" {
        let asked: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        let v = asked.get("cniVersion").and_then(Value::as_str).unwrap_or(&latest).to_string();
        return Ok(Some(json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })));
    }
    let conf = NetConf::parse(stdin).map_err(|e| (e, latest.clone()))?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (e, version.clone());
    let socket = PathBuf::from(if !conf.agent_socket.is_empty() {
        conf.agent_socket.clone()
    } else {
        env("GINGHAM_AGENT_SOCKET").unwrap_or_else(|| DEFAULT_SOCKET.into())
    });
    let mut requested_ips = inv.requested_ips().map_err(fail)?;
    for ip in conf.requested_ips().map_err(fail)? {
        if !requested_ips.contains(&ip) {
            requested_ips.push(ip);
        }
    }
    let pod = inv.kubernetes_pod();
    let mut ep = Endpoint {
        network: conf.name.clone(),
        container_id: inv.container_id.clone(),
        netns: inv.netns.clone(),
        ifname: inv.ifname.clone(),
        namespace: pod.as_ref().map(|(ns, _)| ns.clone()),
        pod: pod.map(|(_, p)| p),
        labels: conf.labels(),
        mtu: conf.mtu,
        interface_prefix: conf.interface_prefix.clone(),
        ipam: conf.ipam.clone(),
        requested_ips,
        named_ports: conf.named_ports().map_err(fail)?,
        service_account: conf.service_account(),
        assigned: Vec::new(),
    };
    // Another IPAM plugin (Calico's `ipam.type: host-local`) hands out the addresses; the agent
    // does the rest. It sees the configuration as given, its podCIDR placeholders filled in.
    let delegate = match (ipam_mode, crate::delegate::is_own(&conf.ipam.kind)) {
        (false, false) if matches!(inv.command.as_str(), "ADD" | "DEL") => {
            let plugin = crate::delegate::find(&conf.ipam.kind, &inv.path).map_err(fail)?;
            let mut stdin_conf: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
            if crate::delegate::wants_pod_cidrs(&stdin_conf["ipam"]) {
                let cidrs = exchange(&socket, &Request::PodCidrs, AGENT_TIMEOUT, None).map_err(fail)?.pod_cidrs;
                let node = if conf.nodename.is_empty() { "this node" } else { conf.nodename.as_str() };
                crate::delegate::fill_pod_cidrs(&mut stdin_conf["ipam"], node, &cidrs).map_err(fail)?;
            }
            Some((plugin, stdin_conf))
        }
        _ => None,
    };
    // The pod's namespace is opened here, in the runtime's mount namespace, and handed to the
    // agent open: the path may mean nothing where the agent runs.
    let open_netns = || {
        std::fs::File::open(&inv.netns).map_err(|e| {
            fail(
                CniError::new(code::UNKNOWN_CONTAINER, format!("network namespace {} cannot be opened", inv.netns))
                    .details(e.to_string()),
            )
        })
    };
    match inv.command.as_str() {
        "ADD" => {
            // Chained after another plugin: keep what it reported, ours after it.
            let prev = match conf.prev_result.as_ref().filter(|_| !ipam_mode) {
                Some(p) => Some(CniResult::from_value(p).map_err(fail)?),
                None => None,
            };
            let ns = if ipam_mode { None } else { Some(open_netns()?) };
            if let Some((plugin, dconf)) = &delegate {
                let got = crate::delegate::exec(plugin, "ADD", dconf).map_err(fail)?;
                ep.assigned = crate::delegate::addresses(&conf.ipam.kind, got.as_ref()).map_err(fail)?;
            }
            let answer = match &ns {
                None => call(&socket, &Request::IpamAdd(ep), AGENT_TIMEOUT, None),
                Some(ns) => call(&socket, &Request::Add(ep), AGENT_TIMEOUT, Some(ns)),
            };
            let answer = match (answer, &delegate) {
                // The addresses go back to the other plugin: nothing holds them now.
                (Err(e), Some((plugin, dconf))) => {
                    let _ = crate::delegate::exec(plugin, "DEL", dconf);
                    Err(e)
                }
                (a, _) => a,
            };
            let mut result = answer.map_err(fail)?.unwrap_or_default();
            if let Some(mut merged) = prev {
                let offset = merged.interfaces.len();
                for ip in &mut result.ips {
                    ip.interface = ip.interface.map(|i| i + offset);
                }
                merged.interfaces.extend(result.interfaces);
                merged.ips.extend(result.ips);
                merged.routes.extend(result.routes);
                result = merged;
            }
            Ok(Some(result.to_version(&version)))
        }
        "DEL" => {
            // DEL needs no namespace: the host end of the veth takes the pair with it.
            let req = if ipam_mode { Request::IpamDel(ep) } else { Request::Del(ep) };
            call(&socket, &req, AGENT_TIMEOUT, None).map_err(fail)?;
            // The other plugin's addresses last: they are free only once no pod uses them.
            if let Some((plugin, dconf)) = &delegate {
                crate::delegate::exec(plugin, "DEL", dconf).map_err(fail)?;
            }
            Ok(None)
        }
        "CHECK" => {
            if !version_at_least(&version, "0.4.0") {
                return Err(fail(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("CHECK needs cniVersion 0.4.0 or later, not {version}"),
                )));
            }
            let Some(prev) = conf.prev_result.as_ref() else {
                return Err(fail(CniError::new(
                    code::INVALID_CONFIG,
                    "CHECK needs prevResult in the network configuration",
                )));
            };
            let prev = CniResult::from_value(prev).map_err(fail)?;
            if ipam_mode {
                return Ok(None);
            }
            let ns = open_netns()?;
            call(&socket, &Request::Check { endpoint: ep, prev: Some(prev) }, AGENT_TIMEOUT, Some(&ns))
                .map_err(fail)?;
            Ok(None)
        }
        "STATUS" | "GC" if !version_at_least(&version, "1.1.0") => Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{} needs cniVersion 1.1.0, not {version}", inv.command),
        ))),
        "STATUS" => {
            call(&socket, &Request::Status, AGENT_TIMEOUT, None).map_err(fail)?;
            Ok(None)
        }
        "GC" => {
            // Without the list nothing can be told apart from garbage: refuse rather than
            // remove every pod of the network (an empty list is valid: all of them are stale).
            let Some(list) = conf.other.get("cni.dev/valid-attachments") else {
                return Err(fail(CniError::new(
                    code::INVALID_CONFIG,
                    "GC needs cni.dev/valid-attachments in the network configuration",
                )));
            };
            let valid: Vec<Attachment> = serde_json::from_value(list.clone()).map_err(|e| {
                fail(
                    CniError::new(code::DECODE_FAILURE, "cni.dev/valid-attachments is not a list of attachments")
                        .details(e.to_string()),
                )
            })?;
            if let Some(bad) = valid.iter().find(|a| !crate::spec::valid_id(&a.container_id)) {
                return Err(fail(CniError::new(
                    code::INVALID_CONFIG,
                    format!("cni.dev/valid-attachments: container ID {:?} is not valid", bad.container_id),
                )));
            }
            call(&socket, &Request::Gc { network: conf.name.clone(), valid }, AGENT_TIMEOUT, None).map_err(fail)?;
            Ok(None)
        }
        other => Err(fail(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other}")))),
    }
}

/// The plugin's whole life: stdin and environment in, result or error JSON out.
pub fn main(ipam_mode: bool) -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        println!(
            "{}",
            json!({ "cniVersion": "1.1.0", "code": code::IO_FAILURE, "msg": "cannot read stdin", "details": e.to_string() })
        );
        return ExitCode::FAILURE;
    }
    match run(ipam_mode, &stdin, |k| std::env::var(k).ok()) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((mut e, version)) => {
            e.cni_version = version;
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        let m: BTreeMap<&str, &str> = pairs.iter().copied().collect();
        move |k| m.get(k).map(|v| v.to_string())
    }

    #[test]
    fn version_and_errors_without_an_agent() {
        let out = run(false, br#"{"cniVersion":"0.4.0"}"#, env(&[("CNI_COMMAND", "VERSION")])).unwrap().unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            ("GINGHAM_AGENT_SOCKET", "/nonexistent/agent.sock"),
        ];
        let (e, v) = run(false, br#"{"cniVersion":"1.0.0","name":"net","type":"gingham"}"#, env(&add)).unwrap_err();
        assert_eq!((e.code, v.as_str()), (code::TRY_AGAIN_LATER, "1.0.0"));
        assert!(e.details.contains("gingham node run"));
        let (e, _) = run(false, b"{", env(&add)).unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        let (e, _) = run(
            false,
            br#"{"cniVersion":"0.3.1","name":"net","type":"gingham"}"#,
            env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]),
        )
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let (e, _) =
            run(false, br#"{"cniVersion":"1.0.0","name":"net","type":"gingham"}"#, env(&[("CNI_COMMAND", "GC")]))
                .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    /// Malformed input is refused before the agent is asked anything (no agent runs here: an
    /// error other than 11 proves the request never left).
    #[test]
    fn bad_input_never_reaches_the_agent() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            ("GINGHAM_AGENT_SOCKET", "/nonexistent/agent.sock"),
        ];
        for prev in [r#""a string""#, "7", "[1]", r#"{"ips":"x"}"#] {
            let conf = format!(r#"{{"cniVersion":"1.0.0","name":"net","type":"gingham","prevResult":{prev}}}"#);
            let (e, _) = run(false, conf.as_bytes(), env(&add)).unwrap_err();
            assert_eq!(e.code, code::DECODE_FAILURE, "{prev}: {e}");
        }
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (e, _) =
            run(false, br#"{"cniVersion":"1.0.0","name":"net","type":"gingham","prevResult":"x"}"#, env(&check))
                .unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        let gc = [("CNI_COMMAND", "GC"), ("GINGHAM_AGENT_SOCKET", "/nonexistent/agent.sock")];
        let (e, _) = run(false, br#"{"cniVersion":"1.1.0","name":"net","type":"gingham"}"#, env(&gc)).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("cni.dev/valid-attachments"), "{e}");
        let (e, _) = run(
            false,
            br#"{"cniVersion":"1.1.0","name":"net","type":"gingham","cni.dev/valid-attachments":[{"containerID":"../x"}]}"#,
            env(&gc),
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        // An empty list is valid: it goes to the agent (absent here).
        let (e, _) = run(
            false,
            br#"{"cniVersion":"1.1.0","name":"net","type":"gingham","cni.dev/valid-attachments":[]}"#,
            env(&gc),
        )
        .unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        let (e, _) =
            run(false, br#"{"cniVersion":"1.0.0","name":"../../etc","type":"gingham"}"#, env(&add)).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let mut bad_id = add;
        bad_id[1] = ("CNI_CONTAINERID", "../../etc.c1");
        assert_eq!(
            run(false, br#"{"cniVersion":"1.0.0","name":"n","type":"gingham"}"#, env(&bad_id)).unwrap_err().0.code,
            code::INVALID_ENV
        );
    }
}
