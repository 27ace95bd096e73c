//! Rewrites the command line into plain `--flag[=value]` arguments for clap: `-o` lists become
//! flags or FUSE options, and `--configFile`/`-F` files are spliced in place (spec 8.1).
//! Hand-written because clap has no notion of FUSE `-o` lists or argument files.

use super::ConfigError;
use std::collections::HashMap;
use std::path::Path;

/// At most this many config files are spliced, so a file that includes itself fails cleanly.
const MAX_CONFIG_FILES: usize = 100;

/// How a long flag takes its value, learned from the clap definition.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// Boolean switch.
    None,
    /// `--flag=value` or `--flag value`.
    Required,
    /// Only `--flag` or `--flag=value`.
    Optional,
}

/// The pre-pass result: arguments for clap, and `-o` items that are not s3backer flags.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Rewritten {
    pub args: Vec<String>,
    pub fuse_options: Vec<String>,
}

/// What the next argument is, after a flag that takes it as its value.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Pending {
    Nothing,
    FlagValue,
    MountOptions,
    ConfigFile,
}

pub(crate) struct PrePass<'a> {
    flags: &'a HashMap<String, ValueKind>,
    out: Rewritten,
    pending: Pending,
    only_positionals: bool,
    config_files_read: usize,
}

impl<'a> PrePass<'a> {
    pub fn new(flags: &'a HashMap<String, ValueKind>) -> Self {
        PrePass {
            flags,
            out: Rewritten::default(),
            pending: Pending::Nothing,
            only_positionals: false,
            config_files_read: 0,
        }
    }

    pub fn run(mut self, args: Vec<String>) -> Result<Rewritten, ConfigError> {
        self.push_args(args, false)?;
        match self.pending {
            Pending::MountOptions => Err(ConfigError::new(r#"option "-o" requires an argument"#)),
            Pending::ConfigFile => Err(ConfigError::new(
                r#"option "--configFile" requires an argument"#,
            )),
            // clap reports a flag that lacks its value.
            Pending::FlagValue | Pending::Nothing => Ok(self.out),
        }
    }

    fn push_args(&mut self, args: Vec<String>, from_file: bool) -> Result<(), ConfigError> {
        for arg in args {
            self.push_arg(arg, from_file)?;
        }
        Ok(())
    }

    fn push_arg(&mut self, arg: String, from_file: bool) -> Result<(), ConfigError> {
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::FlagValue => return self.emit(arg),
            Pending::MountOptions => return self.push_mount_options(&arg, from_file),
            Pending::ConfigFile => return self.splice_config_file(&arg),
            Pending::Nothing => {}
        }
        if self.only_positionals {
            return self.emit(arg);
        }
        match arg.as_str() {
            "--" => {
                self.only_positionals = true;
                self.emit(arg)
            }
            "-o" => {
                self.pending = Pending::MountOptions;
                Ok(())
            }
            "-F" | "--configFile" => {
                self.pending = Pending::ConfigFile;
                Ok(())
            }
            "-?" => self.emit("--help".to_string()),
            _ => {
                if let Some(list) = arg.strip_prefix("-o") {
                    return self.push_mount_options(list, from_file);
                }
                if let Some(path) = arg
                    .strip_prefix("--configFile=")
                    .or_else(|| arg.strip_prefix("-F"))
                {
                    return self.splice_config_file(path);
                }
                if let Some(flag) = arg.strip_prefix("--") {
                    let (name, value) = split_flag(flag);
                    check_allowed(name, from_file)?;
                    if value.is_none() && self.flags.get(name) == Some(&ValueKind::Required) {
                        self.pending = Pending::FlagValue;
                    }
                }
                self.emit(arg)
            }
        }
    }

    /// One `-o` argument: a comma list of s3backer flags, config files and FUSE options.
    fn push_mount_options(&mut self, list: &str, from_file: bool) -> Result<(), ConfigError> {
        // Trimmed: a config file line `-o a, b` is one argument with spaces in it.
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (name, value) = split_flag(item);
            if name == "configFile" {
                let path = value.ok_or_else(|| {
                    ConfigError::new(r#"option "-o configFile" requires a file name"#)
                })?;
                self.splice_config_file(path)?;
            } else if let Some(kind) = self.flags.get(name) {
                check_allowed(name, from_file)?;
                // Emitted alone, `--name` would take the next argument as its value.
                if value.is_none() && *kind == ValueKind::Required {
                    return Err(ConfigError::new(format!(
                        "option \"-o {name}\" requires a value (\"-o {name}=VALUE\")"
                    )));
                }
                self.emit(format!("--{item}"))?;
            } else {
                self.out.fuse_options.push(item.to_string());
            }
        }
        Ok(())
    }

    fn splice_config_file(&mut self, path: &str) -> Result<(), ConfigError> {
        self.config_files_read += 1;
        if self.config_files_read > MAX_CONFIG_FILES {
            return Err(ConfigError::new(
                r#"too many levels of "--configFile" nesting"#,
            ));
        }
        let lines = read_config_file(Path::new(path))?;
        self.push_args(lines, true)
    }

    fn emit(&mut self, arg: String) -> Result<(), ConfigError> {
        self.out.args.push(arg);
        Ok(())
    }
}

/// `name=value` -> (`name`, `Some(value)`); `name` -> (`name`, `None`).
fn split_flag(flag: &str) -> (&str, Option<&str>) {
    match flag.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (flag, None),
    }
}

/// `--nbd` starts another program and must be visible on the real command line (spec 8.1).
fn check_allowed(name: &str, from_file: bool) -> Result<(), ConfigError> {
    if from_file && name == "nbd" {
        return Err(ConfigError::new(
            r#"the "--nbd" flag is not allowed in a config file"#,
        ));
    }
    Ok(())
}

/// One argument per line, trimmed; blank lines and `#` comment lines skipped.
fn read_config_file(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!(
            "can't read config file \"{}\": {e}",
            path.display()
        ))
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect())
}
