//! A VFS in front of SQLite's own that writes a commit's WAL frames with one `pwrite` instead of two per
//! frame. The only `unsafe` code of the workspace; used by the writer connection alone.
//!
//! Why: SQLite appends each WAL frame as two writes, its 24-byte header and then the page, so a commit of
//! 30 frames is 60 system calls, each one touching two pages of the file's cache because a 4,120-byte frame
//! straddles them. Measured on this machine by a C loop: 4.2-4.5 µs per frame written that way, 0.9-1.0 µs
//! per frame when 35 frames go in one call. The writer commits a few dozen frames per batch.
//!
//! How: every file SQLite opens with `SQLITE_OPEN_WAL` is wrapped. A write that continues the buffered run
//! of bytes (the next frame header or page) is appended to a buffer; the buffer is written with one call
//! to the wrapped file:
//! - right after the page of a **commit frame** (a 24-byte frame header whose "database size after commit"
//!   field is non-zero, then its page). SQLite appends the commit frame last and only afterwards publishes
//!   the new frames in the WAL index, so no reader and no checkpoint can look for a frame still in the
//!   buffer. With `synchronous=NORMAL` (the writer's setting) SQLite calls no `xSync` at commit, so this is
//!   the flush point that matters;
//! - before any write that does not continue the run, so writes reach the file in the order SQLite issued
//!   them;
//! - right after any write below the furthest point this WAL generation has reached: SQLite rewriting a
//!   frame it wrote earlier in the same transaction, or, after a large transaction's commit frame, the
//!   checksums of the frames it rewrote, the commit frame's own header included. Nothing contiguous follows
//!   such a write, so it must not wait in the buffer: a rewritten commit header once waited there for the
//!   next transaction, and until then recovery (after `kill -9`) stopped at the broken checksum chain and
//!   readers of the running hub could report a malformed database;
//! - before every other operation on the file (read, sync, truncate, size, file control, close): the
//!   wrapped file then behaves exactly as if nothing had been buffered;
//! - when it holds 1 MiB (a large transaction spilling pages before its commit).
//!
//! Durability is unchanged: the sync thread fsyncs the WAL after COMMIT has returned, and by then every
//! frame of the commit has been handed to the kernel. A failed write of the buffer is returned by the call
//! that triggered it (the commit's last write, or the read), so SQLite sees the I/O error and the
//! transaction fails as it would have without the buffer.
//!
//! Other files (the database, the shared-memory index, journals) are opened by SQLite's VFS into the
//! same memory without a wrapper, so they cost nothing extra.
//!
//! Invariants: no panic crosses into C (no unwrap, no indexing that can fail); each wrapped file is used by
//! one connection at a time (SQLite's rule for VFS files), so the buffer needs no lock.
#![allow(unsafe_code)]

#[cfg(test)]
use std::cell::Cell;
use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name the writer's connection asks for.
const NAME: &CStr = c"carebridge-walbuf";
/// A WAL frame header's size (the WAL file header is 32 bytes, so only frame headers have this size).
const FRAME_HEADER: usize = 24;
/// Most bytes buffered: a write that would take the buffer past this is preceded by a flush.
const LIMIT: usize = 1 << 20;
/// Capacity a buffer keeps after a flush of at most this many bytes (a large transaction, such as the
/// migrations at start-up, must not leave a mebibyte allocated per WAL file for the life of the process).
const KEEP: usize = 256 << 10;
/// Largest single write handed to SQLite's unix VFS: it masks each write's length with `0x1ffff` (its
/// writes are never larger), so a write of 128 KiB or more would be cut short and reported as a full disk.
const CHUNK: usize = 31 * 4096;

#[cfg(test)]
thread_local! {
    /// Writes SQLite asked of wrapped files, and writes made to the files beneath, on this thread (tests
    /// check that a commit costs one write).
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// `(writes asked by SQLite, writes made)` on wrapped files by this thread so far.
#[cfg(test)]
pub(crate) fn write_counts() -> (u64, u64) {
    COUNTS.with(Cell::get)
}

#[cfg(test)]
fn count(asked: u64, made: u64) {
    COUNTS.with(|c| {
        let (a, m) = c.get();
        c.set((a + asked, m + made));
    });
}

/// Counting is for tests only: nothing on the write path outside them.
#[cfg(not(test))]
fn count(_asked: u64, _made: u64) {}

/// The wrapper SQLite sees; the wrapped file lives in the same allocation, `INNER_AT` bytes in.
#[repr(C)]
struct WalFile {
    /// Must be first: SQLite reads `pMethods` from here.
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: i64,
    /// The buffer ends with a commit frame's header: write it out after the next (the page).
    commit_next: bool,
    /// End of the furthest write of this WAL generation (a write at offset 0, the WAL header, starts one).
    end: i64,
}

/// Where the wrapped file starts (8-byte aligned, as SQLite aligns the whole allocation).
const INNER_AT: usize = std::mem::size_of::<WalFile>().next_multiple_of(8);

/// SQLite's default VFS, and ours.
struct Vfs {
    base: *mut ffi::sqlite3_vfs,
}
// SAFETY: the pointer is to SQLite's default VFS, a static object that SQLite never frees and that is safe
// to use from any thread (SQLite is built threadsafe).
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

static VFS: OnceLock<Option<Vfs>> = OnceLock::new();

/// Register the VFS (once per process) and return its name, or `None` if SQLite has no default VFS to wrap
/// (the caller then opens the default one).
pub(crate) fn name() -> Option<&'static CStr> {
    VFS.get_or_init(register).as_ref().map(|_| NAME)
}

