//! Processes as the tests see them, by pid: signals, whether one is alive, waiting until
//! one is gone (reaping it if it is ours, the child subreaper adopting orphans), and
//! scratch directories kept after a failure.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};

/// Makes this test process a child subreaper (once): processes orphaned when their parent
/// exits (an upgrade's previous generation) are re-parented here, so they can be reaped
/// and their exit status read, and none is left behind.
pub fn subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// Raises this process's soft open-file limit (`RLIMIT_NOFILE`) to its hard limit, for
/// tests that hold thousands of connections (the processes they start inherit it); returns
/// the limit now in force (`u64::MAX` for none).
pub fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised).expect("raising RLIMIT_NOFILE to its hard limit");
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

pub fn pid(raw: u32) -> Pid {
    Pid::from_raw(raw as i32).expect("a pid")
}

/// Sends `sig` to process `raw` (panics if it cannot).
pub fn signal(raw: u32, sig: Signal) {
    rustix::process::kill_process(pid(raw), sig)
        .unwrap_or_else(|e| panic!("kill({raw}, {sig:?}): {e}"));
}

/// Process `raw` exists (running, or a zombie not reaped yet).
pub fn alive(raw: u32) -> bool {
    rustix::process::test_kill_process(pid(raw)).is_ok()
}

/// How a process ended, as far as we can tell.
#[derive(Debug, PartialEq)]
pub enum Gone {
    /// Reaped here: its exit code (`None` if killed by a signal).
    Exited(Option<i32>),
    /// Reaped by someone else (its parent).
    Elsewhere,
}

/// Waits until process `raw` is gone, reaping it if it is (now) our child; panics after
/// `limit`.
pub fn wait_gone(raw: u32, limit: Duration) -> Gone {
    let t = Instant::now();
    loop {
        match rustix::process::waitpid(Some(pid(raw)), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => return Gone::Exited(status.exit_status()),
            Ok(None) => {}
            // Not our child (yet: its parent may still run), or already reaped.
            Err(_) if !alive(raw) => return Gone::Elsewhere,
            Err(_) => {}
        }
        assert!(
            t.elapsed() < limit,
            "process {raw} still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A name no other test of any run uses (the pid, a counter, the clock): for scratch
/// directories, table prefixes, Redis keys.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "gt{}_{}_{:x}_",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Where a test crate's scratch directories go. Cargo tells a test crate its
/// `CARGO_TARGET_TMPDIR` when it compiles it, and tells this library nothing, so each test
/// crate names its root once: [`target_tmpdir!`](crate::target_tmpdir) does, or by hand:
///
/// ```
/// pub enum TargetTmp {}
///
/// impl grace_testkit::ScratchRoot for TargetTmp {
///     fn root() -> std::path::PathBuf {
///         // env!("CARGO_TARGET_TMPDIR").into(), in an integration test
///         std::env::temp_dir()
///     }
/// }
///
/// pub type TempDir = grace_testkit::TempDir<TargetTmp>;
///
/// let dir = TempDir::new();
/// std::fs::write(dir.path("pid"), "1").unwrap();
/// ```
pub trait ScratchRoot {
    fn root() -> PathBuf;
}

/// Declares, in a test crate, `TargetTmp`: the [`ScratchRoot`] at its `CARGO_TARGET_TMPDIR`
/// (`target/tmp`, on the disk of the built binaries, which tests may hard-link), and
/// `TempDir`, a scratch directory there.
#[macro_export]
macro_rules! target_tmpdir {
    () => {
        /// The root of this test crate's scratch directories: `CARGO_TARGET_TMPDIR`.
        pub enum TargetTmp {}

        impl $crate::ScratchRoot for TargetTmp {
            fn root() -> ::std::path::PathBuf {
                ::std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            }
        }

        /// A scratch directory under `target/tmp`, removed afterwards (kept after a failure).
        pub type TempDir = $crate::TempDir<TargetTmp>;
    };
}

/// A fresh scratch directory under `R`'s root, removed when dropped, except during a panic:
/// after a failure it stays, to look at (logs, databases, pid files).
pub struct TempDir<R: ScratchRoot>(pub PathBuf, PhantomData<fn() -> R>);

impl<R: ScratchRoot> TempDir<R> {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::at(R::root().join(unique_prefix()))
    }

    /// Like [`new`](Self::new), its name beginning with `label` (to find it after a
    /// failure).
    pub fn named(label: &str) -> Self {
        Self::at(R::root().join(format!("{label}-{}", unique_prefix())))
    }

    fn at(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir, PhantomData)
    }

    /// The path of `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl<R: ScratchRoot> Drop for TempDir<R> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What is in `path` (empty if nothing is).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Replaces `path` atomically (writes a temporary file, renames it over `path`).
pub fn replace_file(path: &Path, contents: &str, executable: bool) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    if executable {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::rename(&tmp, path).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Tmp {}

    impl ScratchRoot for Tmp {
        fn root() -> PathBuf {
            std::env::temp_dir()
        }
    }

    // Both children are reaped, by pid (`wait_gone`).
    #[allow(clippy::zombie_processes)]
    #[test]
    fn a_child_is_reaped_with_its_status_and_a_signalled_one_without() {
        let exits = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        assert_eq!(
            wait_gone(exits.id(), Duration::from_secs(30)),
            Gone::Exited(Some(7))
        );
        let sleeps = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        assert!(alive(sleeps.id()));
        signal(sleeps.id(), Signal::KILL);
        assert_eq!(
            wait_gone(sleeps.id(), Duration::from_secs(30)),
            Gone::Exited(None)
        );
        assert!(!alive(sleeps.id()));
    }

    #[test]
    fn a_scratch_directory_goes_with_success_and_stays_after_a_panic() {
        let kept = std::thread::spawn(|| {
            let dir = TempDir::<Tmp>::new();
            replace_file(&dir.path("f"), "x", false);
            assert_eq!(read(&dir.path("f")), "x");
            let path = dir.0.clone();
            drop(dir);
            assert!(!path.exists());
            let dir = TempDir::<Tmp>::new();
            std::panic::panic_any(dir.0.clone());
        })
        .join()
        .unwrap_err();
        let kept = kept.downcast::<PathBuf>().unwrap();
        assert!(kept.is_dir(), "{kept:?}");
        std::fs::remove_dir_all(*kept).unwrap();
    }
}
