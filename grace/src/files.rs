//! Files the library writes or reads beside other people's: the pid file.
//!
//! Such a file often lives in a directory others may write to (a shared `/run/…`, `/tmp`),
//! where anyone can plant a symbolic link, a FIFO or a file of their own at a name we use.
//! So a file is never written through a link or over a file someone else made: it is
//! created under a fresh random name in the same directory, exclusively (`O_CREAT |
//! O_EXCL | O_NOFOLLOW`: a name already taken, by anything, is never opened; another name is
//! tried), written, then renamed over the target (a rename replaces the directory entry,
//! a link included, and never follows it). Reading one does not follow a link either, and
//! takes only a regular file (a FIFO planted there would block the reader forever).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags};

/// How many names [`create_exclusive`] tries before it gives up: each is 64 random bits, so
/// more than a couple of collisions means someone fills the directory on purpose.
const TRIES: usize = 64;

/// A name nobody can guess: 64 bits from a hasher keyed by the OS's random source (std's
/// `RandomState`), over a counter and the time.
fn random_name() -> u64 {
    use std::hash::BuildHasher;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((n, nanos, std::process::id()))
}

/// The directory `path` is in (`.` for a bare name) and its file name.
fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// Creates a new file in `dir` named `.{prefix}.{random}.tmp`, for writing, with `mode`
/// (less the umask): exclusively, so that nothing already at the name (a file, a link, a
/// FIFO someone planted) is ever opened; on a name taken, another is tried.
pub(crate) fn create_exclusive(
    dir: &Path,
    prefix: &OsStr,
    mode: u32,
) -> io::Result<(File, PathBuf)> {
    create_exclusive_named(dir, prefix, mode, random_name)
}

/// [`create_exclusive`] with the source of names given (the tests choose them).
fn create_exclusive_named(
    dir: &Path,
    prefix: &OsStr,
    mode: u32,
    mut names: impl FnMut() -> u64,
) -> io::Result<(File, PathBuf)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..TRIES {
        let mut name = OsString::from(".");
        name.push(prefix);
        name.push(format!(".{:016x}.tmp", names()));
        let path = dir.join(name);
        match rustix::fs::open(
            &path,
            flags,
            Mode::from_raw_mode(mode as rustix::fs::RawMode),
        ) {
            Ok(fd) => return Ok((File::from(fd), path)),
            Err(rustix::io::Errno::EXIST) => {
                tracing::debug!(path = %path.display(), "temporary name taken: trying another");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free temporary name in {} after {TRIES} tries",
            dir.display()
        ),
    ))
}

/// Replaces `path` with a new file holding `contents`, atomically (a reader sees the old
/// file or the new one, whole) and without writing through anything at `path` or at a
/// temporary name: see the module's docs. The new file gets `mode` less the umask.
pub(crate) fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let (mut file, tmp) = create_exclusive(dir, name, mode)?;
    let written = file
        .write_all(contents)
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // Ours: created exclusively under a name nobody could guess.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads at most `limit` bytes of the regular file at `path`; a link, a FIFO, a device or
/// a directory there is an error (never followed or opened for reading: a FIFO would block).
pub(crate) fn read_regular(path: &Path, limit: u64) -> io::Result<String> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mut text = String::new();
    File::from(fd).take(limit).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("grace-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn exclusive_creation_never_opens_what_is_at_the_name_and_tries_another() {
        let dir = scratch("excl");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        // Someone planted a link, a file, a dangling link and a FIFO at the first names.
        let taken = |n: u64| dir.join(format!(".x.pid.{n:016x}.tmp"));
        std::os::unix::fs::symlink(&victim, taken(1)).unwrap();
        std::fs::write(taken(2), "theirs\n").unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), taken(3)).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            taken(4),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
        let mut next = 0;
        let (mut file, path) = create_exclusive_named(&dir, OsStr::new("x.pid"), 0o600, || {
            next += 1;
            next
        })
        .unwrap();
        assert_eq!(path, taken(5));
        file.write_all(b"ours\n").unwrap();
        drop(file);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(std::fs::read_to_string(taken(2)).unwrap(), "theirs\n");
        assert!(
            !dir.join("nowhere").exists(),
            "created through a dangling link"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o077, 0);
        // Every name taken: an error, nothing opened.
        let err = create_exclusive_named(&dir, OsStr::new("x.pid"), 0o600, || 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        // Random names differ.
        let (_, a) = create_exclusive(&dir, OsStr::new("y"), 0o600).unwrap();
        let (_, b) = create_exclusive(&dir, OsStr::new("y"), 0o600).unwrap();
        assert_ne!(a, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replaced_link_is_replaced_not_written_through() {
        let dir = scratch("replace");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("app.pid");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        replace(&path, b"42\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_file()
        );
        assert_eq!(read_regular(&path, 64).unwrap(), "42\n");
        // Only the victim and the new file: no temporary file left.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reading_takes_only_a_regular_file() {
        let dir = scratch("read");
        let victim = dir.join("victim");
        std::fs::write(&victim, "42\n").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(read_regular(&link, 64).is_err(), "followed a link");
        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Returns at once: the FIFO is never opened for a read that would wait for a writer.
        assert!(read_regular(&fifo, 64).is_err());
        assert_eq!(read_regular(&victim, 1).unwrap(), "4");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
