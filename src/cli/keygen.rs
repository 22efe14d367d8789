//! `walship keygen`: write a new age identity file and print its public key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the identity (secret key); refused if the file exists
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(args: &KeygenArgs) -> std::io::Result<String> {
    let (text, public) = crate::codec::generate_identity();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.output)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(public)
}
