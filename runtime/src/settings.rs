//! Reading a binary's settings: clap with `env`, where a variable set to blank counts as unset
//! (deployment templates often export `NAME=` for "use the default"; clap alone would refuse an
//! empty number).

use clap::{Command, Parser};

/// Parses the command line and environment into `T`, exiting with clap's message (naming the
/// setting and the bad value) on an error, like `T::parse()`.
pub fn parse_settings<T: Parser>() -> T {
    let matches = blank_env_as_unset(T::command()).get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// [`parse_settings`] over explicit arguments, returning the error instead of exiting.
pub fn try_parse_settings_from<T: Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, clap::Error> {
    let matches = blank_env_as_unset(T::command()).try_get_matches_from(args)?;
    T::from_arg_matches(&matches)
}

/// Drops the environment binding of every argument whose variable is set but blank, in the
/// command and all its subcommands.
fn blank_env_as_unset(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let blank = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| value.to_string_lossy().trim().is_empty());
            if blank {
                arg.env(None)
            } else {
                arg
            }
        })
        .mut_subcommands(blank_env_as_unset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Probe {
        /// A number read from a variable no other test or process sets.
        #[arg(long, env = "RUNTIME_SETTINGS_PROBE_BLANK", default_value_t = 7)]
        number: u32,
    }

    /// A blank variable takes the default instead of failing to parse.
    #[test]
    fn blank_variable_takes_the_default() -> Result<(), clap::Error> {
        std::env::set_var("RUNTIME_SETTINGS_PROBE_BLANK", "  ");
        let probe: Probe = try_parse_settings_from(["probe"])?;
        assert_eq!(probe.number, 7);
        assert!(
            Probe::try_parse_from(["probe"]).is_err(),
            "plain clap refuses the blank value"
        );
        Ok(())
    }
}
