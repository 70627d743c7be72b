//! The store lock: an exclusive `flock` on the store file.
//!
//! An exclusive `flock` on the store file keeps a second engine off the store. The kernel drops the
//! lock when the last reference to the open file goes, not when its process dies: a killed process's
//! io_uring holds the file until the requests it had in flight complete, while the kernel tears the
//! ring down, after the process is gone. A restart in that window finds the lock taken. So on
//! `EWOULDBLOCK` we ask `/proc` who holds it: a running process (or this one) is refused at once, an
//! exiting one is waited for, within a bound. Whatever `/proc` says only decides how long we try;
//! the store is used only once `flock` itself has succeeded.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long [`crate::uring::UringDevice::open`] waits for the store's lock while the process holding it is
/// exiting, before giving up and naming that process.
///
/// A killed process keeps its lock until the kernel has closed the store file for it, and the file
/// stays open until the process's io_uring is torn down, which waits for the requests it had in
/// flight: at most the ring's entries, few of them writes. That takes tens of milliseconds (20–40 ms
/// in `tests/lock_wait.rs`), and well under a second even on a slow, loaded disk. 10 s leaves ten
/// times that margin, yet a device that really stalls I/O (the block layer's request timeout is
/// 30 s) is reported, naming the stuck process, rather than holding up the start without a word.
pub const LOCK_EXIT_WAIT_MAX: Duration = Duration::from_secs(10);

/// How often the lock is tried while its holder exits: a restart is delayed by at most this much
/// beyond the teardown itself, and reading `/proc/locks` 50 times a second costs nothing noticeable.
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// `PF_EXITING` in a task's flags (`include/linux/sched.h`): set once the task has started to exit.
const PF_EXITING: u64 = 0x4;

/// SIGKILL's bit in the pending-signal masks of `/proc/<pid>/status`. A process with SIGKILL
/// pending cannot do anything but exit; between `kill -9` and its first step into the exit path it
/// does not yet show `PF_EXITING`.
const SIGKILL_PENDING_MASK: u64 = 1 << (libc::SIGKILL - 1);

/// Takes the store's exclusive lock on `file`, waiting up to `wait_max` if its holder is exiting.
pub(crate) fn lock_store(file: &File, path: &Path, wait_max: Duration) -> Result<()> {
    let shown = path.display();
    let started = Instant::now();
    // The exiting holder we have announced waiting for, if any.
    let mut waiting_for: Option<i32> = None;
    // A lock released between our failed `flock` and our read of /proc/locks shows no holder.
    let mut unidentified_before = false;
    loop {
        // SAFETY: flock only reads the descriptor, which `file` keeps open for the whole call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            if let Some(pid) = waiting_for {
                tracing::info!(
                    pid,
                    "{shown}: exiting process {pid} released the store's lock after {} ms; opening",
                    started.elapsed().as_millis()
                );
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => {}
            Some(libc::EINTR) => continue,
            _ => return Err(Error::io(format!("{shown}: flock(LOCK_EX) on the store file"), e)),
        }
        let holder = find_lock_holder(file);
        let (pid, why) = match holder {
            LockHolder::Exiting { pid, why } => (pid, why),
            LockHolder::Unidentified { .. } if !unidentified_before => {
                unidentified_before = true;
                continue;
            }
            holder => return Err(lock_refused(path, &holder, e)),
        };
        unidentified_before = false;
        let waited = started.elapsed();
        if waited >= wait_max {
            // Pid 0 may also be a running process in another pid namespace (another container).
            let or_running = if pid == 0 { "; or it is a running process in another container" } else { "" };
            return Err(Error::io(
                format!(
                    "{shown}: the store is in use by another process: {}, which {why}, still holds its \
                     lock after {} ms; likely cause: I/O it had in flight is stuck in the kernel or the \
                     device (see `dmesg`, and whether the process is in state D){or_running}; try again \
                     once it is gone",
                    holder_name(pid),
                    waited.as_millis()
                ),
                e,
            ));
        }
        if waiting_for != Some(pid) {
            tracing::warn!(
                pid,
                "{shown}: the store's lock is held by {}, which {why}; waiting up to {} s for the kernel \
                 to release it (it does once the process's files and io_uring are torn down)",
                holder_name(pid),
                wait_max.as_secs_f64()
            );
            waiting_for = Some(pid);
        }
        std::thread::sleep(LOCK_RETRY_INTERVAL.min(wait_max - waited));
    }
}

