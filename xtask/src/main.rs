//! `cargo xtask`: the single entry point for people and CI (STYLE.md "Build and test").
//!
//! - `setup` installs the Debian packages and the Rust target a fresh machine lacks;
//! - `build` compiles the hypervisor for `x86_64-unknown-none` and wraps it in a GRUB ISO;
//! - `run` boots it in Bochs (or QEMU) and streams the serial console;
//! - `test` runs the host unit tests and every emulator scenario of `tests/emulator.toml`,
//!   ending with the line `N passed, M failed`;
//! - `bench` runs a named benchmark.
//!
//! The contract with the hypervisor's output is docs/emulator-protocol.md.
#![forbid(unsafe_code)]

mod bench;
mod bench_bypass;
mod bench_linux;
mod checks;
mod cli;
mod emulator;
mod gdb;
mod guest_arg;
mod host;
mod image;
mod linux;
mod new_am;
mod new_am_check;
mod nvram_disk;
mod plot;
mod pmem_file;
mod report;
mod run;
mod scenario;
mod setup;
mod test;
mod tools;
mod workspace;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::workspace::Workspace;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("xtask:   caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen subcommand; `Ok` carries its exit code (a failed test run is not an
/// error of xtask itself, but still exits non-zero).
fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let workspace = Workspace::locate()?;
    match cli.command {
        Command::Setup => {
            setup::install_missing(&workspace, setup::Mode::Verbose)?;
            let files = linux::ensure(&workspace)?;
            println!(
                "xtask: setup: Linux guest: {} and {}",
                workspace.display(&files.kernel),
                workspace.display(&files.initramfs)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Build(args) => {
            image::build_command(&workspace, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run::run_command(&workspace, &args),
        Command::Test(args) => test::test_command(&workspace, &args),
        Command::Bench(args) => bench::bench_command(&workspace, &args),
        Command::NewAm(args) => new_am::new_am_command(&workspace, &args),
    }
}
