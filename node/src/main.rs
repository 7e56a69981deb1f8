//! `sns-node`: parse flags, set up logging, hand over to the library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = sns_node::cli::Cli::parse();
    sns_node::telemetry::init(cli.log_filter(), cli.log_format);
    let result = sns_node::run(cli);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sns-node failed");
            eprintln!("sns-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