/// The error for a lock that is not worth waiting for.
fn lock_refused(path: &Path, holder: &LockHolder, e: io::Error) -> Error {
    let shown = path.display();
    let what = match holder {
        LockHolder::ThisProcess { pid } => format!(
            "{shown}: the store is in use by another process (in fact by this one, pid {pid}: it already has \
             the store open); close that store first"
        ),
        LockHolder::Running { pid } => format!(
            "{shown}: the store is in use by another process (pid {pid}, likely a running `syncblock serve`); \
             stop it first"
        ),
        LockHolder::Unidentified { why } => format!(
            "{shown}: the store is in use by another process (likely a running `syncblock serve`); stop it \
             first (the lock's holder could not be identified: {why})"
        ),
        LockHolder::Exiting { .. } => unreachable!("an exiting holder is waited for"),
    };
    Error::io(what, e)
}

/// How messages name a holder: `/proc/locks` shows pid 0 for one it cannot name.
fn holder_name(pid: i32) -> String {
    if pid == 0 {
        "a process /proc/locks shows as pid 0".to_string()
    } else {
        format!("process {pid}")
    }
}

/// Who holds the lock on the store file, as far as `/proc` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LockHolder {
    /// Another open file description in this very process (a second `Store` on the same file): it
    /// will not let go while we wait.
    ThisProcess { pid: i32 },
    /// A process going about its business.
    Running { pid: i32 },
    /// A process that will release the lock without anyone's help, once the kernel has closed its
    /// files. `pid` is 0 when `/proc/locks` shows 0 (see [`LockEntry::pid`]).
    Exiting { pid: i32, why: &'static str },
    /// `/proc/locks` names no holder we can look at.
    Unidentified { why: String },
}

/// What can be seen of a process that `/proc/locks` names as a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PidState {
    Running,
    /// Exiting, a zombie, or gone; the reason, worded to follow "which".
    Exiting(&'static str),
}

/// Finds who holds the lock on `file`, reading `/proc/locks` and `/proc/<pid>/`.
fn find_lock_holder(file: &File) -> LockHolder {
    let metadata = match file.metadata() {
        Ok(metadata) => metadata,
        Err(e) => return LockHolder::Unidentified { why: format!("fstat failed: {e}") },
    };
    let locks = match std::fs::read_to_string("/proc/locks") {
        Ok(locks) => locks,
        Err(e) => return LockHolder::Unidentified { why: format!("cannot read /proc/locks: {e}") },
    };
    let dev = metadata.dev();
    let file_id = FileId { dev_major: libc::major(dev), dev_minor: libc::minor(dev), inode: metadata.ino() };
    classify_lock_holder(&locks, file_id, std::process::id() as i32, probe_pid)
}

/// The device and inode numbers that identify a file in `/proc/locks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev_major: u32,
    dev_minor: u32,
    inode: u64,
}

