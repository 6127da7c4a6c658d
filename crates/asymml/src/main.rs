//! The `asymml` command.

use asymml_cli::cli::{Cli, Command};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => asymml_cli::train::run(a),
        Command::Eval(a) => asymml_cli::evaluate::run_eval(a),
        Command::Infer(a) => asymml_cli::evaluate::run_infer(a),
        Command::Bench(a) => asymml_cli::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
