//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the tonic
//! client and server code. The encoded descriptor set is also written to `OUT_DIR` so the
//! server can offer gRPC reflection. It also records the git commit for `--version`.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    git_commit();

    let fds = protox::compile(
        [
            "tokenvault/v1/tokenvault.proto",
            "tokenvault/v1/admin.proto",
        ],
        ["proto"],
    )?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tokenvault_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // protox already told cargo what to watch; prost's own hints assume protoc paths.
        .emit_rerun_if_changed(false)
        // Messages that carry a PAN get a redacting `Debug` by hand (src/grpc/mod.rs).
        .skip_debug([
            ".tokenvault.v1.TokenizeRequest",
            ".tokenvault.v1.DetokenizeResponse",
            // Carries a new client's API key (shown once).
            ".tokenvault.v1.AddClientResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}

/// `TOKENVAULT_GIT_COMMIT` for the crate: the build environment's `GIT_COMMIT` (a container
/// build without `.git` passes it as a build argument; CI systems often set it), else
/// `git rev-parse`, else `unknown`. A missing git, or a source tarball, never fails the build.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric()))
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs (only
    // files that exist: cargo reruns on every build for a missing one).
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for path in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    println!("cargo:rustc-env=TOKENVAULT_GIT_COMMIT={commit}");
}
