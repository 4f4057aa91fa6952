//! The SQLite database's file on disk. It holds endpoints' secrets
//! (tokens, passwords, webhook URLs) and console sessions, so the server
//! makes it readable and writable to its own user alone (0600), whatever
//! the umask (0022 outside systemd made it 0644); SQLite gives the
//! journals it makes beside it (`-wal`, `-shm`) the file's own mode. A
//! file there already is left as it is, with a warning at each start
//! when every user of the host can read it. A directory it makes for
//! the file is its user's alone too (0700).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode the server makes its files with.
pub(super) const OWN_MODE: u32 = 0o600;

/// Makes the directory `dir` the database is in, and those above it
/// that are missing, entered by the server's user alone (0700), as the
/// data directory the embedded default makes is.
pub(super) fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes the database file `path` (empty: SQLite takes an empty file
/// for a new database) with [`OWN_MODE`], unless there is one; warns
/// when one there is readable to every user of the host. A file that
/// cannot be made is left to SQLite, which says why as it opens it.
pub(super) fn prepare(path: &Path) {
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(OWN_MODE)
        .open(path);
    match made {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Some(mode) = readable_to_all(path) {
                tracing::warn!(
                    "the database {} is readable to every user of the host (mode {mode:04o}), \
                     and holds endpoints' secrets and console sessions: make it, and its -wal \
                     and -shm, readable to the server's user alone (chmod 600)",
                    path.display()
                );
            }
        }
        Ok(_) | Err(_) => {}
    }
}

/// The mode of the file `path` when every user of the host may read it:
/// others may read it and enter every directory on the way to it.
fn readable_to_all(path: &Path) -> Option<u32> {
    let path = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_file() || mode & 0o004 == 0 {
        return None;
    }
    let enterable =
        |dir: &Path| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    path.ancestors().skip(1).all(enterable).then_some(mode)
}