fn register() -> Option<Vfs> {
    // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS or null; the copy keeps every method of the
    // default except xOpen, which forwards to the default's xOpen with the default as its VFS argument.
    // The registered struct is leaked: SQLite keeps a pointer to it for the life of the process.
    unsafe {
        let base = ffi::sqlite3_vfs_find(std::ptr::null());
        if base.is_null() {
            return None;
        }
        let mut ours: ffi::sqlite3_vfs = *base;
        ours.szOsFile = c_int::try_from(INNER_AT)
            .ok()?
            .checked_add((*base).szOsFile)?;
        ours.zName = NAME.as_ptr();
        ours.pNext = std::ptr::null_mut();
        ours.xOpen = Some(open);
        let ours = Box::into_raw(Box::new(ours));
        if ffi::sqlite3_vfs_register(ours, 0) != ffi::SQLITE_OK {
            drop(Box::from_raw(ours));
            return None;
        }
        Some(Vfs { base })
    }
}

fn base() -> *mut ffi::sqlite3_vfs {
    match VFS.get() {
        Some(Some(v)) => v.base,
        _ => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let base = base();
    // SAFETY: `base` is SQLite's default VFS (non-null once registered, and `open` is only reachable through
    // the registered VFS). `file` points to `szOsFile` bytes, enough for a WalFile followed by the default
    // VFS's file, so the default may open into `file` itself or into the bytes at INNER_AT.
    unsafe {
        let Some(base_open) = base.as_ref().and_then(|b| b.xOpen) else {
            (*file).pMethods = std::ptr::null();
            return ffi::SQLITE_CANTOPEN;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return base_open(base, name, file, flags, out_flags);
        }
        let inner = file.cast::<u8>().add(INNER_AT).cast::<ffi::sqlite3_file>();
        let rc = base_open(base, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*inner).pMethods.is_null() {
            (*file).pMethods = std::ptr::null();
            return if rc == ffi::SQLITE_OK {
                ffi::SQLITE_CANTOPEN
            } else {
                rc
            };
        }
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file { pMethods: &METHODS },
            inner,
            buf: Vec::new(),
            start: 0,
            commit_next: false,
            end: 0,
        });
        ffi::SQLITE_OK
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// The wrapper behind `file` (only files opened with METHODS reach these functions).
///
/// # Safety
/// `file` must be a file that `open` wrapped and that is not closed.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: per the function's contract.
    unsafe { &mut *file.cast::<WalFile>() }
}

/// The wrapped file's methods (set by the default VFS's xOpen, checked non-null there).
///
/// # Safety
/// As for [`wal`].
unsafe fn methods<'a>(w: &WalFile) -> &'a ffi::sqlite3_io_methods {
    // SAFETY: `open` checked that the wrapped file's method table is non-null; it is static in SQLite.
    unsafe { &*(*w.inner).pMethods }
}

