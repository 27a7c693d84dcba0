//! The real binaries (`command-api`, `projector`, `jobs`) as child processes a fault test can
//! start, SIGKILL, SIGTERM and restart with the same settings.
//!
//! Integration tests start the entry points built into this package (`CARGO_BIN_EXE_chaos-*`,
//! always current); the benches start the real binaries next to them ([`sibling_binary`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// `target/<profile>` of the running executable (a test runs from `target/<profile>/deps/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// A service binary next to the running executable, for the benches: `name` (`command-api`,
/// `projector`, `jobs`) or this package's `chaos-<name>` build of it; panics with the build
/// command when neither is there.
pub fn sibling_binary(name: &str) -> PathBuf {
    let dir = profile_dir();
    [name.to_string(), format!("chaos-{name}")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "no {name} next to {}: build the services first (cargo build --release -p tests --bins)",
                dir.display()
            )
        })
}

/// A service binary run as a child process with fixed arguments and environment; it can be
/// killed and started again with the same settings. Its output goes to a log file in the temp
/// dir (printed on request when a test fails).
pub struct ServiceProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    file_size_limit: Option<u64>,
}

impl ServiceProcess {
    /// A process description; nothing runs until [`ServiceProcess::start`].
    pub fn new(name: &str, program: &Path, args: &[&str], env: BTreeMap<String, String>) -> Self {
        let log = std::env::temp_dir().join(format!(
            "broker-chaos-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        Self {
            name: name.into(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            log,
            child: None,
            starts: 0,
            file_size_limit: None,
        }
    }

    /// Starts later runs with `RLIMIT_FSIZE` at `bytes` (`None`: no limit) and `SIGXFSZ` ignored,
    /// so that a write past the limit fails with `EFBIG` — a full disk as the process sees it —
    /// instead of killing the process. Both are set by `prlimit` under a shell that ignores the
    /// signal, since an ignored signal and the limit survive `exec` and this workspace forbids
    /// the `unsafe` a `pre_exec` hook needs.
    pub fn set_file_size_limit(&mut self, bytes: Option<u64>) {
        self.file_size_limit = bytes;
    }

    /// The name given at creation (`api`, `projector`, `worker`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How often it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Starts the process (a clean environment plus the settings; output appended to the log).
    pub fn start(&mut self) {
        let path = &self.program;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("log {}: {e}", self.log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("log {}: {e}", self.log.display()));
        let mut command = match self.file_size_limit {
            None => Command::new(path),
            Some(bytes) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg("trap '' XFSZ; exec prlimit --fsize=\"$0\" -- \"$@\"")
                    .arg(bytes.to_string())
                    .arg(path);
                shell
            }
        };
        let child = command
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        self.child = Some(child);
        self.starts += 1;
    }

    /// Whether the child is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no chance to drain, flush or release anything — a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `grace` for the exit; returns the exit status, or `None` when
    /// the process had to be killed after the grace (as a supervisor would).
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for the process to exit by itself; kills it after that (`None`).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of its output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A loopback port that was free a moment ago (the API binds it; restarts reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free loopback port: {e}"))
}

/// Waits (bounded) until `GET {url}/healthz` answers 200.
pub async fn wait_healthy(client: &reqwest::Client, url: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Resident set size (kB) and open file descriptors of process `pid`, from `/proc`.
pub fn resources(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}
