//! `gingham node status`: the BGP sessions of the agent on this node, in calicoctl's layout
//! (read from the agent's health port, as calicoctl reads BIRD's socket).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// GET a path from the agent's health server; the body, or why not.
fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    // One write: a request line split over segments must not depend on the server's reads.
    let req = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.take(16 << 20).read_to_string(&mut body).map_err(|e| e.to_string())?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).ok_or_else(|| "malformed response".into())
}

fn peer_type(name: &str) -> &'static str {
    match name.split('_').next() {
        Some("Mesh") => "node-to-node mesh",
        Some("Global") => "global",
        Some("Node") => "node specific",
        _ => "unknown",
    }
}

/// HH:MM:SS (UTC) of a Unix time, as BIRD shows a change made today.
fn clock(secs: u64) -> String {
    let d = secs % 86_400;
    format!("{:02}:{:02}:{:02}", d / 3600, d % 3600 / 60, d % 60)
}

/// A bordered table with centred headers, as calicoctl prints it.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].len()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let rule = format!("+{}+\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let mut out = rule.clone();
    let cells: Vec<String> = headers.iter().zip(&widths).map(|(h, w)| format!(" {h:^w$} ")).collect();
    out.push_str(&format!("|{}|\n", cells.join("|")));
    out.push_str(&rule);
    for r in rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!(" {c:<w$} ")).collect();
        out.push_str(&format!("|{}|\n", cells.join("|")));
    }
    out.push_str(&rule);
    out
}

pub fn render(status: &Value, detail: bool) -> String {
    let mut out = String::from("gingham process is running.\n");
    if status["running"] != Value::Bool(true) {
        out.push_str(
            "\nThe BGP speaker is not running (this node's backend is not bird, or it has no IPv4 address yet).\n",
        );
        return out;
    }
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        out.push_str(&format!("\n{family} BGP status\n"));
        let mine: Vec<&Value> =
            peers.iter().filter(|p| p["address"].as_str().is_some_and(|a| a.contains(':') == v6)).collect();
        if mine.is_empty() {
            out.push_str(&format!("No {family} peers found.\n"));
            continue;
        }
        let rows: Vec<Vec<String>> = mine
            .iter()
            .map(|p| {
                let state = p["state"].as_str().unwrap_or("");
                let mut info = state.to_string();
                if let Some(e) = p["info"].as_str().filter(|_| state != "Established") {
                    info.push_str(&format!(" {e}"));
                }
                vec![
                    p["address"].as_str().unwrap_or("").to_string(),
                    peer_type(p["name"].as_str().unwrap_or("")).to_string(),
                    if state == "Established" { "up" } else { "start" }.to_string(),
                    clock(p["since"].as_u64().unwrap_or(0)),
                    info,
                ]
            })
            .collect();
        out.push_str(&table(&["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"], &rows));
        if detail {
            for p in &mine {
                out.push_str(&format!(
                    "\n{} ({}):\n",
                    p["name"].as_str().unwrap_or(""),
                    p["address"].as_str().unwrap_or("")
                ));
                out.push_str(&format!(
                    "  prefixes received {}, advertised {}, flaps {}\n",
                    p["received"], p["advertised"], p["flaps"]
                ));
                if let Some(e) = p["info"].as_str() {
                    out.push_str(&format!("  last error: {e}\n"));
                }
                let n = &p["negotiated"];
                if n.is_object() {
                    out.push_str(&format!(
                        "  remote AS {}, router ID {}, hold time {} s, keepalive {} s\n  families {}, 4-octet AS {}, route refresh {}, graceful restart {}\n  ADD-PATH receive {}, send {}\n",
                        n["remote_as"],
                        n["remote_id"].as_str().unwrap_or(""),
                        n["hold_time"],
                        n["keepalive"],
                        list(&n["families"]),
                        n["four_octet_as"],
                        n["route_refresh"],
                        n["graceful_restart"].as_u64().map_or("no".to_string(), |t| format!("{t} s")),
                        list(&n["add_path_rx"]),
                        list(&n["add_path_tx"]),
                    ));
                }
            }
        }
    }
    out
}

fn list(v: &Value) -> String {
    let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if items.is_empty() { "none".into() } else { items.join(" ") }
}

