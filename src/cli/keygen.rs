//! `walship keygen`: write a new age identity file and print its public key.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the identity (secret key); refused if the file exists. Missing parent
    /// directories are created, readable by their owner only
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Write the identity, durably, and return its public key. The file's name is flushed to disk
/// with its contents: the printed key may go on to encrypt an archive only this file decrypts.
pub fn run(args: &KeygenArgs) -> std::io::Result<String> {
    let (text, public) = crate::codec::generate_identity();
    let dir = crate::wal::parent_dir(&args.output);
    DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.output)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    crate::storage::fs::sync_dir(&dir)?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_private_identity_into_new_private_directories_and_never_overwrites() {
        let root = tempfile::tempdir().unwrap();
        let output = root.path().join("etc/walship/identity.txt");
        let args = KeygenArgs {
            output: output.clone(),
        };
        let public = run(&args).unwrap();
        assert!(public.starts_with("age1"), "{public}");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&output), 0o600);
        assert_eq!(mode(&root.path().join("etc/walship")), 0o700);
        assert_eq!(mode(&root.path().join("etc")), 0o700);
        let written = std::fs::read(&output).unwrap();
        let again = run(&args).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&output).unwrap(), written);
    }
}
