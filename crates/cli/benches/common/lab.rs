//! A `gingham lab` for the benchmarks that need one: up on creation (its commands get the lab's
//! datastore environment), torn down on every exit path.

use std::process::Command;
use std::time::Duration;

const G: &str = env!("CARGO_BIN_EXE_gingham");

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    env: Vec<(String, String)>,
}

impl Lab {
    /// `gingham lab up --quiet <args>` under a name prefix of its own.
    pub fn up(tag: &str, args: &[&str]) -> Lab {
        let mut lab = Lab {
            dir: tempfile::tempdir().expect("tempdir"),
            prefix: format!("{tag}{}", std::process::id() % 10_000),
            env: vec![],
        };
        let mut a = vec!["lab", "up", "--quiet"];
        a.extend_from_slice(args);
        lab.ok(&a);
        lab.env = lab
            .ok(&["lab", "env"])
            .lines()
            .filter_map(|l| l.trim_start_matches("export ").split_once('=').map(|(k, v)| (k.into(), v.into())))
            .collect();
        lab
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(G);
        c.args(args).env("GINGHAM_LAB_DIR", self.dir.path()).env("GINGHAM_LAB_PREFIX", &self.prefix);
        c.envs(self.env.iter().cloned());
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("gingham runs");
        assert!(out.status.success(), "gingham {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn state(&self) -> gingham_lab::State {
        gingham_lab::State::load(self.dir.path()).expect("lab state")
    }

    /// Apply `yaml` and wait until every agent enforces it.
    pub fn apply(&self, name: &str, yaml: &str) {
        let f = self.dir.path().join(name);
        std::fs::write(&f, yaml).expect("write policy file");
        self.ok(&["apply", "-f", f.to_str().unwrap_or_default()]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(gingham_lab::wait_policy(&self.state(), Duration::from_secs(120)))
            .expect("agents enforce the policies");
    }
}

impl Lab {
    /// Delete what `apply(name, …)` applied and wait until every agent enforces the rest.
    #[allow(dead_code)] // shared by benches; not every one deletes
    pub fn delete(&self, name: &str) {
        let f = self.dir.path().join(name);
        self.ok(&["delete", "-f", f.to_str().unwrap_or_default()]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(gingham_lab::wait_policy(&self.state(), Duration::from_secs(120)))
            .expect("agents enforce the policies");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.cmd(&["lab", "down"]).output();
    }
}