pub fn render_routes(routes: &Value) -> String {
    let rows: Vec<Vec<String>> = routes
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                r["prefix"].as_str().unwrap_or("").to_string(),
                r["from"].as_str().unwrap_or("").to_string(),
                r["as_path"].as_str().unwrap_or("").to_string(),
                r["attributes"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "No BGP routes.\n".into();
    }
    table(&["PREFIX", "FROM", "AS PATH", "ATTRIBUTES"], &rows)
}

/// Per peer, the routes it sent us and those it has from us.
pub fn render_peer_routes(peers: &Value) -> String {
    let rows = |v: &Value| -> Vec<Vec<String>> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                ["prefix", "next_hop", "as_path", "attributes"]
                    .iter()
                    .map(|k| r[*k].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .collect()
    };
    let mut out = String::new();
    for p in peers.as_array().into_iter().flatten() {
        let who = format!("{} ({})", p["name"].as_str().unwrap_or(""), p["address"].as_str().unwrap_or(""));
        for (what, key) in [("received from", "received"), ("advertised to", "advertised")] {
            let r = rows(&p[key]);
            out.push_str(&format!("\nRoutes {what} {who}: {}\n", r.len()));
            if !r.is_empty() {
                out.push_str(&table(&["PREFIX", "NEXT HOP", "AS PATH", "ATTRIBUTES"], &r));
            }
        }
    }
    out
}

/// Print the status; exit status 1 when the agent does not answer.
pub fn run(health: SocketAddr, routes: bool, detail: bool) -> Result<(), String> {
    let body = get(health, "/bgp/status").map_err(|e| format!("gingham process is not running ({health}: {e})"))?;
    let status: Value = serde_json::from_str(&body).map_err(|e| format!("the agent's answer is not JSON: {e}"))?;
    print!("{}", render(&status, detail));
    if routes {
        let body = get(health, "/bgp/routes").map_err(|e| format!("reading routes from {health}: {e}"))?;
        let r: Value = serde_json::from_str(&body).map_err(|e| format!("the agent's answer is not JSON: {e}"))?;
        print!("\nBGP routes (best path of each prefix)\n{}", render_routes(&r));
        let body = get(health, "/bgp/peer-routes").map_err(|e| format!("reading routes from {health}: {e}"))?;
        let p: Value = serde_json::from_str(&body).map_err(|e| format!("the agent's answer is not JSON: {e}"))?;
        print!("{}", render_peer_routes(&p));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_routes_are_listed_both_ways() {
        let p = serde_json::json!([{"name": "Mesh_10_0_0_2", "address": "10.0.0.2",
            "received": [{"prefix": "10.65.1.0/26", "next_hop": "10.0.0.2", "as_path": "", "attributes": "origin Igp, local-pref 100"}],
            "advertised": []}]);
        let out = render_peer_routes(&p);
        assert!(out.contains("Routes received from Mesh_10_0_0_2 (10.0.0.2): 1\n"), "{out}");
        assert!(out.contains("10.65.1.0/26") && out.contains("origin Igp, local-pref 100"), "{out}");
        assert!(out.contains("Routes advertised to Mesh_10_0_0_2 (10.0.0.2): 0\n"), "{out}");
    }

    #[test]
    fn renders_as_calicoctl_does() {
        let s = serde_json::json!({"running": true, "peers": [
            {"name": "Mesh_192_168_10_12", "address": "192.168.10.12", "state": "Established", "since": 26862, "info": null},
            {"name": "Global_10_0_0_9", "address": "10.0.0.9", "state": "Active", "since": 0, "info": "Connection lost"}]});
        let out = render(&s, false);
        let want = "gingham process is running.

IPv4 BGP status
+---------------+-------------------+-------+----------+------------------------+
| PEER ADDRESS  |     PEER TYPE     | STATE |  SINCE   |          INFO          |
+---------------+-------------------+-------+----------+------------------------+
| 192.168.10.12 | node-to-node mesh | up    | 07:27:42 | Established            |
| 10.0.0.9      | global            | start | 00:00:00 | Active Connection lost |
+---------------+-------------------+-------+----------+------------------------+

IPv6 BGP status
No IPv6 peers found.
";
        assert_eq!(out, want);
        assert!(render(&serde_json::json!({"running": false}), false).contains("not running"));
    }
}
