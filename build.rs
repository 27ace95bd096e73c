//! Records the git revision for `--version` (C s3backer prints `version X (gitrev)`).

fn main() {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|rev| rev.trim().to_string())
        .filter(|rev| !rev.is_empty());
    if let Some(rev) = rev {
        println!("cargo:rustc-env=S3BACKER_GIT_REV={rev}");
    }
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
