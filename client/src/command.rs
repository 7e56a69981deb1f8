//! Parsing one line typed at the `Cmd> ` prompt into a [`Command`].
//!
//! Pure: no I/O, so every rule of the course's command syntax is unit tested.

/// What a line typed in command mode asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `FOLLOW <username>`.
    Follow(String),
    /// `UNFOLLOW <username>`.
    Unfollow(String),
    /// `LIST`.
    List,
    /// `TIMELINE`: switch to timeline mode for the rest of the session.
    Timeline,
    /// Nothing but whitespace: just prompt again.
    Empty,
    /// `FOLLOW` or `UNFOLLOW` without the username it needs.
    MissingArgument,
    /// A command word the client does not know.
    Unknown,
}

impl Command {
    /// Parses a line: the first whitespace-separated word is the command
    /// (case-insensitive, as in the course client), the second its argument.
    /// Further words are ignored. The argument is passed on exactly as typed:
    /// the server, not the client, decides which usernames are valid.
    pub fn parse(line: &str) -> Command {
        let mut words = line.split_whitespace();
        let Some(word) = words.next() else {
            return Command::Empty;
        };
        let argument = words.next().map(str::to_owned);
        match word.to_ascii_uppercase().as_str() {
            "FOLLOW" => argument.map_or(Command::MissingArgument, Command::Follow),
            "UNFOLLOW" => argument.map_or(Command::MissingArgument, Command::Unfollow),
            "LIST" => Command::List,
            "TIMELINE" => Command::Timeline,
            _ => Command::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn command_words_are_case_insensitive() {
        for line in ["FOLLOW 2", "follow 2", "FoLlOw 2"] {
            assert_eq!(Command::parse(line), Command::Follow("2".into()), "{line:?}");
        }
        for line in ["UNFOLLOW 3", "unfollow 3", "UnFollow 3"] {
            assert_eq!(Command::parse(line), Command::Unfollow("3".into()), "{line:?}");
        }
        for line in ["LIST", "list", "List"] {
            assert_eq!(Command::parse(line), Command::List, "{line:?}");
        }
        for line in ["TIMELINE", "timeline", "TimeLine"] {
            assert_eq!(Command::parse(line), Command::Timeline, "{line:?}");
        }
    }

    #[test]
    fn follow_and_unfollow_need_an_argument() {
        assert_eq!(Command::parse("FOLLOW"), Command::MissingArgument);
        assert_eq!(Command::parse("unfollow   "), Command::MissingArgument);
    }

    #[test]
    fn unknown_words_are_reported_as_such() {
        assert_eq!(Command::parse("POST hello"), Command::Unknown);
        assert_eq!(Command::parse("FOLLOWX 2"), Command::Unknown);
        assert_eq!(Command::parse("2"), Command::Unknown);
    }

    #[test]
    fn whitespace_is_only_a_separator() {
        assert_eq!(Command::parse(""), Command::Empty);
        assert_eq!(Command::parse("   \t "), Command::Empty);
        assert_eq!(Command::parse("  follow \t 7  "), Command::Follow("7".into()));
        assert_eq!(Command::parse("FOLLOW 7 8 9"), Command::Follow("7".into()));
        assert_eq!(Command::parse("LIST extra words"), Command::List);
        assert_eq!(Command::parse("list\r"), Command::List);
    }

    #[test]
    fn the_argument_is_passed_on_as_typed() {
        assert_eq!(Command::parse("FOLLOW ../../etc"), Command::Follow("../../etc".into()));
        assert_eq!(Command::parse("follow Abc"), Command::Follow("Abc".into()));
    }
}
