//! The flag parser: any argv, with or without a `--configFile` of any content, gives a Command
//! or a clean ConfigError.
#![no_main]

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    args: Vec<String>,
    /// Contents of a config file spliced in with `--configFile` at `config_at`.
    config_file: Option<String>,
    config_at: u8,
}

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("s3backer-fuzz-config-{}", std::process::id()))
    })
}

/// Paths that block or never end (`/dev/stdin`, `/dev/zero`, `/proc/...`) are the user's
/// own doing, not a parser bug: keep the fuzzer away from them.
fn names_special_file(text: &str) -> bool {
    ["dev", "proc", "sys"].iter().any(|dir| text.contains(dir))
}

fuzz_target!(|input: Input| {
    if input.args.iter().any(|arg| names_special_file(arg))
        || input.config_file.as_deref().is_some_and(names_special_file)
    {
        return;
    }
    let mut args: Vec<OsString> = input.args.into_iter().map(OsString::from).collect();
    if let Some(text) = &input.config_file {
        let path = config_path();
        std::fs::write(path, text).expect("write config file");
        let at = usize::from(input.config_at) % (args.len() + 1);
        let mut flag = OsString::from("--configFile=");
        flag.push(path);
        args.insert(at, flag);
    }
    let _ = s3backer::config::parse_args(args);
});
