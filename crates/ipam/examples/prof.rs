use gingham_ipam::{AutoAssign, IpamClient};
use gingham_store::{Datastore, ResourceStore};
use std::sync::Arc;
use std::time::Instant;
#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let ds: Arc<dyn Datastore> =
        Arc::new(gingham_store::embedded::EmbeddedStore::open(dir.path().join("p.db")).unwrap());
    let rs = ResourceStore::new(ds.clone());
    for d in gingham_api::parse_documents("b", "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.128.0.0/12, blockSize: 26}\n").unwrap() { rs.apply(d.object).await.unwrap(); }
    let ipam = IpamClient::new(ds.clone());
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        ipam.pools().await.unwrap();
    }
    println!("pools {:?}", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        ipam.settings().await.unwrap();
    }
    println!("settings {:?}", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        ipam.affine_blocks("x", true).await.unwrap();
    }
    println!("affine {:?}", t.elapsed() / n);
    let t = Instant::now();
    for i in 0..n {
        ipam.auto_assign(&AutoAssign { num_v4: 1, handle: format!("h{i}"), node: "x".into(), ..Default::default() })
            .await
            .unwrap();
    }
    println!("assign {:?}", t.elapsed() / n);
    let c: Arc<dyn Datastore> = Arc::new(gingham_store::testing::CountingStore::new(ds.clone()));
    let ip2 = IpamClient::new(c);
    let t = Instant::now();
    for i in 0..2000 {
        ip2.auto_assign(&AutoAssign {
            num_v4: 1,
            handle: format!("k8s-pod-network.1-0-{i}"),
            node: "bench-node-1-0".into(),
            attrs: [("node".to_string(), "bench-node-1-0".to_string()), ("pod".to_string(), format!("p{i}"))].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    println!("assign-bench-like {:?}", t.elapsed() / 2000);
    let t = Instant::now();
    for i in 0..n {
        ds.create(&format!("/k/{i}"), &[b'x'; 8000]).await.unwrap();
    }
    println!("create8k {:?}", t.elapsed() / n);
}
#[allow(dead_code)]
fn unused() {}
