//! `tokenvault completions SHELL` and `tokenvault man`: shell completions (clap_complete) and
//! man pages (clap_mangen) generated from the clap definition itself, so they never drift
//! from the flags the binary accepts.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory};

use super::common::CliError;
use super::Cli;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write `tokenvault.1` and one page per subcommand (`tokenvault-keys-rotate.1`, ...) into
    /// this directory instead of printing the top-level page on standard output.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on standard output.
pub fn completions(args: CompletionsArgs) -> Result<(), CliError> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "tokenvault", &mut out);
    write_stdout(&out)
}

/// Prints the man page (roff), or writes all pages into `--out-dir`.
pub fn man(args: ManArgs) -> Result<(), CliError> {
    let cmd = Cli::command();
    match args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| CliError::Other(format!("cannot create {}: {e}", dir.display())))?;
            clap_mangen::generate_to(cmd, &dir).map_err(|e| {
                CliError::Other(format!("cannot write man pages to {}: {e}", dir.display()))
            })
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CliError::Other(format!("cannot render the man page: {e}")))?;
            write_stdout(&out)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        // `tokenvault man | head` is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Other(format!(
            "cannot write to standard output: {e}"
        ))),
        _ => Ok(()),
    }
}
