//! A Docker engine for the tests, and the test image.
//!
//! [`ensure_engine`] starts `dockerd` when its socket does not answer (the CI machines
//! have the package but no running daemon) and waits for it; [`ensure_image`] builds
//! the test image from Debian's busybox-static with `docker import` (there is no image
//! registry here). When neither can be done the tests fail, saying what to install:
//! they never skip.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The image every docker test runs: busybox, a `nobody` user, nothing else.
pub const TEST_IMAGE: &str = "cloudpipe-test/busybox:2";

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure a Docker engine answers on the default socket, starting one if needed.
/// Panics, saying what is missing, when it cannot.
pub fn ensure_engine() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if docker_answers() {
            return Ok(());
        }
        if !Path::new("/usr/sbin/dockerd").exists() && which("dockerd").is_none() {
            return Err("dockerd is not installed: apt-get install -y docker.io".into());
        }
        // Started detached: it outlives this test process, and the next test run
        // finds it answering.
        let log = std::fs::File::create(std::env::temp_dir().join("cloudpipe-test-dockerd.log"))
            .map_err(|e| e.to_string())?;
        Command::new("setsid")
            .arg("dockerd")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if docker_answers() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err("dockerd did not answer within 60 s (see the temp dir's cloudpipe-test-dockerd.log)"
            .into())
    });
    if let Err(e) = ready {
        panic!("THE DOCKER TESTS CANNOT RUN: {e}");
    }
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

/// Makes sure [`TEST_IMAGE`] exists: a root file system of busybox-static, imported.
pub fn ensure_image() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    ensure_engine();
    let ready = READY.get_or_init(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", TEST_IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            return Ok(());
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or("busybox is not installed: apt-get install -y busybox-static")?;
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let r = root.path();
        for d in ["bin", "tmp", "etc", "data"] {
            std::fs::create_dir_all(r.join(d)).map_err(|e| e.to_string())?;
        }
        std::fs::copy(busybox, r.join("bin/busybox")).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| e.to_string())?;
        let applets = Command::new(busybox).arg("--list").output().map_err(|e| e.to_string())?;
        for applet in String::from_utf8_lossy(&applets.stdout).lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(applet));
            }
        }
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(r.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
            .map_err(|e| e.to_string())?;
        std::fs::write(r.join("data/answer.txt"), "42\n").map_err(|e| e.to_string())?;
        let tar = Command::new("tar")
            .args(["-C"])
            .arg(r)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = Command::new("docker")
            .args(["import", "--change", "ENV PATH=/bin", "-", TEST_IMAGE])
            .stdin(tar.stdout.ok_or("tar's stdout")?)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("docker import failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    });
    if let Err(e) = ready {
        panic!("THE DOCKER TESTS CANNOT RUN: {e}");
    }
}

/// Containers of any server whose label says it is a Cloudpipe job's.
pub fn job_containers(job_id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=cloudpipe.job={job_id}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// A Docker registry (Debian's `docker-registry`) on 127.0.0.1 with its storage in a
/// temporary directory; killed when dropped. The engine treats registries on
/// 127.0.0.0/8 as insecure by default, so it pulls from this one over plain HTTP.
pub struct Registry {
    child: std::process::Child,
    /// `127.0.0.1:PORT`: the registry part of its images' references.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one and waits until it answers; panics saying what to install when it
    /// cannot.
    pub fn start() -> Registry {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!("THE REGISTRY TESTS CANNOT RUN: apt-get install -y docker-registry")
        });
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry { child, host, _dir: dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(&registry.host).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "docker-registry did not listen on {} within 30 s: {}",
                registry.host,
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes the local image `local` as `REGISTRY/name` and removes that reference
    /// from the engine (the layers stay: the image itself is still `local`), so the
    /// engine must pull `REGISTRY/name` to have it. Returns the reference.
    pub fn push(&self, local: &str, name: &str) -> String {
        let reference = format!("{}/{name}", self.host);
        let docker = |args: &[&str]| {
            let out = Command::new("docker").args(args).output().expect("running docker");
            assert!(
                out.status.success(),
                "docker {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        };
        docker(&["tag", local, &reference]);
        docker(&["push", "--quiet", &reference]);
        docker(&["image", "rm", &reference]);
        reference
    }

    /// Stops it (references to it then fail to pull).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
