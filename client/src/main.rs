//! `tsc -h <coordinator host> -k <coordinator port> -u <user id>`: the Tiny
//! SNS command-line client.

use sns_client::console::Console;
use sns_client::input::Input;
use sns_client::terminal::{self, Terminal};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = sns_client::cli::parse_args();
    // Ctrl-C is the session's to handle (it reports posts not yet
    // confirmed before leaving), so it is turned into a message.
    let (interrupt, interrupts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while tokio::signal::ctrl_c().await.is_ok() && interrupt.send(()).is_ok() {} });
    let exit = match Terminal::open() {
        Some((editor, out, err)) => {
            let input = Input::terminal(editor).with_interrupts(interrupts);
            sns_client::run_with(config, input, Console::with_notes(out, Box::new(err))).await
        }
        None => {
            let input = Input::pipe(tokio::io::BufReader::new(tokio::io::stdin())).with_interrupts(interrupts);
            sns_client::run_with(config, input, Console::new(std::io::stdout())).await
        }
    };
    // Whatever is still typed ahead on a terminal is the client's, not the
    // next command's for the shell.
    terminal::discard_typeahead();
    // Exit here, not by returning: tokio reads stdin on a blocking thread
    // that cannot be interrupted, and dropping the runtime would wait for
    // that read (that is, for the user to press Enter) after a failed
    // connection.
    std::process::exit(exit.code());
}
