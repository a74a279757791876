//! `lazypull` — the command-line entry point.
//!
//! Thin glue: argument parsing and output formatting live here, every piece of logic lives in
//! a library crate (`estargz` for the format, `unpack` for extraction). Errors are `anyhow`
//! here only; libraries return typed errors that already name the digest, path or offset.

use clap::{Parser, Subcommand};

mod image;
mod layer;

#[derive(Parser)]
#[command(name = "lazypull", version, about = "Lazy-pulling container images (eStargz, zstd:chunked)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with single layer blobs: convert, inspect, verify, extract.
    #[command(subcommand)]
    Layer(layer::LayerCommand),
    /// Work with whole images in registries or OCI layouts: convert, inspect.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("LAZYPULL_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Layer(c) => layer::run(c),
        Command::Image(c) => image::run(c),
    };
    if let Err(e) = result {
        eprintln!("lazypull: error: {e:#}");
        std::process::exit(1);
    }
}
