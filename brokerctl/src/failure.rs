//! Outcomes other than success, each with the exit code scripts branch on. The codes are part of
//! the documented interface (`docs/brokerctl.md`, `brokerctl --help`): never renumber one.

use thiserror::Error;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: an unexpected failure (e.g. an unreadable response, a local I/O error).
pub const EXIT_UNEXPECTED: u8 = 1;
/// Exit code: bad input, from the command line or as the service judged it (400, 413); clap's
/// own usage errors use the same code.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: missing, unknown or wrong token, or not allowed (401, 403).
pub const EXIT_AUTH: u8 = 3;
/// Exit code: no sandbox could be allocated before the deadline (409 / 429 until then).
pub const EXIT_NO_SANDBOX: u8 = 4;
/// Exit code: the service failed (5xx) or could not be reached until the deadline.
pub const EXIT_SERVER: u8 = 5;
/// Exit code: no sandbox has this id or name (404); nothing was done.
pub const EXIT_NOT_FOUND: u8 = 6;
/// Exit code: the service refused the operation in the sandbox's current state (409).
pub const EXIT_REFUSED: u8 = 7;
/// Exit code: no sandbox in the pool has a name with the requested prefix (`UNKNOWN_PREFIX`);
/// allocation stops at once, since waiting cannot help.
pub const EXIT_UNKNOWN_PREFIX: u8 = 8;

/// The exit codes as `brokerctl --help` shows them (and `docs/brokerctl.md` tabulates).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (releasing a sandbox that was already released or deleted is a success)
  1  unexpected failure (unreadable response, local I/O error)
  2  bad input (command line, or 400/413 from the service)
  3  not authorised: missing or wrong token, or not the caller's sandbox (401/403)
  4  no sandbox became free before --deadline (409/429 until then)
  5  the service failed or was unreachable until --deadline (5xx); a followed job
     (jobs wait, --wait) failed, stopped or was still running at --deadline
  6  no sandbox has this id or name (404); nothing was done
  7  refused in the sandbox's current state (409)
  8  no sandbox in the pool has a name with this --prefix (UNKNOWN_PREFIX); not retried";

/// Why a command did not succeed.
#[derive(Debug, Error)]
pub enum Failure {
    /// The input was refused, locally or by the service.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Authentication or authorisation failed.
    #[error("not authorised: {0}")]
    Auth(String),
    /// No sandbox became available before the deadline.
    #[error("no sandbox before the deadline: {0}")]
    NoSandbox(String),
    /// The service failed or was unreachable until the deadline.
    #[error("service unavailable: {0}")]
    Server(String),
    /// The sandbox does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation is not possible in the current state.
    #[error("refused: {0}")]
    Refused(String),
    /// No sandbox has a name with the requested prefix.
    #[error("unknown prefix: {0}")]
    UnknownPrefix(String),
    /// Anything else.
    #[error("{0}")]
    Unexpected(String),
}

impl Failure {
    /// The process exit code of this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::BadInput(_) => EXIT_BAD_INPUT,
            Failure::Auth(_) => EXIT_AUTH,
            Failure::NoSandbox(_) => EXIT_NO_SANDBOX,
            Failure::Server(_) => EXIT_SERVER,
            Failure::NotFound(_) => EXIT_NOT_FOUND,
            Failure::Refused(_) => EXIT_REFUSED,
            Failure::UnknownPrefix(_) => EXIT_UNKNOWN_PREFIX,
            Failure::Unexpected(_) => EXIT_UNEXPECTED,
        }
    }
}
