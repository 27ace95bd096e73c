//! `s3backer`: parse the flags, build the block stack, run the chosen frontend or admin command.

use s3backer::config::{self, Command, Config, Mode};
use s3backer::daemon::{self, Readiness};
use s3backer::logging::{self, Verbosity};
use s3backer::stack::{self, Stack};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let config = match config::parse_args(args) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version(text)) => {
            eprintln!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("s3backer: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Like C, where --debug-http alone shows curl's trace.
    logging::init(if config.debug || config.debug_http {
        Verbosity::Debug
    } else if config.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Normal
    });
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            tracing::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> Result<(), String> {
    // Ask for the password while we still own the terminal, before going to the background.
    // Test mode stores raw blocks, so it needs no password.
    let password = if config.cipher.is_some() && !config.test_mode {
        Some(config.encryption_password().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let mut readiness = if matches!(config.mode, Mode::Mount | Mode::Nbd) && !config.foreground {
        daemon::daemonize().map_err(|e| format!("can't go to the background: {e}"))?
    } else {
        Readiness::foreground()
    };
    match config.mode {
        Mode::ResetMountedFlag => stack::reset_mounted_flag(config),
        Mode::Erase => Stack::open(config, password)?.erase(config),
        Mode::Verify => Stack::open(config, password)?.verify(config),
        Mode::Mount => Stack::open(config, password)?.mount(config, &mut readiness),
        Mode::Nbd => Stack::open(config, password)?.serve_nbd(config, &mut readiness),
    }
}
