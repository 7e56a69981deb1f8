//! `tsc -h <coordinator host> -k <coordinator port> -u <user id>`: the Tiny
//! SNS command-line client.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = sns_client::cli::parse_args();
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let exit = sns_client::run(config, stdin, std::io::stdout()).await;
    // Exit here, not by returning: tokio reads stdin on a blocking thread
    // that cannot be interrupted, and dropping the runtime would wait for
    // that read (that is, for the user to press Enter) after a failed
    // connection.
    std::process::exit(exit.code());
}