/// Decides who holds the lock on `file_id` from the text of `/proc/locks`, with `probe` telling
/// what became of a pid. Several holders (shared locks taken by other tools) are judged by the one
/// most likely to keep the lock: this process, then a running one, then an unidentifiable one.
fn classify_lock_holder(
    locks: &str,
    file_id: FileId,
    own_pid: i32,
    mut probe: impl FnMut(i32) -> PidState,
) -> LockHolder {
    let pids: Vec<i32> =
        locks.lines().filter_map(parse_flock_line).filter(|l| l.file_id == file_id).map(|l| l.pid).collect();
    if pids.is_empty() {
        return LockHolder::Unidentified {
            why: format!(
                "/proc/locks shows no flock on device {:x}:{:x} inode {}; on btrfs or overlayfs it may \
                 show other device numbers",
                file_id.dev_major, file_id.dev_minor, file_id.inode
            ),
        };
    }
    if let Some(&pid) = pids.iter().find(|&&pid| pid == own_pid) {
        return LockHolder::ThisProcess { pid };
    }
    let mut exiting = None;
    let mut unidentified = None;
    for &pid in &pids {
        if pid < 0 {
            // Not a process of this machine (a lock held on the server of a network filesystem).
            unidentified = Some(format!("/proc/locks shows pid {pid}"));
            continue;
        }
        let state = if pid == 0 {
            // Shown when the holder's pid is already freed, or when the holder lives in a pid
            // namespace this /proc cannot see. The first is the common case of a restarted
            // container; in the second, waiting only delays the refusal by the bound.
            PidState::Exiting("has exited (its pid is already freed) or runs in another pid namespace")
        } else {
            probe(pid)
        };
        match state {
            PidState::Running => return LockHolder::Running { pid },
            PidState::Exiting(why) => exiting = exiting.or(Some((pid, why))),
        }
    }
    match (unidentified, exiting) {
        (Some(why), _) => LockHolder::Unidentified { why },
        (None, Some((pid, why))) => LockHolder::Exiting { pid, why },
        (None, None) => unreachable!("pids is not empty"),
    }
}

/// One `flock` lock in `/proc/locks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LockEntry {
    /// The holder as `/proc/locks` shows it: the pid of the process that took the lock, in the pid
    /// namespace of that /proc; 0 if that process's pid is already freed (seen from any pid
    /// namespace but the initial one) or belongs to a namespace invisible from there; negative for
    /// a lock held on a network filesystem's server.
    pid: i32,
    file_id: FileId,
}

/// Parses one line of `/proc/locks` if it records a granted `flock` lock, such as
/// `1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF`; `None` for POSIX, OFD and lease locks,
/// for waiters (`1: -> FLOCK ...`), and for anything malformed.
fn parse_flock_line(line: &str) -> Option<LockEntry> {
    let mut fields = line.split_whitespace();
    fields.next()?.strip_suffix(':')?;
    if fields.next()? != "FLOCK" || fields.next()? != "ADVISORY" {
        return None;
    }
    if !matches!(fields.next()?, "WRITE" | "READ") {
        return None;
    }
    let pid = fields.next()?.parse().ok()?;
    // The kernel prints the device as `%02x:%02x`, so major and minor are hexadecimal (and may
    // have more than two digits); the inode number is decimal.
    let mut id = fields.next()?.split(':');
    let dev_major = u32::from_str_radix(id.next()?, 16).ok()?;
    let dev_minor = u32::from_str_radix(id.next()?, 16).ok()?;
    let inode = id.next()?.parse().ok()?;
    if id.next().is_some() {
        return None;
    }
    Some(LockEntry { pid, file_id: FileId { dev_major, dev_minor, inode } })
}

