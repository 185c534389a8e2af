//! Issue 20, item 1: files the demo creates, in a directory someone else may write to, are
//! never written through a link planted there: the pid file (and its temporary file), the
//! audit file, the SQLite database and the files SQLite keeps beside it.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

mod common;

use common::{BIN, Demo, Http, PATIENCE, TempDir};

/// Runs the demo in `dir` with `args` until it exits (killed after `PATIENCE`): its exit
/// code (`None` if it had to be killed: it served) and its stderr.
async fn run_to_exit(dir: &TempDir, args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(BIN)
        .current_dir(&dir.0)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn grace-demo");
    match tokio::time::timeout(PATIENCE, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("wait");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => (None, String::new()),
    }
}

fn link(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

#[tokio::test]
async fn a_link_at_the_pid_files_temporary_name_is_not_written_through() {
    let dir = TempDir::new();
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    // The name the pid file's temporary file used to have (`.NAME.<pid>.tmp`): the shell
    // plants the link under its own pid, which the demo keeps once exec'd.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ln -s victim \".demo.pid.$$.tmp\" && exec \"$0\" \"$@\"",
        BIN,
        "--pid-file",
        "demo.pid",
        "--db",
        "sqlite://ledger.db?mode=rwc",
    ]);
    let demo = Demo::start_with(cmd, &dir, &[]).await;
    // Serving: the pid file was written twice by now (at start, and when serving started).
    let mut http = Http::connect(demo.addr).await.unwrap();
    assert_eq!(http.request("GET", "/", None).await.unwrap().status, 200);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the pid was written through the link"
    );
    let planted = dir.path(&format!(".demo.pid.{}.tmp", demo.pid));
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_to_string(dir.path("demo.pid")).unwrap(),
        format!("{}\n", demo.pid)
    );
    // The pid file itself replaced by a link (to a file holding our pid): at exit the link
    // is not taken for our pid file, and its target stays.
    std::fs::write(&victim, format!("{}\n", demo.pid)).unwrap();
    std::fs::remove_file(dir.path("demo.pid")).unwrap();
    link(&victim, &dir.path("demo.pid"));
    let pid = demo.pid;
    demo.signal(rustix::process::Signal::TERM);
    let exit = demo.wait_exit(PATIENCE).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        format!("{pid}\n")
    );
    assert!(
        std::fs::symlink_metadata(dir.path("demo.pid"))
            .unwrap()
            .is_symlink(),
        "a link was taken for the pid file"
    );
}

#[tokio::test]
async fn the_audit_file_and_the_database_are_never_opened_through_a_link() {
    let dir = TempDir::new();
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();

    // The audit file a link: refused at start, nothing appended to the target.
    link(&victim, &dir.path("audit.log"));
    let (code, stderr) = run_to_exit(
        &dir,
        &[
            "--audit-file",
            "audit.log",
            "--db",
            "sqlite://a.db?mode=rwc",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "the demo served with its audit file a link");
    assert!(stderr.contains("audit.log"), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    // A FIFO: refused at once (opening it to append would wait for a reader forever).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.path("fifo.log"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let (code, stderr) = run_to_exit(
        &dir,
        &["--audit-file", "fifo.log", "--db", "sqlite://b.db?mode=rwc"],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");

    // SQLite's write-ahead log (or the database) a link: refused before SQLite opens it.
    for (db, planted) in [("c.db", "c.db-wal"), ("d.db", "d.db"), ("e.db", "e.db-shm")] {
        link(&victim, &dir.path(planted));
        let url = format!("sqlite://{db}?mode=rwc");
        let (code, stderr) = run_to_exit(&dir, &["--audit-file", "ok.log", "--db", &url]).await;
        assert_eq!(code, Some(1), "served with {planted} a link");
        assert!(stderr.contains(planted), "{stderr}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    // And with nothing planted, the demo serves and writes its own files.
    let args: Vec<String> = ["--audit-file", "ok.log", "--db", "sqlite://f.db?mode=rwc"]
        .iter()
        .map(ToString::to_string)
        .collect();
    let demo = Demo::start(&dir, &args).await;
    let mut http = Http::connect(demo.addr).await.unwrap();
    for (id, balance) in [("a", 10), ("b", 0)] {
        let body = format!(r#"{{"id":"{id}","balance":{balance}}}"#);
        let r = http
            .request("POST", "/accounts", Some(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let body = r#"{"from":"a","to":"b","amount":1}"#;
    let r = http
        .request("POST", "/transfers", Some(body))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    demo.signal(rustix::process::Signal::TERM);
    let exit = demo.wait_exit(PATIENCE).await;
    assert!(exit.code == 0, "{}", exit.stderr);
    assert!(
        std::fs::symlink_metadata(dir.path("ok.log"))
            .unwrap()
            .is_file()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(common::audit_ids(&dir.path("ok.log")).len(), 1);
}
