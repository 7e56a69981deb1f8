//! `sns-node`: parse flags, set up logging, hand over to the library.

use sns_node::cli::Invocation;

fn main() -> std::process::ExitCode {
    let result = match sns_node::cli::parse() {
        Invocation::Node(cli) => {
            sns_node::telemetry::init(&cli.log, cli.log_format);
            sns_node::run(*cli)
        }
        Invocation::Status(s) => {
            sns_node::telemetry::init(&s.log, s.log_format);
            sns_node::status(s.args)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sns-node failed");
            eprintln!("sns-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