/// A process's state letter and task flags, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    state: char,
    flags: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is parenthesised and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`: state is field 3, flags
/// field 9.
fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let mut state_chars = fields.next()?.chars();
    let state = state_chars.next()?;
    if state_chars.next().is_some() {
        return None;
    }
    // ppid, pgrp, session, tty_nr and tpgid come between state and flags.
    let flags = fields.nth(5)?.parse().ok()?;
    Some(ProcStat { state, flags })
}

/// Whether `/proc/<pid>/status` shows SIGKILL pending, for the main thread (`SigPnd`) or the whole
/// process (`ShdPnd`).
fn sigkill_pending(status: &str) -> bool {
    status
        .lines()
        .filter_map(|line| line.strip_prefix("SigPnd:").or_else(|| line.strip_prefix("ShdPnd:")))
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & SIGKILL_PENDING_MASK != 0)
}

/// What a process's stat and pending signals say: running, or on its way out and why.
fn pid_state(stat: ProcStat, sigkill_pending: bool) -> PidState {
    match stat.state {
        'Z' => PidState::Exiting("has exited and is a zombie"),
        'X' => PidState::Exiting("is dead"),
        _ if stat.flags & PF_EXITING != 0 => PidState::Exiting("is exiting"),
        _ if sigkill_pending => PidState::Exiting("has been sent SIGKILL"),
        _ => PidState::Running,
    }
}

/// Looks at process `pid` (positive) through `/proc`.
fn probe_pid(pid: i32) -> PidState {
    let gone = || {
        // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // It exited since /proc/locks named it, or /proc hides it (mounted with `hidepid`). A
        // process we cannot look at is taken to be running.
        return if gone() { PidState::Exiting("has exited") } else { PidState::Running };
    };
    let Some(stat) = parse_proc_stat(&stat) else { return PidState::Running };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    pid_state(stat, sigkill_pending(&status))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for something that should happen at once before failing rather than
    /// hanging; generous because CI machines stall.
    const TEST_DEADLINE: Duration = Duration::from_secs(30);

    const FILE_ID: FileId = FileId { dev_major: 0xfd, dev_minor: 1, inode: 123456 };

    #[test]
    fn proc_locks_lines_parse_to_granted_flocks_only() {
        let check = |line: &str, want: Option<(i32, u32, u32, u64)>| {
            let got =
                parse_flock_line(line).map(|l| (l.pid, l.file_id.dev_major, l.file_id.dev_minor, l.file_id.inode));
            assert_eq!(got, want, "{line:?}");
        };
        check("1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF", Some((12345, 0xfd, 1, 123456)));
        check("7: FLOCK  ADVISORY  READ 0 103:2a:9 0 EOF", Some((0, 0x103, 0x2a, 9)));
        check("3: FLOCK  ADVISORY  WRITE -1 00:2e:43 0 EOF", Some((-1, 0, 0x2e, 43)));
        // Waiters, other lock kinds and malformed lines are not holders of a flock.
        check("1: -> FLOCK  ADVISORY  WRITE 12346 fd:01:123456 0 EOF", None);
        check("1:  -> FLOCK  ADVISORY  WRITE 12346 fd:01:123456 0 EOF", None);
        check("2: POSIX  ADVISORY  WRITE 847 fd:01:1179845 0 EOF", None);
        check("2: OFDLCK ADVISORY  WRITE -1 00:2e:43 0 EOF", None);
        check("4: LEASE  ACTIVE    READ 1234 08:01:56 0 EOF", None);
        check("5: FLOCK  ADVISORY  WRITE 99 <none>:0 0 EOF", None);
        check("5: FLOCK  ADVISORY  WRITE 99 fd:01 0 EOF", None);
        check("5: FLOCK  ADVISORY  WRITE x fd:01:5 0 EOF", None);
        check("FLOCK  ADVISORY  WRITE 99 fd:01:5 0 EOF", None);
        check("", None);
    }

    #[test]
    fn proc_stat_parses_state_and_flags_after_the_last_parenthesis() {
        let check = |stat: &str, want: Option<(char, u64)>| {
            assert_eq!(parse_proc_stat(stat).map(|s| (s.state, s.flags)), want, "{stat:?}");
        };
        check("12345 (syncblock) S 1 12345 12345 0 -1 4194560 120 0 0 0", Some(('S', 4194560)));
        // A command name holding ") " must not shift the fields.
        check("12345 (a) R 1 2 (b) Z 1 12345 12345 0 -1 4194564 0 0", Some(('Z', 4194564)));
        check("12345 (x) D 1 2 3 4 5 6", Some(('D', 6)));
        check("12345 (x) D 1 2 3 4 5", None);
        check("12345 (x) DD 1 2 3 4 5 6", None);
        check("12345 x S 1 2 3 4 5 6", None);
    }

    #[test]
    fn pending_sigkill_and_exit_states_mark_a_process_as_exiting() {
        let status = |sig_pnd: &str, shd_pnd: &str| {
            format!("Name:\tsyncblock\nState:\tS (sleeping)\nSigPnd:\t{sig_pnd}\nShdPnd:\t{shd_pnd}\nSigBlk:\t0000000000000100\n")
        };
        assert!(!sigkill_pending(&status("0000000000000000", "0000000000000000")));
        assert!(sigkill_pending(&status("0000000000000000", "0000000000000100")));
        assert!(sigkill_pending(&status("0000000000004100", "0000000000000000")));
        // SIGTERM (bit 15) is no promise to exit; nor is a blocked SIGKILL bit (SigBlk) anything.
        assert!(!sigkill_pending(&status("0000000000004000", "0000000000004000")));
        assert!(!sigkill_pending(""));

        let running = ProcStat { state: 'S', flags: 0x40_0140 };
        assert_eq!(pid_state(running, false), PidState::Running);
        assert_eq!(pid_state(ProcStat { state: 'D', ..running }, false), PidState::Running);
        assert!(matches!(pid_state(running, true), PidState::Exiting(why) if why.contains("SIGKILL")));
        assert!(matches!(pid_state(ProcStat { flags: 0x40_0144, ..running }, false), PidState::Exiting("is exiting")));
        assert!(matches!(pid_state(ProcStat { state: 'D', flags: 0x4 }, false), PidState::Exiting("is exiting")));
        assert!(
            matches!(pid_state(ProcStat { state: 'Z', ..running }, false), PidState::Exiting(why) if why.contains("zombie"))
        );
        assert!(matches!(pid_state(ProcStat { state: 'X', ..running }, false), PidState::Exiting("is dead")));
    }

    #[test]
    fn lock_holder_is_classified_from_proc_locks() {
        const OWN: i32 = 500;
        let line = |pid: i32, dev: &str| format!("1: FLOCK  ADVISORY  WRITE {pid} {dev} 0 EOF\n");
        let ours = |pid: i32| line(pid, "fd:01:123456");
        // Pids 100..200 run; 200..300 are exiting.
        let probe = |pid: i32| match pid {
            100..200 => PidState::Running,
            200..300 => PidState::Exiting("is exiting"),
            _ => panic!("probed pid {pid}, which no entry for the store names"),
        };
        let check = |locks: String, want: LockHolder| {
            assert_eq!(classify_lock_holder(&locks, FILE_ID, OWN, probe), want, "{locks}");
        };
        let exiting = |pid| LockHolder::Exiting { pid, why: "is exiting" };
        check(ours(150), LockHolder::Running { pid: 150 });
        check(ours(250), exiting(250));
        check(ours(OWN), LockHolder::ThisProcess { pid: OWN });
        // Locks on other files (another inode, another device) and waiters are ignored.
        check(line(150, "fd:01:123457") + &line(151, "fd:02:123456") + &ours(250), exiting(250));
        check(ours(250) + "2: -> FLOCK  ADVISORY  WRITE 150 fd:01:123456 0 EOF\n", exiting(250));
        // With several holders, the one least likely to let go decides.
        check(ours(250) + &ours(150), LockHolder::Running { pid: 150 });
        check(ours(250) + &ours(OWN) + &ours(150), LockHolder::ThisProcess { pid: OWN });
        assert!(matches!(
            classify_lock_holder(&(ours(250) + &ours(-1)), FILE_ID, OWN, probe),
            LockHolder::Unidentified { why } if why.contains("pid -1")
        ));
        // Pid 0: the holder's pid is already freed (or invisible): worth waiting for.
        assert!(matches!(classify_lock_holder(&ours(0), FILE_ID, OWN, probe), LockHolder::Exiting { pid: 0, .. }));
        for locks in
            [String::new(), line(150, "fd:01:123457"), "2: POSIX  ADVISORY  WRITE 150 fd:01:123456 0 EOF\n".into()]
        {
            assert!(
                matches!(classify_lock_holder(&locks, FILE_ID, OWN, probe), LockHolder::Unidentified { .. }),
                "{locks}"
            );
        }
    }

    /// A lock on `path` that outlives its holder, as a killed process's lock outlives it while the
    /// kernel tears down its io_uring: a forked child takes the lock on a descriptor it shares with
    /// this process and exits, and is reaped. Returns that descriptor (dropping it releases the
    /// lock) and the dead child's pid.
    fn lock_held_by_a_dead_process(path: &Path) -> (File, i32) {
        let file = File::open(path).expect("open for the lock holder");
        let fd = file.as_raw_fd();
        // SAFETY: the forked child calls only flock and _exit, which are async-signal-safe, so
        // forking this multithreaded process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: as above; `fd` is open in the child too.
            let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            // SAFETY: as above.
            unsafe { libc::_exit(i32::from(rc != 0)) };
        }
        let mut status = 0;
        // SAFETY: reaps our own child, writing its status into a live int.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child could not take the lock");
        (file, pid)
    }

    fn lock_fixture() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("create tempdir");
        let path = dir.path().join("store.img");
        std::fs::write(&path, b"").expect("create the store file");
        (dir, path)
    }

    #[test]
    fn lock_whose_holder_is_gone_is_waited_for_until_released() {
        let (_dir, path) = lock_fixture();
        let (holder, _pid) = lock_held_by_a_dead_process(&path);
        let release_after = Duration::from_millis(300);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(release_after);
            drop(holder);
        });
        let started = Instant::now();
        lock_store(&File::open(&path).expect("open"), &path, LOCK_EXIT_WAIT_MAX).expect("lock after the release");
        let waited = started.elapsed();
        releaser.join().expect("releaser");
        assert!(
            waited >= release_after - Duration::from_millis(50),
            "took the lock after {waited:?}, while it was held"
        );
        assert!(waited < LOCK_EXIT_WAIT_MAX, "waited {waited:?}");
    }

    #[test]
    fn lock_whose_holder_never_lets_go_fails_naming_it() {
        let (_dir, path) = lock_fixture();
        let (_holder, pid) = lock_held_by_a_dead_process(&path);
        let wait_max = Duration::from_millis(200);
        let started = Instant::now();
        let err =
            lock_store(&File::open(&path).expect("open"), &path, wait_max).expect_err("the lock is never released");
        let waited = started.elapsed();
        let message = err.to_string();
        assert!(message.contains("in use by another process"), "{message}");
        assert!(message.contains(&format!("process {pid}, which has exited")), "{message}");
        assert!(message.contains("likely cause"), "{message}");
        assert!(matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EWOULDBLOCK)), "{err}");
        assert!(waited >= wait_max && waited < TEST_DEADLINE, "gave up after {waited:?}");
    }

    #[test]
    fn lock_held_by_this_process_is_refused_at_once() {
        let (_dir, path) = lock_fixture();
        let first = File::open(&path).expect("open");
        lock_store(&first, &path, LOCK_EXIT_WAIT_MAX).expect("first lock");
        let started = Instant::now();
        let err = lock_store(&File::open(&path).expect("open"), &path, LOCK_EXIT_WAIT_MAX).expect_err("second lock");
        let message = err.to_string();
        assert!(message.contains("in use by another process"), "{message}");
        assert!(message.contains(&format!("this one, pid {}", std::process::id())), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused only after {:?}", started.elapsed());
        drop(first);
        lock_store(&File::open(&path).expect("open"), &path, LOCK_EXIT_WAIT_MAX).expect("lock after the first closed");
    }
}
