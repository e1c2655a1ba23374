//! The `tokenvault` binary; everything lives in [`tokenvault::cli`].

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
