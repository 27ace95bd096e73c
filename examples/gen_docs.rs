//! Writes the man page and shell completions, generated from the one flag definition
//! (`s3backer::config::command()`), into a directory: `cargo run --example gen_docs -- DIR`.
//! An example rather than a binary, so `cargo install` installs only `s3backer`.

use clap_complete::Shell;
use std::path::Path;

/// The roff source of `s3backer(1)`.
pub fn man_page() -> Vec<u8> {
    let command = s3backer::config::command();
    // NAME takes the one-line `about`; the full text goes to DESCRIPTION.
    let description = command.get_about().cloned().unwrap_or_default();
    let command = command
        .about("an S3 bucket as a virtual disk (FUSE file)")
        .long_about(description);
    let mut out = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut out)
        .expect("rendering to memory cannot fail");
    out
}

/// The completion script for one shell.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(
        shell,
        &mut s3backer::config::command(),
        "s3backer",
        &mut out,
    );
    out
}

/// Installed file name of each shell's completion script (as Debian's packages name them).
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "s3backer.bash"),
    (Shell::Zsh, "_s3backer"),
    (Shell::Fish, "s3backer.fish"),
];

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .unwrap_or_else(|| "target/docs".into());
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("s3backer.1"), man_page())?;
    for (shell, name) in SHELLS {
        std::fs::write(dir.join(name), completion(shell))?;
    }
    println!("gen_docs: wrote {}", dir.display());
    Ok(())
}
