//! Repeatable project tasks: `cargo xtask ci` (the whole test suite, what `.ci/run` calls) and
//! `cargo xtask bench` (the benchmarks behind BENCHMARKS.md).
//!
//! Invariant: std only, so it builds in seconds on a fresh clone; it installs what tests need (Python peers in
//! a venv under `target/`) itself.

mod bench;
mod bench_hl7;
mod bench_pg;
mod pg;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench::run(&args[1..]),
        Some("pg") => pg::serve(),
        _ => {
            eprintln!(
                "usage: cargo xtask <ci | bench [--quick] [--only booking] [--hfs PATH] | pg>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Create (or reuse) the Python venv under target/ with the test peers installed.
fn python_env() -> Result<PathBuf, String> {
    let root = root();
    let venv = root.join("target/py-venv");
    let requirements = root.join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .map_err(|e| format!("reading {}: {e}", requirements.display()))?;
    let stamp = venv.join(".requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(venv);
    }
    let venv_ok = Command::new("python3")
        .args(["-m", "venv", "--help"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !venv_ok {
        eprintln!("xtask: python3 with venv is missing; installing it from Debian's packages");
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get").args([
            "install",
            "-y",
            "python3",
            "python3-venv",
            "python3-pip",
        ]))?;
    }
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(venv)
}

fn ci() -> Result<(), String> {
    let started = Instant::now();
    let root = root();
    // Every CI run is a fresh clone: incremental caches are pure cost.
    // SAFETY-free: set for child processes only.
    let env = [("CARGO_INCREMENTAL", "0"), ("CARGO_TERM_COLOR", "never")];

    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]).envs(env);
    run(&mut build)?;
    // The README's run command (`cargo run --release -- serve`) must find exactly one binary; check its shape
    // in the debug profile, which is already built.
    let mut readme_run = cargo();
    readme_run
        .args(["run", "--quiet", "--", "--version"])
        .envs(env);
    run(&mut readme_run)?;
    // A throwaway PostgreSQL cluster for the PostgreSQL store's tests (unless one is named already); it is
    // stopped and removed when `ci` returns, whatever the outcome.
    let pg_cluster = match std::env::var_os(pg::TEST_DATABASE_ENV) {
        Some(_) => None,
        None => Some(pg::ensure_cluster()?),
    };
    let pg_env: Vec<(&str, String)> = pg_cluster
        .iter()
        .map(|c| (pg::TEST_DATABASE_ENV, c.url.clone()))
        .collect();
    let mut nextest = cargo();
    nextest
        .args(["nextest", "run", "--workspace", "--profile", "ci"])
        .envs(env)
        .envs(pg_env.clone());
    run(&mut nextest)?;

    let venv = python_env()?;
    let bin = root.join("target/debug/carebridge");
    let mut pytest = Command::new(venv.join("bin/pytest"));
    pytest
        .current_dir(&root)
        .arg("tests/python")
        .arg("-q")
        .arg("-rs")
        .env("CAREBRIDGE_BIN", &bin)
        .envs(pg_env);
    run(&mut pytest)?;
    drop(pg_cluster);

    eprintln!(
        "xtask: ci passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
