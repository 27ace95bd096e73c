fn main() {
    eprintln!("s3backer: not wired yet");
    std::process::exit(1);
}
