//! `grace-ctl`: the control socket of any server built with grace, from the command line
//! (see the crate's docs).

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "grace-ctl",
    version,
    about = "Ask a server built with grace for its status, an upgrade or a drain, through its control socket"
)]
struct Cli {
    #[command(flatten)]
    ctl: grace_ctl::Ctl,
}

fn main() {
    // Bad flags fail like any other failure: exit 1 (clap's own choice is 2).
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() {
            grace_ctl::EXIT_FAILED
        } else {
            grace_ctl::EXIT_OK
        })
    });
    std::process::exit(grace_ctl::run(&cli.ctl));
}