/// Hand the buffered bytes to the wrapped file in one write.
///
/// # Safety
/// As for [`wal`].
unsafe fn flush(w: &mut WalFile) -> c_int {
    w.commit_next = false;
    if w.buf.is_empty() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: the wrapped file is open; each chunk is within the buffer.
    let write = unsafe { methods(w).xWrite };
    let mut rc = ffi::SQLITE_OK;
    let mut at = w.start;
    for chunk in w.buf.chunks(CHUNK) {
        rc = match (write, c_int::try_from(chunk.len())) {
            // SAFETY: as above.
            (Some(x), Ok(n)) => unsafe { x(w.inner, chunk.as_ptr().cast::<c_void>(), n, at) },
            _ => ffi::SQLITE_IOERR_WRITE,
        };
        count(0, 1);
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += chunk.len() as i64;
    }
    let flushed = w.buf.len();
    w.buf.clear();
    if flushed <= KEEP && w.buf.capacity() > KEEP {
        w.buf.shrink_to(KEEP);
    }
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite passes a file this VFS wrapped, and `amount` readable bytes at `data`.
    unsafe {
        let w = wal(file);
        count(1, 0);
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        // The page of a commit frame whose header is buffered: written out with it, even if the buffer
        // has to be flushed first to stay within LIMIT.
        let commit_page = w.commit_next;
        if !w.buf.is_empty()
            && (offset != w.start + w.buf.len() as i64 || w.buf.len() + len > LIMIT)
        {
            let rc = flush(w);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if w.buf.is_empty() {
            w.start = offset;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
        let needed = w.buf.len() + len;
        if needed > w.buf.capacity() {
            // Doubling, but never past LIMIT (Vec's own growth could reach twice that).
            let want = (w.buf.capacity() * 2).clamp(needed, LIMIT.max(needed));
            w.buf.reserve_exact(want - w.buf.len());
        }
        w.buf.extend_from_slice(bytes);
        // A write below the end of what this generation has written rewrites a frame (a page written again
        // in its transaction, or the checksums SQLite recomputes after the commit frame): written out at
        // once, as nothing may follow it.
        let rewrite = offset != 0 && offset + len as i64 <= w.end;
        if offset == 0 {
            w.end = 0;
        }
        w.end = w.end.max(offset + len as i64);
        if commit_page || rewrite || w.buf.len() >= LIMIT {
            return flush(w);
        }
        // Bytes 4..8 of a frame header: the database size after a commit, zero in other frames.
        if len == FRAME_HEADER && bytes.get(4..8).is_some_and(|s| s != [0, 0, 0, 0]) {
            w.commit_next = true;
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file once; the WalFile is read out and dropped after the last use.
    unsafe {
        let w = wal(file);
        let flushed = flush(w);
        let closed = match methods(w).xClose {
            Some(x) => x(w.inner),
            None => ffi::SQLITE_OK,
        };
        drop(std::mem::take(&mut w.buf));
        (*file).pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

/// Write out the buffer, then run `f` on the wrapped file.
///
/// # Safety
/// As for [`wal`].
unsafe fn after_flush(
    file: *mut ffi::sqlite3_file,
    f: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> Option<c_int>,
) -> c_int {
    // SAFETY: per the contract.
    unsafe {
        let w = wal(file);
        let rc = flush(w);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        f(methods(w), w.inner).unwrap_or(ffi::SQLITE_IOERR)
    }
}

/// Run `f` on the wrapped file (for calls that do not touch the file's bytes).
///
/// # Safety
/// As for [`wal`].
unsafe fn pass<T>(
    file: *mut ffi::sqlite3_file,
    f: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> Option<T>,
    missing: T,
) -> T {
    // SAFETY: per the contract.
    unsafe {
        let w = wal(file);
        f(methods(w), w.inner).unwrap_or(missing)
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { after_flush(file, |m, f| m.xRead.map(|x| x(f, data, amount, offset))) }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { after_flush(file, |m, f| m.xTruncate.map(|x| x(f, size))) }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { after_flush(file, |m, f| m.xSync.map(|x| x(f, flags))) }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { after_flush(file, |m, f| m.xFileSize.map(|x| x(f, size))) }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { after_flush(file, |m, f| m.xFileControl.map(|x| x(f, op, arg))) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { pass(file, |m, f| m.xLock.map(|x| x(f, level)), ffi::SQLITE_IOERR) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xUnlock.map(|x| x(f, level)),
            ffi::SQLITE_IOERR,
        )
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xCheckReservedLock.map(|x| x(f, out)),
            ffi::SQLITE_IOERR,
        )
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { pass(file, |m, f| m.xSectorSize.map(|x| x(f)), 4096) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { pass(file, |m, f| m.xDeviceCharacteristics.map(|x| x(f)), 0) }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xShmMap.map(|x| x(f, page, size, extend, out)),
            ffi::SQLITE_IOERR,
        )
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xShmLock.map(|x| x(f, offset, n, flags)),
            ffi::SQLITE_IOERR,
        )
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: forwarded as SQLite called it.
    unsafe { pass(file, |m, f| m.xShmBarrier.map(|x| x(f)), ()) }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xShmUnmap.map(|x| x(f, delete)),
            ffi::SQLITE_OK,
        )
    }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it; a mapped read must not miss buffered bytes. Without the method
    // the answer is "no mapping" (a null pointer and SQLITE_OK), which makes SQLite read instead.
    unsafe {
        *out = std::ptr::null_mut();
        let w = wal(file);
        let rc = flush(w);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        match methods(w).xFetch {
            Some(x) => x(w.inner, offset, amount, out),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn unfetch(file: *mut ffi::sqlite3_file, offset: i64, p: *mut c_void) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        pass(
            file,
            |m, f| m.xUnfetch.map(|x| x(f, offset, p)),
            ffi::SQLITE_OK,
        )
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    /// A file that records what reaches it.
    #[repr(C)]
    struct Fake {
        base: ffi::sqlite3_file,
        bytes: Vec<u8>,
        writes: usize,
    }

    unsafe extern "C" fn fake_write(
        file: *mut ffi::sqlite3_file,
        data: *const c_void,
        amount: c_int,
        offset: i64,
    ) -> c_int {
        // SAFETY: only called on the Fake below, with `amount` bytes at `data`.
        unsafe {
            let f = &mut *file.cast::<Fake>();
            let (at, n) = (offset as usize, amount as usize);
            assert!(
                n < 0x20000,
                "a write of {n} bytes (SQLite's unix VFS masks lengths with 0x1ffff)"
            );
            if f.bytes.len() < at + n {
                f.bytes.resize(at + n, 0);
            }
            f.bytes[at..at + n].copy_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), n));
            f.writes += 1;
            ffi::SQLITE_OK
        }
    }

    static FAKE_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
        iVersion: 1,
        xClose: None,
        xRead: None,
        xWrite: Some(fake_write),
        xTruncate: None,
        xSync: None,
        xFileSize: None,
        xLock: None,
        xUnlock: None,
        xCheckReservedLock: None,
        xFileControl: None,
        xSectorSize: None,
        xDeviceCharacteristics: None,
        xShmMap: None,
        xShmLock: None,
        xShmBarrier: None,
        xShmUnmap: None,
        xFetch: None,
        xUnfetch: None,
    };

    fn header(commit: u32) -> [u8; FRAME_HEADER] {
        let mut h = [7u8; FRAME_HEADER];
        h[4..8].copy_from_slice(&commit.to_be_bytes());
        h
    }

    /// Frames of 4 KiB pages written as SQLite does, commits of various sizes; after each commit frame's
    /// page, the file holds every byte written so far, and no write to it reaches 128 KiB.
    #[test]
    fn every_commit_reaches_the_file_whatever_its_size() {
        let mut fake = Fake {
            base: ffi::sqlite3_file {
                pMethods: &FAKE_METHODS,
            },
            bytes: Vec::new(),
            writes: 0,
        };
        let mut wal = WalFile {
            base: ffi::sqlite3_file { pMethods: &METHODS },
            inner: (&raw mut fake).cast::<ffi::sqlite3_file>(),
            buf: Vec::new(),
            start: 0,
            commit_next: false,
            end: 0,
        };
        let file = (&raw mut wal).cast::<ffi::sqlite3_file>();
        let mut expected = vec![0u8; 32];
        // SAFETY: `file` is the WalFile above, wrapping the Fake; both outlive the calls.
        unsafe {
            assert_eq!(write(file, expected.as_ptr().cast(), 32, 0), ffi::SQLITE_OK);
        }
        // Commit sizes around the 1 MiB limit and the 124 KiB chunks (a frame is 4,120 bytes).
        for (n, frames) in [1usize, 3, 30, 31, 32, 250, 254, 255, 256, 400]
            .iter()
            .enumerate()
        {
            for i in 0..*frames {
                let last = i + 1 == *frames;
                let h = header(if last { 10 } else { 0 });
                let page = vec![(n * 7 + i) as u8; 4096];
                for part in [&h[..], &page[..]] {
                    let at = expected.len() as i64;
                    expected.extend_from_slice(part);
                    // SAFETY: as above.
                    let rc = unsafe { write(file, part.as_ptr().cast(), part.len() as c_int, at) };
                    assert_eq!(rc, ffi::SQLITE_OK);
                }
            }
            let got = &fake.bytes;
            assert_eq!(got.len(), expected.len(), "commit {n} of {frames} frames");
            assert!(
                got == &expected,
                "commit {n} of {frames} frames: bytes differ"
            );
            assert!(wal.buf.is_empty());
            assert!(wal.buf.capacity() <= LIMIT);
        }
        // One commit of 400 frames (1.6 MB) took a handful of writes, not 800.
        assert!(fake.writes < 150, "{} writes", fake.writes);
        // A rewrite of an earlier page (SQLite's checksum-rewriting path) lands in place, in order.
        let page = vec![0xEEu8; 4096];
        // SAFETY: as above.
        let rc = unsafe { write(file, page.as_ptr().cast(), 4096, 32 + 24) };
        assert_eq!(rc, ffi::SQLITE_OK);
        // SAFETY: as above; flushing through a method that reaches the file.
        unsafe { flush(&mut wal) };
        expected[56..56 + 4096].copy_from_slice(&page);
        assert!(fake.bytes == expected);
    }
}
