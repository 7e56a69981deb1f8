//! `sns-node`: parse flags, set up logging, hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = sns_node::cli::Cli::parse();
    sns_node::telemetry::init(&cli.log);
    match sns_node::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sns-node failed");
            eprintln!("sns-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
