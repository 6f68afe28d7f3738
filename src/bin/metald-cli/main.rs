//! metald-cli: the command-line client (its commands arrive with the CLI issue).

fn main() {
    eprintln!("metald-cli: not built yet; see the project's issues");
    std::process::exit(2);
}
