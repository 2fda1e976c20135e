//! A throwaway PostgreSQL cluster for the test suite (`cargo xtask ci`) and for local development
//! (`cargo xtask pg`).
//!
//! Why it exists: the storage conformance suite must also run against PostgreSQL, and CI machines start
//! from a fresh clone. This finds `initdb`/`pg_ctl` (installing Debian's `postgresql` package when they are
//! missing), creates a cluster in a fresh directory under `target/` (trust authentication, user
//! `carebridge`, UTF8, C locale), starts it on a free loopback port with its Unix socket in that directory,
//! and stops it and removes the directory when the [`PgCluster`] is dropped.
//!
//! PostgreSQL refuses to run as root: as root the cluster belongs to the unprivileged system user
//! `carebridge-pg` (created if missing), and `initdb`/`pg_ctl` run through `runuser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The variable the tests read the server's connection string from.
pub const TEST_DATABASE_ENV: &str = "CAREBRIDGE_TEST_DATABASE_URL";
/// The system user owning the cluster when xtask runs as root.
const PG_USER: &str = "carebridge-pg";
/// The database superuser created by `initdb`.
const DB_USER: &str = "carebridge";
/// Longest Unix socket path the kernel accepts is 107 bytes; keep a margin for `/.s.PGSQL.<port>`.
const MAX_SOCKET_DIR: usize = 90;

/// A running throwaway cluster; dropping it stops the server and removes its directory.
pub struct PgCluster {
    dir: PathBuf,
    data: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<&'static str>,
    /// The server was started (and not yet stopped).
    started: bool,
    /// Connection URL through the Unix socket (preferred: faster than TCP loopback).
    pub url: String,
    /// Connection URL over TCP on 127.0.0.1.
    pub tcp_url: String,
}

impl PgCluster {
    /// Stop the server (`pg_ctl stop -m fast`) and remove the directory; also done on drop.
    pub fn stop(&mut self) {
        if self.started {
            self.started = false;
            let mut stop = command(self.run_as, &self.pg_ctl);
            stop.arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "-t", "60"]);
            if let Err(e) = quiet(&mut stop) {
                eprintln!("xtask: stopping PostgreSQL: {e}");
            }
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
            self.dir = PathBuf::new();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program args...`, through `runuser -u USER --` when `run_as` is set.
fn command(run_as: Option<&str>, program: &Path) -> Command {
    match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Run `cmd` capturing its output; on failure the error carries that output.
fn quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory holding both `initdb` and `pg_ctl`: PATH first, then the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_both(d)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Install Debian's `postgresql` package (updating the package lists if the first attempt fails).
fn install_postgres() -> Result<(), String> {
    eprintln!(
        "xtask: PostgreSQL (initdb, pg_ctl) is missing; installing it from Debian's packages"
    );
    let install = || {
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "postgresql"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    crate::run(Command::new("apt-get").arg("update"))?;
    install()
}

/// Create the unprivileged system user that owns the cluster, unless it exists.
fn ensure_pg_user() -> Result<(), String> {
    let exists = Command::new("id")
        .arg("-u")
        .arg(PG_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if exists {
        return Ok(());
    }
    quiet(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--user-group",
        "--shell",
        "/usr/sbin/nologin",
        PG_USER,
    ]))
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A fresh directory for the cluster: under `target/`, or under the system temp dir when that path would
/// be too long for a Unix socket.
fn cluster_dir() -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0);
    let name = format!("pg-{}-{nanos}", std::process::id());
    let mut dir = crate::root().join("target").join(&name);
    if dir.as_os_str().len() > MAX_SOCKET_DIR {
        dir = std::env::temp_dir().join(format!("carebridge-{name}"));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Percent-encode a path for a URL query value (keeping `/`).
fn encode_path(p: &Path) -> String {
    let mut out = String::new();
    for b in p.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(*b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Start a throwaway cluster (installing PostgreSQL first if needed).
pub fn ensure_cluster() -> Result<PgCluster, String> {
    let bin = match find_bin_dir() {
        Some(bin) => bin,
        None => {
            install_postgres()?;
            find_bin_dir().ok_or("PostgreSQL was installed but initdb/pg_ctl are not found")?
        }
    };
    let run_as = if is_root() {
        ensure_pg_user()?;
        Some(PG_USER)
    } else {
        None
    };
    let dir = cluster_dir()?;
    let data = dir.join("data");
    let mut cluster = PgCluster {
        dir: dir.clone(),
        data: data.clone(),
        pg_ctl: bin.join("pg_ctl"),
        run_as,
        url: String::new(),
        tcp_url: String::new(),
        // Nothing to stop until the server started; the directory is removed on drop all the same.
        started: false,
    };
    if let Some(user) = run_as {
        quiet(Command::new("chown").arg(format!("{user}:")).arg(&dir))?;
    }
    quiet(
        command(run_as, &bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                DB_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data),
    )?;
    let port = free_port()?;
    let options = format!(
        "-k '{}' -p {port} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
        dir.display()
    );
    cluster.started = true;
    quiet(
        command(run_as, &cluster.pg_ctl)
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options]),
    )
    .map_err(|e| {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        format!("{e}\nserver log:\n{log}")
    })?;
    cluster.url = format!(
        "postgres://{DB_USER}@/postgres?host={}&port={port}",
        encode_path(&dir)
    );
    cluster.tcp_url = format!("postgres://{DB_USER}@127.0.0.1:{port}/postgres");
    eprintln!("xtask: PostgreSQL running at {}", cluster.url);
    Ok(cluster)
}

/// `cargo xtask pg`: start a cluster, print its URLs and keep it until Ctrl-C.
///
/// std has no signal handling, so a small shell watchdog (ignoring SIGINT) stops the cluster and removes
/// its directory once this process has gone.
pub fn serve() -> Result<(), String> {
    let cluster = ensure_cluster()?;
    println!("{TEST_DATABASE_ENV}={}", cluster.url);
    println!("TCP: {}", cluster.tcp_url);
    println!("export {TEST_DATABASE_ENV}='{}'", cluster.url);
    println!("Press Ctrl-C to stop the cluster.");
    let stop = match cluster.run_as {
        Some(user) => format!("runuser -u {user} -- "),
        None => String::new(),
    };
    let script = format!(
        "trap '' INT; while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {stop}'{pg_ctl}' stop -D '{data}' -m fast -w >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = cluster.pg_ctl.display(),
        data = cluster.data.display(),
        dir = cluster.dir.display(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the watchdog: {e}"))?;
    // From here the watchdog owns the cluster: never stop it from this process.
    std::mem::forget(cluster);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
