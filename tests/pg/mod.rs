//! A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` in a temp directory,
//! listening on 127.0.0.1 on a free port (no Unix socket), stopped when the last user drops
//! it. In CI (`CI=true`) missing binaries fail the test; elsewhere the test is skipped with
//! a loud message.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Where Debian puts the server binaries; `TOKENVAULT_PG_BIN` overrides.
const BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
];

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Run the server tools as this user (initdb refuses root).
    user: Option<&'static str>,
    /// Extra `-c` settings of every start.
    settings: String,
}

static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("TOKENVAULT_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    BIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

/// The shared cluster of this test binary, or None (skip) outside CI without PostgreSQL.
pub fn cluster() -> Option<Arc<Cluster>> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = shared.upgrade() {
        return Some(c);
    }
    let c = private_cluster()?;
    *shared = Arc::downgrade(&c);
    Some(c)
}

/// A cluster of the caller's own (for tests that stop and start the server).
pub fn private_cluster() -> Option<Arc<Cluster>> {
    private_cluster_with("")
}

/// [`private_cluster`] with extra server settings (`-c name=value …`), e.g. a preloaded
/// extension.
pub fn private_cluster_with(settings: &str) -> Option<Arc<Cluster>> {
    let Some(bin) = bin_dir() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("PostgreSQL server binaries (initdb, pg_ctl) are missing: .ci/postgres.sh installs them");
        }
        eprintln!(
            "\n*** SKIPPED: PostgreSQL is not installed (no initdb/pg_ctl in {BIN_DIRS:?}); \
             install the `postgresql` package to run the PostgreSQL tests ***\n"
        );
        return None;
    };
    Some(Arc::new(Cluster::start(bin, settings)))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn start(bin: PathBuf, settings: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let user = root.then_some("postgres");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let ok = Command::new("chown")
                .args(["-R", "postgres:", data.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the cluster directory to postgres");
        }
        let c = Cluster {
            dir,
            bin,
            port: free_port(),
            user,
            settings: settings.to_owned(),
        };
        c.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        );
        c.pg_ctl_start();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match self.user {
            Some(u) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", u, "--"]).arg(exe);
                cmd
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200 {}",
            self.port, self.settings
        );
        let data = self.data();
        let log = self.data().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once (a crash as far as clients see it).
    pub fn stop_immediate(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// Stops every server process with SIGSTOP: connections stay open and nothing answers
    /// (a hung host, a silent partition). They run again when the guard drops.
    pub fn freeze(&self) -> Frozen {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        // The postmaster first, so it forks no new backend meanwhile.
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // Field 4 of /proc/PID/stat, after the command in parentheses, is the parent.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            if after.split_whitespace().nth(1) == Some(&postmaster.to_string()) {
                pids.push(pid);
            }
        }
        for &pid in &pids {
            // SAFETY: kill has no memory preconditions; these are our own server's processes.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }

    /// The URL of database `db` as the superuser, over TCP without TLS.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database; returns its URL.
    pub fn create_db(&self) -> String {
        let name = format!(
            "tv_{}_{}",
            std::process::id(),
            DB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // CREATE DATABASE copies template1 and fails while another copy is running.
        static CREATE: Mutex<()> = Mutex::new(());
        let _one = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL in database `db` through a connection of its own (on a thread of its own, so
    /// it works from sync and async tests alike).
    pub fn sql(&self, db: &str, sql: &str) {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                client.batch_execute(&sql).await.unwrap();
            })
        })
        .join()
        .unwrap();
    }

    /// The first column of the first row of a query, as text (simple query protocol).
    pub fn query(&self, db: &str, sql: &str) -> String {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let msgs = client.simple_query(&sql).await.unwrap();
                msgs.iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            Some(r.get(0).unwrap_or_default().to_owned())
                        }
                        _ => None,
                    })
                    .unwrap_or_default()
            })
        })
        .join()
        .unwrap()
    }

    /// The first column (bytea) of every row `sql` returns in database `db`.
    pub fn query_blobs(&self, db: &str, sql: &str) -> Vec<Vec<u8>> {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                client
                    .query(&sql, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, Vec<u8>>(0))
                    .collect()
            })
        })
        .join()
        .unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Server processes stopped by [`Cluster::freeze`]; dropping it lets them run again.
pub struct Frozen(Vec<i32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in self.0.iter().rev() {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// The database name of a URL made by [`Cluster::create_db`].
pub fn db_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
