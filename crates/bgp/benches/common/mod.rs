//! What the BGP benchmarks share: a BIRD 2 daemon in a namespace, stopped on every exit path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Bird {
    child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bird {
    /// Check the configuration (BIRD's own message if it refuses it: `client`, `rr`, `other`
    /// are keywords), start BIRD inside the namespace at `ns`, wait for its control socket.
    pub fn start(ns: &Path, config: &str) -> Bird {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("bird.conf");
        let socket = dir.path().join("bird.ctl");
        std::fs::write(&conf, config).unwrap();
        let check = Command::new("bird").arg("-p").arg("-c").arg(&conf).output().expect("bird2 must be installed");
        assert!(check.status.success(), "BIRD refuses the configuration: {}", String::from_utf8_lossy(&check.stderr));
        let f = std::fs::File::open(ns).unwrap();
        let child = gingham_kernel::netns::command(&f, "bird")
            .unwrap()
            .args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird2 must be installed (scripts/install-deps.sh)");
        let bird = Bird { child, socket, _dir: dir };
        let t = Instant::now();
        while !bird.socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "BIRD did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        bird
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
