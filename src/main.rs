//! The `tokenvault` binary; everything lives in [`tokenvault::cli`].

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
