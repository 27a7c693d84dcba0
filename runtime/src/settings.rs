//! Reading a binary's settings: clap with `env`, where a variable set to blank counts as unset
//! (deployment templates often export `NAME=` for "use the default"; clap alone would refuse an
//! empty number).
//!
//! A secret setting — one declared with `hide_env_values = true`, the mark clap already uses to
//! keep a value out of `--help` — is refused on the command line: a flag's value shows in every
//! process listing and stays in shell histories, so secrets come from the environment or from
//! their `_FILE` variable only.

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, Parser};

/// Parses the command line and environment into `T`, exiting with clap's message (naming the
/// setting and the bad value) on an error, like `T::parse()`.
pub fn parse_settings<T: Parser>() -> T {
    let command = blank_env_as_unset(T::command());
    let matches = command.clone().get_matches();
    secrets_not_on_command_line(&command, &matches).unwrap_or_else(|e| e.exit());
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// [`parse_settings`] over explicit arguments, returning the error instead of exiting.
pub fn try_parse_settings_from<T: Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, clap::Error> {
    let command = blank_env_as_unset(T::command());
    let matches = command.clone().try_get_matches_from(args)?;
    secrets_not_on_command_line(&command, &matches)?;
    T::from_arg_matches(&matches)
}

/// Whether `arg` holds a secret (see the module docs).
pub fn is_secret(arg: &clap::Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// Refuses a secret setting given as a flag, in the command and the subcommand that ran. The
/// message names the setting's variable, never the value.
fn secrets_not_on_command_line(command: &Command, matches: &ArgMatches) -> Result<(), clap::Error> {
    for arg in command.get_arguments().filter(|arg| is_secret(arg)) {
        let id = arg.get_id().as_str();
        if matches!(
            matches.try_get_raw(id).map(|_| matches.value_source(id)),
            Ok(Some(ValueSource::CommandLine))
        ) {
            let name = arg
                .get_env()
                .map_or_else(|| id.to_string(), |v| v.to_string_lossy().into_owned());
            let mut command = command.clone();
            return Err(command.error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{name} is a secret: set it in the environment or in a file named by {name}_FILE where there is one, never as a command-line flag (process listings and shell histories keep flags)"
                ),
            ));
        }
    }
    if let Some((name, sub_matches)) = matches.subcommand() {
        if let Some(sub) = command.find_subcommand(name) {
            secrets_not_on_command_line(sub, sub_matches)?;
        }
    }
    Ok(())
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

    #[derive(Debug, Parser)]
    struct WithSecret {
        /// A secret read from a variable no other test or process sets.
        #[arg(long, env = "RUNTIME_SETTINGS_PROBE_SECRET", hide_env_values = true)]
        secret: Option<String>,
    }

    /// A secret setting given as a flag is refused, naming its variable and not the value; the
    /// variable is accepted.
    #[test]
    fn secrets_are_refused_on_the_command_line() -> Result<(), clap::Error> {
        let refused =
            try_parse_settings_from::<WithSecret>(["probe", "--secret", "sw0rdfish-value"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(
            refused.contains("RUNTIME_SETTINGS_PROBE_SECRET"),
            "{refused}"
        );
        assert!(!refused.contains("sw0rdfish-value"), "{refused}");
        std::env::set_var("RUNTIME_SETTINGS_PROBE_SECRET", "from-the-environment");
        let probe: WithSecret = try_parse_settings_from(["probe"])?;
        assert_eq!(probe.secret.as_deref(), Some("from-the-environment"));
        Ok(())
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
